//! What `spec.monitoring` asks of the Prometheus Operator: a PodMonitor that scrapes every
//! instance's `/metrics` (with `cluster` and `role` labels) when `podMonitor` is set (and one for
//! the pg-router pods of a sharded cluster, and one per Pooler of the cluster: [`pooler`]), and a
//! PrometheusRule with the alerts of [`alerts`] when `prometheusRule` is set; each is deleted when
//! switched off. Stages: build (pure) -> apply or delete.

pub mod alerts;
pub mod pooler;

use std::collections::BTreeMap;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

/// Field manager of the objects this module applies.
const FIELD_MANAGER: &str = "postgres-operator";

/// Why the monitoring objects could not be brought in line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Prometheus Operator's CRD is not installed.
    #[error(
        "spec.monitoring asks for a {kind} but the API server does not serve monitoring.coreos.com/v1 {kind}: install the Prometheus Operator CRDs or switch the option off"
    )]
    CrdMissing {
        /// PodMonitor or PrometheusRule.
        kind: &'static str,
    },
    /// Applying an object failed.
    #[error("applying {kind} {namespace}/{name}: {source}")]
    Apply {
        /// Kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Client error.
        #[source]
        source: kube::Error,
    },
    /// Deleting an object failed.
    #[error("deleting {kind} {namespace}/{name}: {source}")]
    Delete {
        /// Kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Client error.
        #[source]
        source: kube::Error,
    },
}

/// The API resource of a Prometheus Operator kind.
pub fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind))
}

fn metadata(cluster: &PostgresCluster) -> serde_json::Value {
    let name = cluster.name_any();
    let own = BTreeMap::from([
        (contract::LABEL_CLUSTER.to_string(), name.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            contract::MANAGED_BY.to_string(),
        ),
    ]);
    json!({
        "name": name,
        "namespace": cluster.namespace(),
        "labels": crate::inherited::labels_with(cluster, own),
        "annotations": crate::inherited::annotations(cluster).unwrap_or_default(),
        "ownerReferences": cluster.controller_owner_ref(&()).map(|owner| vec![owner]),
    })
}

/// The PodMonitor of a cluster: every instance pod's `status` port, `/metrics`, with the
/// cluster and role of the pod as labels.
pub fn pod_monitor(cluster: &PostgresCluster) -> serde_json::Value {
    let name = cluster.name_any();
    let label = |key: &str| {
        format!(
            "__meta_kubernetes_pod_label_{}",
            key.replace(['.', '/', '-'], "_")
        )
    };
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata(cluster),
        "spec": {
            "selector": {"matchLabels": {
                contract::LABEL_CLUSTER: name,
                "app.kubernetes.io/name": "postgresql",
            }},
            "podMetricsEndpoints": [{
                "port": contract::PORT_NAME_STATUS,
                "path": "/metrics",
                "relabelings": [
                    {"sourceLabels": [label(contract::LABEL_CLUSTER)], "targetLabel": "cluster"},
                    {"sourceLabels": [label(contract::LABEL_ROLE)], "targetLabel": "role"},
                ],
            }],
        },
    })
}

/// Port name of the `/metrics` endpoint of pg-router and PgBouncer pods.
pub const METRICS_PORT: &str = "metrics";

/// `app.kubernetes.io/name` of the pg-router pods of a sharded cluster.
pub const ROUTER_APP_NAME: &str = "pg-router";

/// The PodMonitor `<cluster>-router` of a sharded cluster's pg-router pods (labelled with
/// [`contract::LABEL_ROUTER`] and `app.kubernetes.io/name: pg-router`): their `metrics` port, with the cluster as a
/// label (what the router dashboard selects on).
pub fn router_pod_monitor(cluster: &PostgresCluster) -> serde_json::Value {
    let name = cluster.name_any();
    let mut metadata = metadata(cluster);
    metadata["name"] = json!(format!("{name}-router"));
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {
                contract::LABEL_ROUTER: name,
                "app.kubernetes.io/name": ROUTER_APP_NAME,
            }},
            "podMetricsEndpoints": [{
                "port": METRICS_PORT,
                "path": "/metrics",
                "relabelings": [{"targetLabel": "cluster", "replacement": name}],
            }],
        },
    })
}

/// The PrometheusRule of a cluster.
pub fn prometheus_rule(cluster: &PostgresCluster) -> serde_json::Value {
    let namespace = cluster.namespace().unwrap_or_default();
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata(cluster),
        "spec": {"groups": [alerts::rule_group(&namespace, &cluster.name_any())]},
    })
}

/// Applies or deletes the PodMonitor (the cluster's and, for a sharded cluster, its router's)
/// and the PrometheusRule of `cluster` as `spec.monitoring` says.
pub async fn reconcile(client: &Client, cluster: &PostgresCluster) -> Result<(), Error> {
    let monitoring = &cluster.spec.monitoring;
    let namespace = cluster.namespace().unwrap_or_default();
    // A sharded cluster has no instances of its own: its shards (child clusters) have their
    // PodMonitors and rules; the parent has its router's.
    let sharded = cluster.spec.sharding.is_some();
    let wanted = [
        (
            "PodMonitor",
            monitoring.pod_monitor && !sharded,
            pod_monitor(cluster),
        ),
        (
            "PodMonitor",
            monitoring.pod_monitor && sharded,
            router_pod_monitor(cluster),
        ),
        (
            "PrometheusRule",
            monitoring.prometheus_rule && !sharded,
            prometheus_rule(cluster),
        ),
    ];
    for (kind, enabled, desired) in wanted {
        apply_or_delete(client, &namespace, kind, enabled, desired).await?;
    }
    Ok(())
}

/// Server-side applies `desired` (a `monitoring.coreos.com/v1` object of `kind`) when `enabled`,
/// else deletes the object of its name if it exists.
pub async fn apply_or_delete(
    client: &Client,
    namespace: &str,
    kind: &'static str,
    enabled: bool,
    desired: serde_json::Value,
) -> Result<(), Error> {
    let name = desired["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource(kind));
    if enabled {
        let object: DynamicObject =
            serde_json::from_value(desired).expect("built objects deserialize");
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(|source| match &source {
            kube::Error::Api(status) if status.code == 404 => Error::CrdMissing { kind },
            _ => Error::Apply {
                kind,
                namespace: namespace.to_string(),
                name: name.clone(),
                source,
            },
        })?;
        return Ok(());
    }
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        // Gone already, or the CRD is not installed (then no such object can exist).
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete {
            kind,
            namespace: namespace.to_string(),
            name,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> PostgresCluster {
        let mut cluster: PostgresCluster =
            serde_yaml::from_str(include_str!("../../../examples/postgrescluster.yaml")).unwrap();
        cluster.metadata.name = Some("db".into());
        cluster.metadata.namespace = Some("prod".into());
        cluster.metadata.uid = Some("u1".into());
        cluster.spec.monitoring.pod_monitor = true;
        cluster
    }

    #[test]
    fn pod_monitor_scrapes_the_status_port_with_cluster_and_role_labels() {
        let monitor = pod_monitor(&cluster());
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["port"], "status");
        assert_eq!(
            endpoint["relabelings"][0]["sourceLabels"][0],
            "__meta_kubernetes_pod_label_postgres_keiailab_io_cluster"
        );
        assert_eq!(endpoint["relabelings"][0]["targetLabel"], "cluster");
        assert_eq!(monitor["metadata"]["ownerReferences"][0]["name"], "db");
    }
}
