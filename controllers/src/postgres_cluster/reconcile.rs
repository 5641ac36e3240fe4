//! The acting half of the PostgresCluster reconciler: reads what exists, applies what the
//! builders decided, takes the next rolling step, and writes the status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::contract;
use api::image_catalog::image_for_major;
use api::postgres_cluster::{
    FENCED_ANNOTATION, ImageCatalogKind, PostgresCluster, SWITCHOVER_ANNOTATION,
};
use api::{ClusterImageCatalog, ImageCatalog};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::builders::{self, Resolved, ServiceKind};
use super::instances::{self, InstanceView};
use super::parameters::{self, ParameterChange};
use super::rolling::{self, RollingStep, ScaleDown};
use super::secrets;
use super::status::{self, Observation, Phase, Problem};
use super::volume_restore;
use super::volumes;
use super::{CONTROLLER, Context, Error, FIELD_MANAGER, FINALIZER, kube_error};

/// Requeue interval while something is in motion (rolling update, switchover, a problem).
const BUSY_REQUEUE: Duration = Duration::from_secs(10);

/// Reconciles one PostgresCluster (entry point of the controller).
pub async fn reconcile(cluster: Arc<PostgresCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<PostgresCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let reference = cluster.object_ref(&());
    let result = finalizer(&api, FINALIZER, cluster, |event| async {
        match event {
            Event::Apply(cluster) => apply(&cluster, &ctx).await,
            Event::Cleanup(cluster) => cleanup(&cluster, &ctx).await,
        }
    })
    .await
    .map_err(|source| Error::Finalizer {
        name,
        source: Box::new(source),
    });
    ctx.metrics
        .observe_reconcile(CONTROLLER, started.elapsed(), result.is_ok());
    if let Err(error) = &result {
        // An error stops the reconcile before the status is written: without this event a
        // cluster that never gets past its first step shows nothing to `kubectl describe`.
        // Repeats of the same message are folded into one event series by the recorder.
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "ReconcileFailed".to_string(),
            // The events API refuses notes over 1 KiB.
            note: Some(
                format!("{error}; retrying in 5 s")
                    .chars()
                    .take(1000)
                    .collect(),
            ),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(failed) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(cluster = %reference.name.clone().unwrap_or_default(), error = %failed, "publishing an event failed");
        }
    }
    result
}

/// Server-side applies `object` with the operator's field manager.
async fn apply_object<K>(api: &Api<K>, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(kube_error(format!("applying {} {name}", K::kind(&()))))
}

pub(super) fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

pub(super) async fn publish(
    ctx: &Context,
    cluster: &PostgresCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        tracing::warn!(cluster = %cluster.name_any(), %error, "publishing an event failed");
    }
}

