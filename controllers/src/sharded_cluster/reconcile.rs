//! The acting half of a sharded PostgresCluster, in stages: credentials (one superuser for every
//! shard, so one router login reaches them all), the child clusters, the initial ShardRanges
//! (created once, never overwritten: they are the source of truth), the router objects, status.

use std::collections::BTreeMap;
use std::time::Duration;

use api::common::{condition, new_condition, set_condition};
use api::contract;
use api::postgres_cluster::{PostgresCluster, PostgresClusterStatus, ShardingSpec};
use api::postgres_user::PostgresUser;
use api::sharding::ShardRange;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::builders;
use crate::postgres_cluster::builders::{credentials_secret, generate_password};
use crate::postgres_cluster::{Context, Error, FIELD_MANAGER, kube_error};

/// Requeue while shards or routers are not all ready.
const BUSY_REQUEUE: Duration = Duration::from_secs(10);

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

/// Creates `object` unless one of that name exists (409 is success: the existing one wins).
async fn create_once<K>(api: &Api<K>, object: &K) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(kube_error(format!("creating {} {name}", K::kind(&())))(
            error,
        )),
    }
}

/// Credentials stage: the parent's superuser Secret, and a copy of it for every shard made before
/// the shard's cluster exists (the single-shard reconciler keeps a Secret it finds). A
/// ShardSplitJob calls it for the shard it provisions.
pub async fn ensure_credentials(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
    shards: impl IntoIterator<Item = i32>,
) -> Result<(), Error> {
    let parent = cluster.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = contract::superuser_secret(&parent);
    let existing = secrets
        .get_opt(&name)
        .await
        .map_err(kube_error(format!("reading Secret {name}")))?;
    let password = match existing
        .and_then(|secret| secret.data)
        .and_then(|data| data.get("password").cloned())
    {
        Some(password) => String::from_utf8_lossy(&password.0).into_owned(),
        None => {
            let password = generate_password();
            let secret = credentials_secret(cluster, name, contract::SUPERUSER, password.clone());
            create_once(&secrets, &secret).await?;
            // Another reconciliation may have won the race: read back what is stored.
            let stored = secrets
                .get(&contract::superuser_secret(&parent))
                .await
                .map_err(kube_error("reading the superuser Secret"))?;
            stored
                .data
                .and_then(|data| data.get("password").cloned())
                .map(|p| String::from_utf8_lossy(&p.0).into_owned())
                .unwrap_or(password)
        }
    };
    for index in shards {
        let child = builders::shard_cluster_name(&parent, &builders::shard_name(index));
        let secret = credentials_secret(
            cluster,
            contract::superuser_secret(&child),
            contract::SUPERUSER,
            password.clone(),
        );
        create_once(&secrets, &secret).await?;
    }
    Ok(())
}

/// Ranges stage: the initial ShardRanges of every table group that has none yet.
async fn ensure_ranges(
    cluster: &PostgresCluster,
    sharding: &ShardingSpec,
    ctx: &Context,
    namespace: &str,
) -> Result<usize, Error> {
    let api: Api<ShardRange> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = api
        .list(&kube::api::ListParams::default().labels(&format!(
            "{}={}",
            contract::LABEL_CLUSTER,
            cluster.name_any()
        )))
        .await
        .map_err(kube_error("listing ShardRanges"))?;
    let mut created = 0;
    for group in &sharding.table_groups {
        // Once a group has ranges, splits own them: never recreate one the operator removed.
        if existing
            .items
            .iter()
            .any(|range| range.spec.table_group == group.name)
        {
            continue;
        }
        for range in builders::initial_ranges(cluster, sharding, group) {
            if create_once(&api, &range).await? {
                created += 1;
            }
        }
    }
    Ok(created)
}

