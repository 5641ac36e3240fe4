//! Pooler: a PgBouncer deployment in front of a PostgresCluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::ClusterReference;

/// PgBouncer in front of a cluster's read-write or read-only Service.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "Pooler",
    namespaced,
    status = "PoolerStatus",
    shortname = "pgpooler",
    category = "postgres",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.pgbouncer.poolMode"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyInstances"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PoolerSpec {
    /// Cluster to pool connections for.
    pub cluster: ClusterReference,
    /// `rw` pools to the primary, `ro` to the replicas.
    #[serde(default, rename = "type")]
    pub type_: PoolerType,
    /// Number of PgBouncer pods.
    #[serde(default = "default_instances")]
    #[schemars(range(min = 1, max = 100))]
    pub instances: i32,
    /// PgBouncer settings.
    #[serde(default)]
    pub pgbouncer: PgBouncerSpec,
    /// Resources of the PgBouncer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// How the Pooler's Service is exposed: ClusterIP (the default), NodePort or LoadBalancer,
    /// with annotations for the cloud's load balancer and the client ranges it admits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<crate::common::ServiceExposure>,
}

fn default_instances() -> i32 {
    2
}

/// Which Service of the cluster the pooler targets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolerType {
    /// The primary.
    #[default]
    Rw,
    /// The replicas.
    Ro,
}

/// PgBouncer settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.maxClientConn >= self.defaultPoolSize", "message": "pgbouncer.maxClientConn must be at least defaultPoolSize"}
]))]
pub struct PgBouncerSpec {
    /// `session`, `transaction` or `statement`.
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Server connections per user/database pair.
    #[serde(default = "default_pool_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub default_pool_size: i32,
    /// Largest number of client connections.
    #[serde(default = "default_max_client_conn")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_client_conn: i32,
    /// Longest time, in seconds, PgBouncer holds clients around a switchover: the primary's
    /// instance manager PAUSEs every Pooler of the cluster before it stops, and RESUMEs them
    /// once the new primary is writable through the cluster's rw Service, or after this long
    /// (then clients see the errors instead of waiting longer). Also the longest wait for the
    /// PAUSE itself (in-flight transactions finishing) before the switchover goes on.
    #[serde(default = "default_pause_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub pause_timeout_seconds: i32,
    /// TLS between clients and PgBouncer. Unset: `Required` when the cluster speaks TLS (its
    /// `spec.tls.mode` is not `Disabled`), so a client reaches the pooler the way it reaches the
    /// cluster (encrypted or not at all), and `Disabled` when the cluster's TLS is. With TLS the
    /// operator issues the Pooler a server certificate (Secret `<pooler>-pooler-tls`) from the
    /// cluster's CA, or through the cluster's cert-manager issuer, naming its Service as
    /// `<pooler>`, `<pooler>.<namespace>`, `<pooler>.<namespace>.svc` and
    /// `<pooler>.<namespace>.svc.cluster.local`: clients connect with `sslmode=verify-full` and
    /// `sslrootcert` the cluster's `ca.crt` (Secret `<cluster>-ca`). A renewed certificate rolls
    /// the PgBouncer pods. `Required` or `Preferred` with the cluster's TLS disabled is refused
    /// (condition Degraded, reason `InvalidSpec`): there is no CA to issue from.
    #[serde(default, rename = "clientTLS", skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<ClientTlsMode>,
    /// More DNS names in the Pooler's certificate, beside its Service's: the names clients use
    /// from outside the Kubernetes cluster (its load balancer's, see `spec.service`) with
    /// `sslmode=verify-full`. A change reissues the certificate (the PgBouncer pods roll).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("items" = {
        "type": "string",
        "maxLength": 253,
        "x-kubernetes-validations": [{
            "rule": "self.matches('^(\\\\*\\\\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": "each serverAltDnsNames entry must be a lowercase DNS name such as pool.example.com (a leading *. for a wildcard)"
        }]
    }))]
    pub server_alt_dns_names: Vec<String>,
    /// Other pgbouncer.ini settings of the [pgbouncer] section.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub parameters: BTreeMap<String, String>,
}

impl Default for PgBouncerSpec {
    fn default() -> Self {
        Self {
            pool_mode: PoolMode::default(),
            default_pool_size: default_pool_size(),
            max_client_conn: default_max_client_conn(),
            pause_timeout_seconds: default_pause_timeout_seconds(),
            client_tls: None,
            server_alt_dns_names: Vec::new(),
            parameters: BTreeMap::new(),
        }
    }
}

fn default_pool_size() -> i32 {
    20
}

fn default_max_client_conn() -> i32 {
    1000
}

fn default_pause_timeout_seconds() -> i32 {
    30
}

/// Whether PgBouncer takes clients over TLS (`client_tls_sslmode`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ClientTlsMode {
    /// TLS only: a client that does not ask for TLS is refused (`require`).
    Required,
    /// TLS for the clients that ask for it, plain TCP for the others (`prefer`): for
    /// applications that cannot do TLS yet.
    Preferred,
    /// No TLS: PgBouncer answers plain TCP only (`disable`).
    Disabled,
}

/// PgBouncer pool mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per client session.
    Session,
    /// A server connection per transaction.
    #[default]
    Transaction,
    /// A server connection per statement.
    Statement,
}

/// Observed state of a Pooler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolerStatus {
    /// Ready PgBouncer pods.
    #[serde(default)]
    pub ready_instances: i32,
    /// `host:port` clients connect to (the Pooler's Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