/// Finds the image: `spec.image`, or the catalog's image for `spec.postgresVersion`.
async fn resolve_image(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Result<String, Problem>, Error> {
    if let Some(image) = &cluster.spec.image {
        return Ok(Ok(image.clone()));
    }
    let Some(reference) = &cluster.spec.image_catalog_ref else {
        return Ok(Err(Problem {
            reason: "Blocked",
            message: "neither spec.image nor spec.imageCatalogRef is set".to_string(),
        }));
    };
    let kind = match reference.kind {
        ImageCatalogKind::ImageCatalog => "ImageCatalog",
        ImageCatalogKind::ClusterImageCatalog => "ClusterImageCatalog",
    };
    let what = format!("reading {kind} {}", reference.name);
    let images = match reference.kind {
        ImageCatalogKind::ImageCatalog => {
            Api::<ImageCatalog>::namespaced(ctx.client.clone(), namespace)
                .get_opt(&reference.name)
                .await
                .map_err(kube_error(what))?
                .map(|catalog| catalog.spec.images)
        }
        ImageCatalogKind::ClusterImageCatalog => {
            Api::<ClusterImageCatalog>::all(ctx.client.clone())
                .get_opt(&reference.name)
                .await
                .map_err(kube_error(what))?
                .map(|catalog| catalog.spec.images)
        }
    };
    let major = cluster.spec.postgres_version;
    Ok(match images {
        None => Err(Problem {
            reason: "ImageCatalogNotFound",
            message: format!(
                "{kind} {} not found{}: create it or fix spec.imageCatalogRef",
                reference.name,
                if reference.kind == ImageCatalogKind::ImageCatalog {
                    format!(" in namespace {namespace}")
                } else {
                    String::new()
                }
            ),
        }),
        Some(images) => match image_for_major(&images, major) {
            Some(image) => Ok(image.to_string()),
            None => Err(Problem {
                reason: "ImageNotInCatalog",
                message: format!(
                    "{kind} {} has no image for PostgreSQL {major}: add an entry with major {major}",
                    reference.name
                ),
            }),
        },
    })
}

/// Applies the StatefulSet. PVC templates cannot change after creation, so when the API server
/// refuses the update, the existing templates are kept and everything else is applied.
async fn apply_stateful_set(api: &Api<StatefulSet>, mut desired: StatefulSet) -> Result<(), Error> {
    match apply_object(api, &desired).await {
        Ok(_) => Ok(()),
        Err(Error::Kube { source, .. }) if is_status(&source, 422) => {
            let name = desired.metadata.name.clone().unwrap_or_default();
            let existing = api
                .get(&name)
                .await
                .map_err(kube_error(format!("reading StatefulSet {name}")))?;
            if let (Some(spec), Some(existing)) = (desired.spec.as_mut(), existing.spec) {
                spec.volume_claim_templates = existing.volume_claim_templates;
            }
            apply_object(api, &desired).await.map(|_| ())
        }
        Err(error) => Err(error),
    }
}

/// Grows the existing PVCs to the spec's sizes (the StatefulSet's templates cannot change). A
/// StorageClass that cannot expand is reported with a warning event, not retried as an error.
async fn grow_volumes(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<(), Error> {
    let name = cluster.name_any();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let found = claims
        .list(&ListParams::default().labels(&builders::instance_selector_string(&name)))
        .await
        .map_err(kube_error(format!(
            "listing the PersistentVolumeClaims of {name}"
        )))?;
    for claim in found.items {
        let claim_name = claim.name_any();
        let current = claim
            .spec
            .as_ref()
            .and_then(|spec| spec.resources.as_ref())
            .and_then(|resources| resources.requests.as_ref())
            .and_then(|requests| requests.get("storage"))
            .map(|quantity| quantity.0.clone())
            .unwrap_or_default();
        let Some(size) = volumes::growth(cluster, &claim_name, &current) else {
            continue;
        };
        let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}});
        match claims
            .patch(&claim_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(cluster = %name, namespace, claim = %claim_name, %size, "volume grown");
                publish(
                    ctx,
                    cluster,
                    EventType::Normal,
                    "VolumeExpanded",
                    format!("{claim_name}: {current} -> {size}"),
                )
                .await;
            }
            Err(kube::Error::Api(status)) if matches!(status.code, 403 | 422) => {
                publish(
                    ctx,
                    cluster,
                    EventType::Warning,
                    "VolumeExpansionFailed",
                    format!("{claim_name} cannot grow to {size}: {}", status.message),
                )
                .await;
            }
            Err(error) => {
                return Err(kube_error(format!(
                    "growing PersistentVolumeClaim {claim_name}"
                ))(error));
            }
        }
    }
    Ok(())
}

/// Puts the fenced annotation on the pods that should be fenced and removes it from the others.
async fn sync_fencing(
    cluster: &PostgresCluster,
    pods: &Api<Pod>,
    instances: &[InstanceView],
) -> Result<(), Error> {
    let names: Vec<String> = instances.iter().map(|i| i.name.clone()).collect();
    let fenced = instances::fenced_names(
        &cluster.spec.fenced_instances,
        cluster
            .annotations()
            .get(FENCED_ANNOTATION)
            .map(String::as_str),
        &names,
    );
    for instance in instances {
        let should = fenced.contains(&instance.name);
        if should == instance.fenced {
            continue;
        }
        let value = if should { json!("true") } else { json!(null) };
        let patch = json!({"metadata": {"annotations": {FENCED_ANNOTATION: value}}});
        match pods
            .patch(
                &instance.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(cluster = %cluster.name_any(), instance = %instance.name, fenced = should, "fencing changed");
            }
            Err(error) if is_status(&error, 404) => {}
            Err(error) => {
                return Err(kube_error(format!("fencing pod {}", instance.name))(error));
            }
        }
    }
    Ok(())
}

