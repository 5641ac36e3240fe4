//! The operator's own install objects, defined once: the RBAC rules (least privilege, as SPEC.md's
//! RBAC section), the ServiceAccount and the manager Deployment. `cargo xtask gen` writes them into
//! the kustomize base, the Helm chart's rule templates and the OLM ClusterServiceVersion, so the
//! three ways of installing grant exactly the same permissions.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{Value, json};

/// Name of the operator's ServiceAccount, ClusterRole, Role, bindings and Deployment.
pub const NAME: &str = "postgres-operator";
/// Namespace of the kustomize base.
pub const NAMESPACE: &str = "postgres-operator-system";
/// Container image repository of the operator (the tag is the workspace version).
pub const IMAGE_REPOSITORY: &str = "ghcr.io/keiailab/postgres-operator";
/// Port of the manager's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
pub const METRICS_PORT: i32 = 8080;
/// Release version (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Image repository of the instance manager (`pg-instance`), copied into PostgreSQL pods.
pub const INSTANCE_IMAGE_REPOSITORY: &str = "ghcr.io/keiailab/postgres-operator/pg-instance";

/// Environment variables of the manager container: the flags of `controllers::operator::Config`.
pub mod env {
    /// Log filter in the syntax of RUST_LOG.
    pub const LOG_LEVEL: &str = "LOG_LEVEL";
    /// Address of the HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub const HTTP_ADDR: &str = "HTTP_ADDR";
    /// The one namespace to watch; unset or empty means every namespace (needs cluster-wide rules).
    pub const WATCH_NAMESPACE: &str = "WATCH_NAMESPACE";
    /// The operator's own namespace (downward API): where its leader Lease lives.
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// `true` to run leader election on a Lease (required with more than one replica).
    pub const LEADER_ELECT: &str = "LEADER_ELECT";
    /// Image of the instance manager.
    pub const INSTANCE_MANAGER_IMAGE: &str = "INSTANCE_MANAGER_IMAGE";
}

/// Standard labels of every install object.
pub fn labels() -> Value {
    json!({
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/component": "manager",
        "app.kubernetes.io/part-of": NAME,
    })
}

/// Labels the Deployment selects its pods by (stable across upgrades).
pub fn selector_labels() -> Value {
    json!({
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/component": "manager",
    })
}

fn rule<R: AsRef<str>>(groups: &[&str], resources: &[R], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.as_ref().to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];
const MANAGE: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];
const STATUS: &[&str] = &["get", "update", "patch"];

/// Cluster-wide rules: the operator's own kinds (watched in every watched namespace),
/// ClusterImageCatalogs (read-only) and cert-manager Certificates.
pub fn cluster_rules() -> Vec<PolicyRule> {
    let crds = api::all_crds();
    let mut namespaced: Vec<String> = Vec::new();
    let mut cluster_scoped: Vec<String> = Vec::new();
    for crd in &crds {
        if crd.spec.scope == "Cluster" {
            cluster_scoped.push(crd.spec.names.plural.clone());
        } else {
            namespaced.push(crd.spec.names.plural.clone());
        }
    }
    let subresources = |suffix: &str| -> Vec<String> {
        namespaced
            .iter()
            .map(|plural| format!("{plural}/{suffix}"))
            .collect()
    };
    let status = subresources("status");
    let finalizers = subresources("finalizers");
    vec![
        rule(&[api::common::GROUP], &namespaced, MANAGE),
        rule(&[api::common::GROUP], &status, STATUS),
        rule(&[api::common::GROUP], &finalizers, &["update"]),
        rule(&[api::common::GROUP], &cluster_scoped, READ),
        rule(&["cert-manager.io"], &["certificates"], MANAGE),
        rule(&["cert-manager.io"], &["issuers", "clusterissuers"], READ),
    ]
}

/// Rules in every watched namespace (and the operator's own, for its leader Lease): the objects a
/// PostgresCluster is made of.
pub fn namespaced_rules() -> Vec<PolicyRule> {
    vec![
        rule(
            &[""],
            &[
                "pods",
                "services",
                "secrets",
                "configmaps",
                "persistentvolumeclaims",
                // The instance manager's identity: one ServiceAccount per cluster.
                "serviceaccounts",
            ],
            MANAGE,
        ),
        rule(&[""], &["pods/status"], STATUS),
        rule(&["apps"], &["statefulsets", "deployments"], MANAGE),
        rule(&["batch"], &["jobs"], MANAGE),
        // The pg-router of a sharded cluster: its autoscaler.
        rule(&["autoscaling"], &["horizontalpodautoscalers"], MANAGE),
        rule(&["policy"], &["poddisruptionbudgets"], MANAGE),
        rule(&["networking.k8s.io"], &["networkpolicies"], MANAGE),
        rule(&["coordination.k8s.io"], &["leases"], MANAGE),
        // The instance manager's Role (leases, its own pod): the operator can only grant what it holds.
        rule(
            &["rbac.authorization.k8s.io"],
            &["roles", "rolebindings"],
            MANAGE,
        ),
        rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
        rule(
            &["monitoring.coreos.com"],
            &["podmonitors", "prometheusrules"],
            MANAGE,
        ),
    ]
}