/// Router stage: ServiceAccount, Role, RoleBinding, Deployment, Service, and the autoscaler
/// when asked for (removed when no longer asked for).
/// With TLS on: a hash of the server certificate the routers are to serve, once its Secret
/// exists (until then the routers run without TLS for clients, and the next pass adds it).
async fn router_certificate_hash(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Option<String>, Error> {
    if !crate::tls::pod::enabled(cluster) {
        return Ok(None);
    }
    let name = contract::tls_server_secret(&cluster.name_any());
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(kube_error(format!("reading Secret {name}")))?;
    Ok(secret
        .and_then(|secret| crate::tls::text(&secret, contract::tls_keys::CERTIFICATE))
        .map(|pem| {
            format!(
                "{:016x}",
                crate::postgres_cluster::builders::fnv1a64(pem.as_bytes())
            )
        }))
}

async fn apply_router(
    cluster: &PostgresCluster,
    sharding: &ShardingSpec,
    ctx: &Context,
    namespace: &str,
) -> Result<i32, Error> {
    let client = &ctx.client;
    apply_object::<ServiceAccount>(
        &Api::namespaced(client.clone(), namespace),
        &builders::router_service_account(cluster),
    )
    .await?;
    // The Role names the password Secrets the router watches; a PostgresUser change
    // reconciles the cluster again (see the controller's watches).
    let users = Api::<PostgresUser>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .map_err(kube_error(format!(
            "listing the PostgresUsers of {namespace}"
        )))?
        .items;
    apply_object::<Role>(
        &Api::namespaced(client.clone(), namespace),
        &builders::router_role(cluster, &users),
    )
    .await?;
    apply_object::<RoleBinding>(
        &Api::namespaced(client.clone(), namespace),
        &builders::router_role_binding(cluster),
    )
    .await?;
    let mut desired = builders::router_deployment(cluster, sharding);
    if let Some(hash) = router_certificate_hash(cluster, ctx, namespace).await? {
        builders::add_router_tls(&mut desired, &cluster.name_any(), &hash);
    }
    let deployment =
        apply_object::<Deployment>(&Api::namespaced(client.clone(), namespace), &desired).await?;
    apply_object::<Service>(
        &Api::namespaced(client.clone(), namespace),
        &builders::router_service(cluster),
    )
    .await?;
    let autoscalers: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), namespace);
    match builders::router_autoscaler(cluster, sharding) {
        Some(autoscaler) => {
            apply_object(&autoscalers, &autoscaler).await?;
        }
        None => {
            let name = builders::router_name(&cluster.name_any());
            match autoscalers.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    return Err(kube_error(format!(
                        "deleting HorizontalPodAutoscaler {name}"
                    ))(error));
                }
            }
        }
    }
    Ok(deployment
        .status
        .and_then(|status| status.ready_replicas)
        .unwrap_or(0))
}

/// The parent's status from its shards' and the router's. `routers_waiting` says why router
/// pods do not run (see [`crate::pods::stuck`]).
pub fn desired_status(
    cluster: &PostgresCluster,
    shards: &[Option<PostgresCluster>],
    routers_ready: i32,
    routers_waiting: &str,
) -> PostgresClusterStatus {
    let mut status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.metadata.generation;
    let phase_of = |child: &Option<PostgresCluster>| {
        child
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.phase.clone())
    };
    let healthy = shards
        .iter()
        .filter(|child| phase_of(child).as_deref() == Some("Healthy"))
        .count();
    let degraded: Vec<String> = shards
        .iter()
        .filter(|child| phase_of(child).as_deref() == Some("Degraded"))
        .filter_map(|child| child.as_ref().map(|c| c.name_any()))
        .collect();
    status.ready_instances = shards
        .iter()
        .filter_map(|child| child.as_ref()?.status.as_ref().map(|s| s.ready_instances))
        .sum();
    status.observed_generation = generation;
    let all = shards.len();
    let (phase, ready, reason, message) = if !degraded.is_empty() {
        (
            "Degraded",
            false,
            "ShardDegraded",
            format!(
                "shard clusters {} are Degraded: see their conditions",
                degraded.join(", ")
            ),
        )
    } else if healthy < all || routers_ready == 0 {
        // What each shard that is not healthy yet says about itself (its own Ready message),
        // then why router pods do not run.
        let shards_waiting: String = shards
            .iter()
            .filter(|child| phase_of(child).as_deref() != Some("Healthy"))
            .flatten()
            .filter_map(|child| {
                let status = child.status.as_ref()?;
                let ready = api::common::find_condition(&status.conditions, condition::READY)?;
                Some(format!(
                    "; {}: {}",
                    child.name_any(),
                    crate::pods::one_line(&ready.message, crate::pods::MAX_ERROR_CHARS)
                ))
            })
            .collect();
        (
            "Creating",
            false,
            "ShardsStarting",
            format!(
                "{healthy} of {all} shards healthy, {routers_ready} routers ready{shards_waiting}{routers_waiting}"
            ),
        )
    } else {
        (
            "Healthy",
            true,
            "ShardsHealthy",
            format!("{all} shards healthy, {routers_ready} routers ready"),
        )
    };
    status.phase = Some(phase.to_string());
    set_condition(
        &mut status.conditions,
        new_condition(condition::READY, ready, reason, message.clone(), generation),
    );
    set_condition(
        &mut status.conditions,
        new_condition(
            condition::DEGRADED,
            phase == "Degraded",
            if phase == "Degraded" {
                reason
            } else {
                "Reconciled"
            },
            if phase == "Degraded" {
                message
            } else {
                String::new()
            },
            generation,
        ),
    );
    status
}