/// The switchover target the user asked for (spec field first, then the annotation).
fn requested_switchover(cluster: &PostgresCluster) -> Option<String> {
    cluster.spec.switchover_to.clone().or_else(|| {
        cluster
            .annotations()
            .get(SWITCHOVER_ANNOTATION)
            .filter(|value| !value.is_empty())
            .cloned()
    })
}

/// Annotation on the cluster with the switchover target the operator last passed on.
pub const SWITCHOVER_PASSED_ANNOTATION: &str = contract::ANNOTATION_SWITCHOVER_PASSED_ON;

/// Records (or forgets, with `None`) the switchover target passed on to the instance managers.
async fn remember_switchover(
    cluster: &PostgresCluster,
    ctx: &Context,
    target: Option<&String>,
) -> Result<(), Error> {
    let name = cluster.name_any();
    let api: Api<PostgresCluster> =
        Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"annotations": {SWITCHOVER_PASSED_ANNOTATION: target}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_error(format!("annotating PostgresCluster {name}")))?;
    Ok(())
}

/// Writes the switchover annotation on the cluster's Lease, where the instance managers pick it up.
async fn request_switchover(leases: &Api<Lease>, lease: &str, target: &str) -> Result<(), Error> {
    let patch = json!({"metadata": {"annotations": {SWITCHOVER_ANNOTATION: target}}});
    leases
        .patch(lease, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_error(format!(
            "requesting a switchover on Lease {lease}"
        )))?;
    Ok(())
}

async fn delete_pod(pods: &Api<Pod>, pod: &str) -> Result<(), Error> {
    match pods.delete(pod, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(error) if is_status(&error, 404) => Ok(()),
        Err(error) => Err(kube_error(format!("deleting pod {pod}"))(error)),
    }
}

/// What the instance pods and the cluster's Lease say, read once per reconciliation.
struct Observed {
    /// The instance pods as listed.
    pods: Vec<Pod>,
    instances: Vec<InstanceView>,
    /// The Lease `<cluster>-primary`, once the first primary created it.
    lease: Option<Lease>,
    /// Target of a switchover in flight (the Lease annotation), if any.
    switchover_to: Option<String>,
}

impl Observed {
    async fn read(
        cluster: &PostgresCluster,
        ctx: &Context,
        namespace: &str,
    ) -> Result<Self, Error> {
        let name = cluster.name_any();
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
        let pods = pods
            .list(&ListParams::default().labels(&builders::instance_selector_string(&name)))
            .await
            .map_err(kube_error(format!("listing pods of {name}")))?
            .items;
        let instances: Vec<InstanceView> = pods
            .iter()
            .map(|pod| InstanceView::from_pod(&name, pod))
            .collect();
        let lease_name = contract::lease_name(&name);
        let lease = if instances.is_empty() {
            None
        } else {
            Api::<Lease>::namespaced(ctx.client.clone(), namespace)
                .get_opt(&lease_name)
                .await
                .map_err(kube_error(format!("reading Lease {lease_name}")))?
        };
        let switchover_to = lease
            .as_ref()
            .and_then(|lease| lease.annotations().get(SWITCHOVER_ANNOTATION).cloned())
            .filter(|target| !target.is_empty());
        Ok(Self {
            pods,
            instances,
            lease,
            switchover_to,
        })
    }

    /// Asks the instance managers for a switchover to `to` (Lease annotation), unless one is in
    /// flight or there is no Lease yet. Returns whether the request was made.
    async fn request_switchover(
        &mut self,
        cluster: &PostgresCluster,
        ctx: &Context,
        to: &str,
        why: String,
    ) -> Result<bool, Error> {
        if self.switchover_to.is_some() || self.lease.is_none() {
            return Ok(false);
        }
        let name = cluster.name_any();
        let namespace = cluster.namespace().unwrap_or_default();
        tracing::info!(cluster = %name, namespace, to, %why, "requesting a switchover");
        request_switchover(
            &Api::namespaced(ctx.client.clone(), &namespace),
            &contract::lease_name(&name),
            to,
        )
        .await?;
        publish(ctx, cluster, EventType::Normal, "SwitchoverRequested", why).await;
        self.switchover_to = Some(to.to_string());
        Ok(true)
    }
}

