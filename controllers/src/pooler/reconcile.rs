//! The acting half of the Pooler reconciler, in stages: dereference the cluster and the auth
//! Secret, validate the spec, build the owned objects, apply them, update the status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::pooler::{ClientTlsMode, Pooler};
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::builders::{self, Target};
use super::status::{self, Outcome};
use super::{CONTROLLER, Error};
use crate::postgres_cluster::builders::generate_password;
use crate::postgres_cluster::{Context, FIELD_MANAGER};
use crate::tls::pooler as tls;

/// Requeue while pods are not all ready, or while blocked (a cluster may appear).
const BUSY_REQUEUE: Duration = Duration::from_secs(10);

/// Reconciles one Pooler (entry point of the controller).
pub async fn reconcile(pooler: Arc<Pooler>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_stages(&pooler, &ctx).await;
    ctx.metrics
        .observe_reconcile(CONTROLLER, started.elapsed(), result.is_ok());
    result
}

async fn reconcile_stages(pooler: &Pooler, ctx: &Context) -> Result<Action, Error> {
    let name = pooler.name_any();
    let namespace = pooler
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let dereference = |source| Error::Dereference {
        pooler: name.clone(),
        source,
    };

    // Dereference: the cluster must exist; the auth Secret is created once per cluster.
    let cluster_name = &pooler.spec.cluster.name;
    let cluster = Api::<PostgresCluster>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(cluster_name)
        .await
        .map_err(dereference)?;
    let Some(cluster) = cluster else {
        let outcome = Outcome::Blocked {
            reason: "ClusterNotFound".to_string(),
            message: format!(
                "PostgresCluster {cluster_name} not found in namespace {namespace}: create it or fix spec.cluster.name"
            ),
        };
        return finish(pooler, ctx, &namespace, outcome, None).await;
    };
    // PgBouncer logs in as the auth role with this cluster's password, which a replica cluster's
    // read-only copy of its source's roles does not have: it could serve nobody yet.
    if crate::postgres_cluster::replica::is_replica_cluster(&cluster) {
        let outcome = Outcome::Blocked {
            reason: "ReplicaCluster".to_string(),
            message: format!(
                "PostgresCluster {cluster_name} is a replica cluster (spec.replica.enabled): it is read-only and its roles are its source's, so PgBouncer could not log in; the Pooler is deployed once the cluster is promoted"
            ),
        };
        return finish(pooler, ctx, &namespace, outcome, None).await;
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret_name = builders::auth_secret(cluster_name);
    if secrets
        .get_metadata_opt(&secret_name)
        .await
        .map_err(dereference)?
        .is_none()
    {
        let secret = builders::auth_secret_object(pooler, &generate_password());
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            // Another Pooler of the same cluster created it first.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => return Err(dereference(source)),
        }
    }

    // Validate.
    let client_tls = builders::validate(pooler)
        .map_err(|invalid| invalid.to_string())
        .and_then(|()| tls::client_tls_mode(pooler, &cluster));
    let client_tls = match client_tls {
        Ok(mode) => mode,
        Err(message) => {
            let outcome = Outcome::Blocked {
                reason: "InvalidSpec".to_string(),
                message,
            };
            return finish(pooler, ctx, &namespace, outcome, None).await;
        }
    };

    // Dereference the Pooler's own certificate (issued from the cluster's CA) when clients
    // speak TLS: PgBouncer cannot start with client TLS and no certificate.
    let mut certificate = None;
    let mut renew_in = None;
    if client_tls != ClientTlsMode::Disabled {
        let state = tls::ensure_certificate(pooler, &cluster, ctx, &namespace)
            .await
            .map_err(|source| Error::Tls {
                pooler: name.clone(),
                source,
            })?;
        let (reason, message) = match state {
            tls::CertificateState::Ready {
                hash,
                renew_in: left,
            } => {
                certificate = Some(hash);
                renew_in = left;
                (None, String::new())
            }
            tls::CertificateState::Pending(message) => (Some("CertificatePending"), message),
            tls::CertificateState::Refused(message) => (Some("CertificateRefused"), message),
        };
        if let Some(reason) = reason {
            let outcome = Outcome::Blocked {
                reason: reason.to_string(),
                message,
            };
            return finish(pooler, ctx, &namespace, outcome, None).await;
        }
    }

    // Build.
    let mut ini = builders::pgbouncer_ini(pooler, &Target::for_pooler(pooler));
    ini.push_str(&tls::server_tls_lines(&cluster));
    ini.push_str(&tls::client_tls_lines(client_tls));
    let hash = builders::config_hash(&ini);
    let config_map = builders::config_map(pooler, &ini);
    let mut deployment = builders::deployment(
        pooler,
        builders::DEFAULT_IMAGE,
        &ctx.settings.instance_manager_image,
        &hash,
    );
    tls::mount_cluster_ca(&mut deployment, cluster_name);
    if let Some(hash) = &certificate {
        tls::mount_pooler_certificate(&mut deployment, pooler, hash);
    }
    let service = builders::service(pooler);

    // Apply.
    apply::<ConfigMap>(
        pooler,
        &Api::namespaced(ctx.client.clone(), &namespace),
        &config_map,
    )
    .await?;
    let deployment = apply::<Deployment>(
        pooler,
        &Api::namespaced(ctx.client.clone(), &namespace),
        &deployment,
    )
    .await?;
    apply::<Service>(
        pooler,
        &Api::namespaced(ctx.client.clone(), &namespace),
        &service,
    )
    .await?;

    crate::monitoring::pooler::reconcile(ctx, pooler, Some(&cluster)).await;

    let ready = deployment
        .status
        .as_ref()
        .and_then(|status| status.ready_replicas)
        .unwrap_or(0);
    let waiting = if ready < pooler.spec.instances {
        let selector = format!("{}={}", builders::LABEL_POOLER, pooler.name_any());
        crate::pods::stuck(&ctx.client, &namespace, &selector).await
    } else {
        String::new()
    };
    finish(
        pooler,
        ctx,
        &namespace,
        Outcome::Applied { ready, waiting },
        renew_in,
    )
    .await
}

