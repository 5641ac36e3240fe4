//! What `spec.monitoring` asks of the Prometheus Operator: a PodMonitor that scrapes every
//! instance's `/metrics` (with `cluster` and `role` labels) when `podMonitor` is set, and a
//! PrometheusRule with the alerts of [`alerts`] when `prometheusRule` is set; each is deleted when
//! switched off. Stages: build (pure) -> apply or delete.

pub mod alerts;

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
    json!({
        "name": name,
        "namespace": cluster.namespace(),
        "labels": {
            contract::LABEL_CLUSTER: name,
            "app.kubernetes.io/managed-by": contract::MANAGED_BY,
        },
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

/// Applies or deletes the PodMonitor and the PrometheusRule as `spec.monitoring` says.
pub async fn reconcile(client: &Client, cluster: &PostgresCluster) -> Result<(), Error> {
    let monitoring = &cluster.spec.monitoring;
    let wanted = [
        ("PodMonitor", monitoring.pod_monitor, pod_monitor(cluster)),
        (
            "PrometheusRule",
            monitoring.prometheus_rule,
            prometheus_rule(cluster),
        ),
    ];
    let namespace = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    for (kind, enabled, desired) in wanted {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &namespace, &resource(kind));
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
                    namespace: namespace.clone(),
                    name: name.clone(),
                    source,
                },
            })?;
        } else {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                // Already gone, or the CRD is not installed: nothing to remove.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(source) => {
                    return Err(Error::Delete {
                        kind,
                        namespace: namespace.clone(),
                        name: name.clone(),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
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
