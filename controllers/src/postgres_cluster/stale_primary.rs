//! A primary that lost the network keeps its `role=primary` label: its instance manager cannot
//! reach the API server to take it off. Once another instance holds the Lease and has labelled
//! itself primary, the operator relabels the old pod `unknown`, so that the `-rw` Service has one
//! endpoint at once rather than two until the old pod's readiness probe fails (15 s by default),
//! and the cluster's status names the right primary.

use std::time::Duration;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::instances::{self, InstanceView};
use super::reconcile::{is_status, publish};
use super::{Context, Error, kube_error};

/// Takes each stale primary of `instances` ([`instances::stale_primaries`]) for `unknown` and
/// not ready in `instances` at once, and relabels its pod so (with a Warning event) once the
/// holder has held the Lease for a whole Lease duration: in a switchover the old primary's
/// instance manager relabels itself once PostgreSQL runs as a replica, a second or two after
/// the handover. Returns when to look again while that wait runs.
pub async fn release(
    cluster: &PostgresCluster,
    ctx: &Context,
    api: &Api<Pod>,
    pods: &[Pod],
    instances: &mut [InstanceView],
    lease: Option<&Lease>,
) -> Result<Option<Duration>, Error> {
    let spec = lease.and_then(|lease| lease.spec.as_ref());
    let holder = spec.and_then(|spec| spec.holder_identity.as_deref());
    let stale: Vec<String> = instances::stale_primaries(instances, holder)
        .iter()
        .map(|instance| instance.name.clone())
        .collect();
    if stale.is_empty() {
        return Ok(None);
    }
    // In this pass's view, at once: the holder is the primary, the stale claim neither primary
    // nor ready (the status names the new primary; no step takes the old one for it).
    for instance in instances.iter_mut().filter(|i| stale.contains(&i.name)) {
        instance.role = Some(contract::role::UNKNOWN.to_string());
        instance.ready = false;
    }
    let grace = Duration::from_secs(cluster.spec.failover.lease_duration_seconds.max(1) as u64);
    let held_for = spec
        .and_then(|spec| spec.acquire_time.as_ref())
        .map(|acquired| {
            let seconds = Timestamp::now().duration_since(acquired.0).as_secs().max(0);
            Duration::from_secs(seconds as u64)
        })
        .unwrap_or(grace);
    if held_for < grace {
        return Ok(Some(grace - held_for + Duration::from_millis(200)));
    }
    let holder = holder.unwrap_or_default();
    for name in stale {
        // Only the pod as read: had its instance manager relabelled it since (a switchover's
        // old primary, a second late), the API server refuses the patch (409) and the change
        // of label brings the next reconcile.
        let version = pods
            .iter()
            .find(|pod| pod.metadata.name.as_deref() == Some(name.as_str()))
            .and_then(|pod| pod.metadata.resource_version.clone());
        let patch = json!({"metadata": {
            "resourceVersion": version,
            "labels": {(contract::LABEL_ROLE): contract::role::UNKNOWN},
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(error) if is_status(&error, 404) || is_status(&error, 409) => continue,
            Err(error) => {
                return Err(kube_error(format!("relabelling stale primary {name}"))(
                    error,
                ));
            }
        }
        let note = format!(
            "{name} is still labelled primary but {holder} has held the Lease for {} s: its \
             instance manager has not relabelled it (out of reach of the API server, or still \
             restarting as a replica); relabelled {} so that the -rw Service leaves it until it \
             reports again",
            held_for.as_secs(),
            contract::role::UNKNOWN
        );
        tracing::warn!(cluster = %cluster.name_any(), instance = %name, %holder, "stale primary relabelled");
        publish(ctx, cluster, EventType::Warning, "StalePrimary", note).await;
    }
    Ok(None)
}