/// Brings a sharded cluster's owned objects in line with its spec and writes its status.
pub async fn apply(
    cluster: &PostgresCluster,
    sharding: &ShardingSpec,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    ensure_credentials(cluster, ctx, &namespace, 0..sharding.shards).await?;

    // The router serves the cluster's TLS: the same Secrets as a single-shard cluster, with
    // the `-router` Service among the certificate's names. Its CA is also every shard's
    // (`tls::sharded_parent`), so it comes before the shards.
    let tls = crate::tls::ensure(cluster, ctx, &namespace)
        .await
        .map_err(|source| Error::Tls {
            name: name.clone(),
            source,
        })?;
    let tls = match tls {
        Ok(outcome) => outcome,
        Err(problem) => {
            tracing::warn!(cluster = %name, namespace, ?problem, "the router's TLS certificate cannot be issued yet");
            crate::tls::Outcome::default()
        }
    };

    // Shards: one child PostgresCluster each, reconciled by the single-shard reconciler.
    let clusters: Api<PostgresCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut shards = Vec::new();
    for index in 0..sharding.shards {
        let child = builders::child_cluster(cluster, index);
        shards.push(Some(apply_object(&clusters, &child).await?));
    }

    let created = ensure_ranges(cluster, sharding, ctx, &namespace).await?;
    if created > 0 {
        tracing::info!(cluster = %name, namespace, created, "initial ShardRanges written");
    }
    let routers_ready = apply_router(cluster, sharding, ctx, &namespace).await?;
    // The router's PodMonitor (the shards have their own, from their copy of the spec).
    if let Err(error) = crate::monitoring::reconcile(&ctx.client, cluster).await {
        tracing::warn!(cluster = %name, namespace, %error, "monitoring objects of the router");
    }

    let routers_waiting = if routers_ready < sharding.router.replicas {
        let selector = format!("{}={name}", builders::LABEL_ROUTER);
        crate::pods::stuck(&ctx.client, &namespace, &selector).await
    } else {
        String::new()
    };
    let mut desired = desired_status(cluster, &shards, routers_ready, &routers_waiting);
    // The CA the shards' certificates come from is renewed here (see `tls::rotation`).
    if let Some((status, reason, message)) = tls.certificate_authority {
        set_condition(
            &mut desired.conditions,
            new_condition(
                crate::tls::rotation::CERTIFICATE_AUTHORITY,
                status,
                reason,
                message,
                cluster.metadata.generation,
            ),
        );
    }
    let previous = cluster.status.clone().unwrap_or_default();
    let comparable = |s: &PostgresClusterStatus| {
        let conditions: BTreeMap<String, (String, String, String)> = s
            .conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    (c.status.clone(), c.reason.clone(), c.message.clone()),
                )
            })
            .collect();
        (
            s.phase.clone(),
            s.ready_instances,
            s.observed_generation,
            conditions,
        )
    };
    if comparable(&previous) != comparable(&desired) {
        let patch = json!({
            "apiVersion": PostgresCluster::api_version(&()),
            "kind": PostgresCluster::kind(&()),
            "status": desired,
        });
        clusters
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(kube_error(format!(
                "writing the status of PostgresCluster {name}"
            )))?;
    }
    let requeue = if desired.phase.as_deref() == Some("Healthy") {
        ctx.settings.resync
    } else {
        BUSY_REQUEUE
    };
    // Back for the next certificate or CA renewal step when it comes first.
    Ok(Action::requeue(match tls.renew_in {
        Some(renew_in) => requeue.min(renew_in.max(Duration::from_secs(1))),
        None => requeue,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::PostgresClusterSpec;

    fn child(name: &str, phase: &str, ready_message: &str) -> Option<PostgresCluster> {
        let mut child = PostgresCluster::new(name, PostgresClusterSpec::with_image(1, "pg:18"));
        child.status = Some(PostgresClusterStatus {
            phase: Some(phase.into()),
            conditions: vec![new_condition(
                condition::READY,
                phase == "Healthy",
                "InstancesNotReady",
                ready_message.to_string(),
                Some(1),
            )],
            ..PostgresClusterStatus::default()
        });
        Some(child)
    }

    #[test]
    fn a_starting_sharded_cluster_says_what_its_shards_and_routers_wait_for() {
        let parent = PostgresCluster::new("shop", PostgresClusterSpec::with_image(1, "pg:18"));
        let shards = [
            child("shop-0", "Healthy", "1 of 1 instances ready"),
            child(
                "shop-1",
                "Creating",
                "creating instances: 0 of 1 ready; shop-1-0: not scheduled: 0/1 nodes are available",
            ),
        ];
        let status = desired_status(
            &parent,
            &shards,
            0,
            "; shop-router-abc: container pg-router: ImagePullBackOff",
        );
        let ready = api::common::find_condition(&status.conditions, condition::READY).unwrap();
        assert_eq!(
            ready.message,
            "1 of 2 shards healthy, 0 routers ready; shop-1: creating instances: 0 of 1 ready; \
             shop-1-0: not scheduled: 0/1 nodes are available; shop-router-abc: container \
             pg-router: ImagePullBackOff"
        );
        assert_eq!(status.phase.as_deref(), Some("Creating"));
    }
}
