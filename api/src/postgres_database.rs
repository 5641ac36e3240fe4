//! PostgresDatabase: a declarative database with its schemas, extensions, owner and privileges.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::ClusterReference;

/// A database inside a PostgresCluster, kept as declared.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "PostgresDatabase",
    namespaced,
    status = "PostgresDatabaseStatus",
    shortname = "pgdb",
    category = "postgres",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Database","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresDatabaseSpec {
    /// Cluster that holds the database.
    pub cluster: ClusterReference,
    /// Database name. Immutable.
    #[schemars(length(min = 1, max = 63), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "name is immutable: create another PostgresDatabase to get a database of another name"},
        {"rule": "!(self in ['postgres', 'template0', 'template1'])", "message": "name may not be postgres, template0 or template1: those databases belong to the operator"}
    ]))]
    pub name: String,
    /// Owning role (a PostgresUser's roleName or the cluster's application owner).
    #[schemars(length(min = 1, max = 63))]
    pub owner: String,
    /// Encoding; only used when the database is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub encoding: Option<String>,
    /// Template database to copy; `template1` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub template: Option<String>,
    /// Largest number of concurrent connections; -1 for no limit.
    #[serde(default = "default_connection_limit")]
    #[schemars(range(min = -1))]
    pub connection_limit: i32,
    /// Schemas to create (and keep) in the database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub schemas: Vec<SchemaSpec>,
    /// Extensions to create in the database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub extensions: Vec<ExtensionSpec>,
    /// Privileges granted on the database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub privileges: Vec<DatabaseGrant>,
    /// `Retain` keeps the database when this object is deleted; `Delete` drops it.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

fn default_connection_limit() -> i32 {
    -1
}

/// A schema in the database.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaSpec {
    /// Schema name.
    #[schemars(length(min = 1, max = 63), extend("x-kubernetes-validations" = [
        {"rule": "!self.startsWith('pg_')", "message": "schema names starting with pg_ are reserved by PostgreSQL"}
    ]))]
    pub name: String,
    /// Owner; the database owner when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub owner: Option<String>,
}

/// An extension in the database.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionSpec {
    /// Extension name, for example `pg_stat_statements`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Version; the default version when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub version: Option<String>,
    /// Schema to install into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub schema: Option<String>,
}

/// Privileges granted to a role on the database.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseGrant {
    /// Role that receives the privileges.
    #[schemars(length(min = 1, max = 63))]
    pub role: String,
    /// Database privileges: CONNECT, CREATE, TEMPORARY, or ALL.
    #[schemars(length(min = 1, max = 4), extend("items" = {
        "type": "string",
        "enum": ["CONNECT", "CREATE", "TEMPORARY", "ALL"]
    }))]
    pub privileges: Vec<String>,
}

/// What happens to the PostgreSQL object when its Kubernetes object is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReclaimPolicy {
    /// Keep it.
    #[default]
    Retain,
    /// Drop it.
    Delete,
}

/// Observed state of a PostgresDatabase.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresDatabaseStatus {
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