/// Applies the ConfigMap of parameters and tells, by an event, whether the change is applied
/// by a reload or needs a rolling restart.
async fn apply_parameters(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<(), Error> {
    let name = cluster.name_any();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let config_name = contract::config_map(&name);
    let old_parameters = config_maps
        .get_opt(&config_name)
        .await
        .map_err(kube_error(format!("reading ConfigMap {config_name}")))?
        .and_then(|map| map.data?.get(contract::CONFIG_KEY_POSTGRESQL).cloned())
        .map(|text| parameters::parse_conf(&text));
    apply_object(&config_maps, &builders::config_map(cluster)).await?;
    let Some(old) = old_parameters else {
        return Ok(());
    };
    match ParameterChange::between(&old, &builders::effective_parameters(cluster)) {
        ParameterChange::None => {}
        ParameterChange::Reload { changed } => {
            tracing::info!(cluster = %name, namespace, ?changed, "parameters change by reload");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "ParametersReloaded",
                format!("applied without a restart (reload): {}", changed.join(", ")),
            )
            .await;
        }
        ParameterChange::Restart { restart, .. } => {
            tracing::info!(cluster = %name, namespace, ?restart, "parameters need a restart");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "RestartRequired",
                format!(
                    "{} need a restart: rolling update, replicas first",
                    restart.join(", ")
                ),
            )
            .await;
        }
    }
    Ok(())
}

/// Applies the instance managers' access (ServiceAccount, Role, RoleBinding), the Services, the
/// PodDisruptionBudget and the NetworkPolicy; they do not depend on each other.
async fn apply_supporting_objects(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
    app_secret: &str,
) -> Result<(), Error> {
    let client = || ctx.client.clone();
    let (service_accounts, roles, role_bindings, services, budgets, policies) = (
        Api::<ServiceAccount>::namespaced(client(), namespace),
        Api::<Role>::namespaced(client(), namespace),
        Api::<RoleBinding>::namespaced(client(), namespace),
        Api::<Service>::namespaced(client(), namespace),
        Api::<PodDisruptionBudget>::namespaced(client(), namespace),
        Api::<NetworkPolicy>::namespaced(client(), namespace),
    );
    let (service_account, role, role_binding) = (
        builders::service_account(cluster),
        builders::role(cluster, app_secret),
        builders::role_binding(cluster),
    );
    let (read_write, read_only, any) = (
        builders::service(cluster, ServiceKind::ReadWrite),
        builders::service(cluster, ServiceKind::ReadOnly),
        builders::service(cluster, ServiceKind::Any),
    );
    let (budget, policy) = (
        builders::pod_disruption_budget(cluster),
        builders::network_policy(cluster),
    );
    // The Role before its RoleBinding: the API server's escalation check on a binding reads the
    // Role and answers NotFound while it does not exist, and `try_join!` drops the requests still
    // in flight when one fails, so a binding applied beside a new Role could fail, and take the
    // Role's creation with it, at every retry (seen for minutes on a shard a split provisioned).
    futures::try_join!(
        apply_object(&service_accounts, &service_account),
        apply_object(&roles, &role),
    )?;
    futures::try_join!(
        apply_object(&role_bindings, &role_binding),
        apply_object(&services, &read_write),
        apply_object(&services, &read_only),
        apply_object(&services, &any),
        apply_object(&budgets, &budget),
        apply_object(&policies, &policy),
    )?;
    Ok(())
}