/// The rules as YAML-ready JSON.
pub fn rules_json(rules: &[PolicyRule]) -> Value {
    serde_json::to_value(rules).expect("PolicyRule serializes")
}

/// Pod template of the manager (shared by the kustomize base and the OLM CSV).
/// `watch_namespace` is the downward-API field path that names the watched namespace.
pub fn manager_pod_spec(watch_namespace: &str) -> Value {
    json!({
        "serviceAccountName": NAME,
        "automountServiceAccountToken": true,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "terminationGracePeriodSeconds": 10,
        "containers": [{
            "name": "manager",
            "image": format!("{IMAGE_REPOSITORY}:{VERSION}"),
            "imagePullPolicy": "IfNotPresent",
            "env": [
                {"name": env::LOG_LEVEL, "value": "info"},
                {"name": env::HTTP_ADDR, "value": format!("0.0.0.0:{METRICS_PORT}")},
                {"name": env::WATCH_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": watch_namespace}}},
                {"name": env::POD_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": env::LEADER_ELECT, "value": "true"},
                {"name": env::INSTANCE_MANAGER_IMAGE, "value": format!("{INSTANCE_IMAGE_REPOSITORY}:{VERSION}")}
            ],
            "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
            "resources": {
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "limits": {"memory": "256Mi"}
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]}
            }
        }]
    })
}

/// Deployment spec of the manager.
pub fn manager_deployment_spec(watch_namespace: &str) -> Value {
    json!({
        "replicas": 1,
        "selector": {"matchLabels": selector_labels()},
        "template": {
            "metadata": {"labels": labels()},
            "spec": manager_pod_spec(watch_namespace)
        }
    })
}

/// Objects of the kustomize base's `rbac/` folder: file name -> object.
pub fn kustomize_rbac() -> Vec<(&'static str, Value)> {
    let subject = json!([{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]);
    vec![
        (
            "service_account.yaml",
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": NAME, "labels": labels()}}),
        ),
        (
            "cluster_role.yaml",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": NAME, "labels": labels()},
                   "rules": rules_json(&cluster_rules())}),
        ),
        (
            "cluster_role_binding.yaml",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": NAME, "labels": labels()},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
                   "subjects": subject.clone()}),
        ),
        (
            "role.yaml",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": NAME, "labels": labels()},
                   "rules": rules_json(&namespaced_rules())}),
        ),
        (
            "role_binding.yaml",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": NAME, "labels": labels()},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
                   "subjects": subject}),
        ),
    ]
}

/// The kustomize base's manager: Deployment and metrics Service.
pub fn kustomize_manager() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": NAME, "labels": labels()},
            "spec": manager_deployment_spec("metadata.namespace")
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("{NAME}-metrics"), "labels": labels()},
            "spec": {
                "selector": selector_labels(),
                "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}]
            }
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_rules_cover_every_kind_and_never_grant_wildcards() {
        let rules = cluster_rules();
        let resources: Vec<String> = rules
            .iter()
            .flat_map(|r| r.resources.clone().unwrap_or_default())
            .collect();
        for crd in api::all_crds() {
            assert!(resources.contains(&crd.spec.names.plural));
        }
        for rule in rules.iter().chain(namespaced_rules().iter()) {
            assert!(!rule.verbs.iter().any(|v| v == "*"));
            assert!(!rule.resources.iter().flatten().any(|r| r == "*"));
            assert!(!rule.api_groups.iter().flatten().any(|g| g == "*"));
        }
        // ClusterImageCatalogs are read-only for the operator.
        let catalogs = rules
            .iter()
            .find(|r| {
                r.resources
                    .as_ref()
                    .is_some_and(|v| v.contains(&"clusterimagecatalogs".to_string()))
            })
            .unwrap();
        assert_eq!(catalogs.verbs, READ);
    }

    #[test]
    fn workloads_are_namespaced_only() {
        let cluster: Vec<String> = cluster_rules()
            .iter()
            .flat_map(|r| r.resources.clone().unwrap_or_default())
            .collect();
        for workload in ["statefulsets", "pods", "secrets", "leases", "jobs"] {
            assert!(!cluster.iter().any(|r| r == workload), "{workload}");
        }
    }
}
