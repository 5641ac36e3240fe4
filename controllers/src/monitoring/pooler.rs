//! The PodMonitor of a Pooler: when the Pooler's cluster has `spec.monitoring.podMonitor`, a
//! PodMonitor `<pooler>-pooler` scrapes the PgBouncer pods' `metrics` port with `pooler` and
//! `cluster` labels (what the pooler dashboard selects on); otherwise it is deleted. Called once
//! per Pooler reconcile; a failure is an event on the Pooler, never a failed reconcile (the
//! PgBouncer objects do not depend on it).

use api::pooler::Pooler;
use api::postgres_cluster::PostgresCluster;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{METRICS_PORT, apply_or_delete};
use crate::pooler::builders::LABEL_POOLER;
use crate::postgres_cluster::Context;

/// The PodMonitor of `pooler`, a Pooler of `cluster`.
pub fn pod_monitor(pooler: &Pooler, cluster: &str) -> serde_json::Value {
    let name = pooler.name_any();
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": format!("{name}-pooler"),
            "namespace": pooler.namespace(),
            "labels": {
                LABEL_POOLER: name,
                "app.kubernetes.io/managed-by": api::contract::MANAGED_BY,
            },
            "ownerReferences": pooler.controller_owner_ref(&()).map(|owner| vec![owner]),
        },
        "spec": {
            "selector": {"matchLabels": {LABEL_POOLER: name}},
            "podMetricsEndpoints": [{
                "port": METRICS_PORT,
                "path": "/metrics",
                "relabelings": [
                    {"targetLabel": "pooler", "replacement": name},
                    {"targetLabel": "cluster", "replacement": cluster},
                ],
            }],
        },
    })
}

/// Applies or deletes the PodMonitor of `pooler` as its cluster's `spec.monitoring.podMonitor`
/// says (deleted while the cluster does not exist).
pub async fn reconcile(ctx: &Context, pooler: &Pooler, cluster: Option<&PostgresCluster>) {
    let enabled = cluster.is_some_and(|cluster| cluster.spec.monitoring.pod_monitor);
    let desired = pod_monitor(pooler, &pooler.spec.cluster.name);
    let namespace = pooler.namespace().unwrap_or_default();
    let Err(error) = apply_or_delete(&ctx.client, &namespace, "PodMonitor", enabled, desired).await
    else {
        return;
    };
    tracing::warn!(pooler = %pooler.name_any(), %namespace, %error, "pooler PodMonitor");
    let event = Event {
        type_: EventType::Warning,
        reason: "MonitoringFailed".to_string(),
        note: Some(error.to_string()),
        action: "ApplyPodMonitor".to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &pooler.object_ref(&())).await {
        tracing::warn!(pooler = %pooler.name_any(), %error, "publishing an event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pooler_pod_monitor_selects_the_pooler_pods_and_labels_pooler_and_cluster() {
        let mut pooler: Pooler = serde_json::from_value(json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "Pooler",
            "metadata": {"name": "pool", "namespace": "prod", "uid": "u1"},
            "spec": {"cluster": {"name": "db"}, "type": "rw"},
        }))
        .unwrap();
        pooler.metadata.uid = Some("u1".into());
        let monitor = pod_monitor(&pooler, "db");
        assert_eq!(monitor["metadata"]["name"], "pool-pooler");
        assert_eq!(
            monitor["spec"]["selector"]["matchLabels"][LABEL_POOLER],
            "pool"
        );
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["port"], "metrics");
        assert_eq!(endpoint["relabelings"][1]["replacement"], "db");
        assert_eq!(monitor["metadata"]["ownerReferences"][0]["name"], "pool");
    }
}