/// Applies the StatefulSet and grows the volumes. A scale down that would remove the primary
/// keeps its pod and asks for a switchover first. Returns the template's spec hash.
async fn apply_instances(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
    resolved: &Resolved,
    observed: &mut Observed,
) -> Result<String, Error> {
    let mut stateful_set = builders::stateful_set(cluster, resolved);
    let replicas = builders::desired_replicas(cluster);
    if let ScaleDown::SwitchoverFirst { keep, from, to } =
        rolling::scale_down(&observed.instances, replicas)
    {
        if let Some(spec) = stateful_set.spec.as_mut() {
            spec.replicas = Some(keep);
        }
        if let Some(to) = to {
            let why =
                format!("scaling down to {replicas} removes {from}: switchover to {to} first");
            observed.request_switchover(cluster, ctx, &to, why).await?;
        }
    }
    // The template carries the hash the rolling plan compares pods with.
    let hash = builders::template_hash(&stateful_set);
    apply_stateful_set(
        &Api::namespaced(ctx.client.clone(), namespace),
        stateful_set,
    )
    .await?;
    grow_volumes(cluster, ctx, namespace).await?;
    Ok(hash)
}

/// Passes a user's switchover request on once: the cluster remembers the target it passed on,
/// so that a later failover is not undone by a request that is still set.
async fn pass_on_user_switchover(
    cluster: &PostgresCluster,
    ctx: &Context,
    observed: &mut Observed,
) -> Result<(), Error> {
    let requested = requested_switchover(cluster);
    let passed_on = cluster
        .annotations()
        .get(SWITCHOVER_PASSED_ANNOTATION)
        .cloned();
    let target = match (&requested, &passed_on) {
        (None, Some(_)) => return remember_switchover(cluster, ctx, None).await,
        (Some(target), _) if passed_on.as_ref() != Some(target) => target,
        _ => return Ok(()),
    };
    let current_primary = instances::primary(&observed.instances).map(|p| p.name.clone());
    if current_primary.as_ref() == Some(target) {
        return remember_switchover(cluster, ctx, Some(target)).await;
    }
    let exists = observed.instances.iter().any(|i| &i.name == target);
    if exists {
        let live = observed
            .instances
            .iter()
            .any(|i| &i.name == target && !i.terminating);
        let why = format!("switchover to {target} requested by the user");
        if live
            && observed
                .request_switchover(cluster, ctx, target, why)
                .await?
        {
            remember_switchover(cluster, ctx, Some(target)).await?;
        }
    } else if !observed.instances.is_empty() {
        let name = cluster.name_any();
        publish(
            ctx,
            cluster,
            EventType::Warning,
            "SwitchoverTargetNotFound",
            format!(
                "switchover target {target} is not an instance of this cluster (instances are {name}-0 to {name}-{})",
                cluster.spec.instances - 1
            ),
        )
        .await;
    }
    Ok(())
}

/// Takes the rolling update's next step.
async fn take_rolling_step(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
    step: &RollingStep,
    observed: &mut Observed,
) -> Result<(), Error> {
    let (pod, note) = match step {
        RollingStep::RecreateReplica { pod } | RollingStep::RecreatePrimary { pod } => (
            pod,
            format!("rolling update: recreating {pod} from the new template"),
        ),
        RollingStep::ReplaceStuck { pod, problem } => (
            pod,
            format!(
                "recreating {pod} from the new template: on the old one it could not run ({problem})"
            ),
        ),
        RollingStep::Switchover { from, to } => {
            let why =
                format!("rolling update: switchover from {from} to {to}, then {from} is updated");
            return observed
                .request_switchover(cluster, ctx, to, why)
                .await
                .map(drop);
        }
        RollingStep::UpToDate | RollingStep::Wait { .. } | RollingStep::Supervised { .. } => {
            return Ok(());
        }
    };
    tracing::info!(cluster = %cluster.name_any(), namespace, instance = %pod, "{note}");
    delete_pod(&Api::namespaced(ctx.client.clone(), namespace), pod).await?;
    publish(ctx, cluster, EventType::Normal, "InstanceRecreated", note).await;
    Ok(())
}