/// Server-side applies `object` with the operator's field manager.
async fn apply<K>(pooler: &Pooler, api: &Api<K>, object: &K) -> Result<K, Error>
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
    .map_err(|source| Error::Apply {
        pooler: pooler.name_any(),
        what: format!("{} {name}", K::kind(&())),
        source,
    })
}

/// Update-status stage: writes the status when it changed, publishes a warning event for a
/// blocked Pooler, and decides when to look again (by `renew_in` at the latest, when the
/// Pooler's certificate is due for renewal).
async fn finish(
    pooler: &Pooler,
    ctx: &Context,
    namespace: &str,
    outcome: Outcome,
    renew_in: Option<Duration>,
) -> Result<Action, Error> {
    let desired = status::desired_status(pooler, &outcome);
    if let Outcome::Blocked { reason, message } = &outcome {
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.clone(),
            note: Some(message.clone()),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &pooler.object_ref(&())).await {
            tracing::warn!(pooler = %pooler.name_any(), %error, "publishing an event failed");
        }
    }
    let unchanged = pooler.status.as_ref().is_some_and(|current| {
        current.ready_instances == desired.ready_instances
            && current.endpoint == desired.endpoint
            && current.observed_generation == desired.observed_generation
            && current
                .conditions
                .iter()
                .zip(&desired.conditions)
                .all(|(a, b)| {
                    a.status == b.status && a.reason == b.reason && a.message == b.message
                })
            && current.conditions.len() == desired.conditions.len()
    });
    if !unchanged {
        Api::<Pooler>::namespaced(ctx.client.clone(), namespace)
            .patch_status(
                &pooler.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": desired })),
            )
            .await
            .map_err(|source| Error::UpdateStatus {
                pooler: pooler.name_any(),
                source,
            })?;
    }
    let next = match outcome {
        Outcome::Applied { ready, .. } if ready >= pooler.spec.instances => ctx.settings.resync,
        _ => BUSY_REQUEUE,
    };
    let next = renew_in.map_or(next, |left| next.min(left.max(Duration::from_secs(1))));
    Ok(Action::requeue(next))
}