/// Writes the status when it changed, with an event on a phase change.
async fn write_status(
    cluster: &PostgresCluster,
    ctx: &Context,
    observation: &Observation<'_>,
) -> Result<(), Error> {
    let name = cluster.name_any();
    let previous = cluster.status.as_ref();
    let desired = status::desired_status(previous, observation);
    if previous.is_some_and(|previous| !status::differs(previous, &desired)) {
        return Ok(());
    }
    let api: Api<PostgresCluster> =
        Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": PostgresCluster::api_version(&()),
        "kind": PostgresCluster::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_error(format!(
        "writing the status of PostgresCluster {name}"
    )))?;
    // A failing archive gets a Warning event when the reason of its condition changes to it.
    let archiving = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        api::common::find_condition(conditions, super::archiving::CONTINUOUS_ARCHIVING)
            .filter(|condition| condition.status == "False")
            .map(|condition| (condition.reason.clone(), condition.message.clone()))
    };
    if let Some((reason, message)) = archiving(&desired.conditions)
        && matches!(reason.as_str(), "ArchiveNotEmpty" | "ArchivingFailing")
        && previous
            .and_then(|s| archiving(&s.conditions))
            .map(|(r, _)| r)
            != Some(reason.clone())
    {
        publish(ctx, cluster, EventType::Warning, &reason, message).await;
    }
    // A supervised update that reaches the primary says so once, with what to run.
    let waiting = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        api::common::find_condition(conditions, api::common::condition::PROGRESSING)
            .filter(|condition| condition.reason == status::WAITING_FOR_USER)
            .map(|condition| condition.message.clone())
    };
    if let Some(message) = waiting(&desired.conditions)
        && previous.and_then(|s| waiting(&s.conditions)).is_none()
    {
        publish(ctx, cluster, EventType::Normal, "SwitchoverNeeded", message).await;
    }
    let old_phase = previous.and_then(|s| s.phase.clone());
    if old_phase == desired.phase {
        return Ok(());
    }
    let phase = desired.phase.clone().unwrap_or_default();
    let (type_, note) = if phase == Phase::Degraded.as_str() {
        let message =
            api::common::find_condition(&desired.conditions, api::common::condition::DEGRADED)
                .map(|c| c.message.clone())
                .unwrap_or_default();
        (EventType::Warning, message)
    } else {
        let from = old_phase.unwrap_or_else(|| "none".to_string());
        (EventType::Normal, format!("phase {from} -> {phase}"))
    };
    publish(ctx, cluster, type_, &phase, note).await;
    Ok(())
}

/// Brings every owned object in line with the spec, takes the next rolling step and writes the
/// status.
async fn apply(cluster: &PostgresCluster, ctx: &Context) -> Result<Action, Error> {
    if let Some(sharding) = &cluster.spec.sharding {
        // A sharded cluster owns one single-shard cluster per shard and the router instead.
        return crate::sharded_cluster::reconcile::apply(cluster, sharding, ctx).await;
    }
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let hibernated = builders::is_hibernated(cluster);

    // Inputs outside the spec: the image (maybe from a catalog) and the Secrets.
    let mut problem = None;
    let image = resolve_image(cluster, ctx, &namespace)
        .await?
        .map_err(|found| problem = Some(found))
        .ok();
    let app_secret = match secrets::ensure_secrets(cluster, ctx, &namespace).await? {
        Ok(secret) => secret,
        Err(found) => {
            problem.get_or_insert(found);
            builders::user_app_secret(cluster).unwrap_or_default()
        }
    };

    // TLS Secrets before the pods that mount them; renewal brings the reconciler back early.
    let tls = match crate::tls::ensure(cluster, ctx, &namespace)
        .await
        .map_err(|source| Error::Tls {
            name: name.clone(),
            source,
        })? {
        Ok(outcome) => outcome,
        Err(found) => {
            problem.get_or_insert(found);
            crate::tls::Outcome::default()
        }
    };

    apply_parameters(cluster, ctx, &namespace).await?;
    apply_supporting_objects(cluster, ctx, &namespace, &app_secret).await?;

    let mut observed = Observed::read(cluster, ctx, &namespace).await?;
    // The user's labels and annotations onto running pods and existing claims, in place.
    crate::inherited::apply_in_place(
        &ctx.client,
        cluster,
        &namespace,
        &builders::instance_selector_string(&name),
        &observed.pods,
    )
    .await
    .map_err(kube_error(format!(
        "labelling the pods and claims of {name} (spec.inheritedMetadata)"
    )))?;
    sync_fencing(
        cluster,
        &Api::namespaced(ctx.client.clone(), &namespace),
        &observed.instances,
    )
    .await?;
    let stale_check_in = super::stale_primary::release(
        cluster,
        ctx,
        &Api::namespaced(ctx.client.clone(), &namespace),
        &observed.pods,
        &mut observed.instances,
        observed.lease.as_ref(),
    )
    .await?;

    // The StatefulSet only when its pods could start (image resolved, Secrets present, and the
    // first instance's volume restored when the cluster starts from a backup volume).
    let resolved = image
        .clone()
        .filter(|_| problem.is_none())
        .map(|image| Resolved {
            image,
            instance_manager_image: ctx.settings.instance_manager_image.clone(),
            app_secret,
        });
    if let Some(resolved) = &resolved
        && let Some(waiting) = volume_restore::ensure(cluster, ctx, &namespace, resolved).await?
    {
        problem = Some(waiting);
    }
    let desired_hash = match (&resolved, &problem) {
        (Some(resolved), None) => {
            Some(apply_instances(cluster, ctx, &namespace, resolved, &mut observed).await?)
        }
        _ => None,
    };
    pass_on_user_switchover(cluster, ctx, &mut observed).await?;

    // Rolling update: one step per reconciliation.
    let step = match (&desired_hash, hibernated) {
        (Some(hash), false) => rolling::supervise(
            rolling::plan(
                &observed.instances,
                cluster.spec.instances,
                hash,
                observed.switchover_to.is_some(),
            ),
            cluster.spec.primary_update_strategy,
        ),
        _ => RollingStep::UpToDate,
    };
    take_rolling_step(cluster, ctx, &namespace, &step, &mut observed).await?;

    if let Err(error) = crate::monitoring::reconcile(&ctx.client, cluster).await {
        problem.get_or_insert(Problem {
            reason: "MonitoringFailed",
            message: error.to_string(),
        });
    }
    let busy = problem.is_some() || step.is_rolling() || observed.switchover_to.is_some();
    let observation = Observation {
        cluster,
        instances: &observed.instances,
        image,
        problem,
        step,
        switchover_to: observed.switchover_to.clone(),
        hibernated,
        certificate_authority: tls.certificate_authority.clone(),
    };
    write_status(cluster, ctx, &observation).await?;
    let requeue = if busy {
        BUSY_REQUEUE
    } else {
        ctx.settings.resync
    };
    let requeue = match tls.renew_in {
        Some(renew_in) => requeue.min(renew_in.max(Duration::from_secs(1))),
        None => requeue,
    };
    Ok(Action::requeue(match stale_check_in {
        Some(check_in) => requeue.min(check_in),
        None => requeue,
    }))
}

/// Removes what owner references do not: the Lease the instance managers created and, when the
/// spec says so, the PersistentVolumeClaims. Everything else goes with the owner references.
async fn cleanup(cluster: &PostgresCluster, ctx: &Context) -> Result<Action, Error> {
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    ctx.metrics.forget_cluster(&namespace, &name);
    let lease_name = contract::lease_name(&name);
    match Api::<Lease>::namespaced(ctx.client.clone(), &namespace)
        .delete(&lease_name, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(error) if is_status(&error, 404) => {}
        Err(error) => return Err(kube_error(format!("deleting Lease {lease_name}"))(error)),
    }
    let kept = if cluster.spec.delete_volumes_on_deletion {
        // One by one rather than deletecollection, which the operator's Role does not grant.
        let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
        let found = claims
            .list_metadata(
                &ListParams::default().labels(&builders::instance_selector_string(&name)),
            )
            .await
            .map_err(kube_error(format!(
                "listing the PersistentVolumeClaims of {name}"
            )))?;
        for claim in found.items {
            let claim_name = claim.name_any();
            match claims.delete(&claim_name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(error) if is_status(&error, 404) => {}
                Err(error) => {
                    return Err(kube_error(format!(
                        "deleting PersistentVolumeClaim {claim_name}"
                    ))(error));
                }
            }
        }
        "volumes deleted (spec.deleteVolumesOnDeletion)"
    } else {
        "volumes kept"
    };
    tracing::info!(cluster = %name, namespace, kept, "cluster deleted");
    publish(
        ctx,
        cluster,
        EventType::Normal,
        "Deleted",
        format!("cluster cleaned up; {kept}"),
    )
    .await;
    Ok(Action::await_change())
}
