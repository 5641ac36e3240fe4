//! PostgresDatabase: a declarative database with its schemas, extensions, owner and privileges.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
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
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Applied","type":"date","jsonPath":".status.appliedAt"}"#
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
    /// Owning role (a PostgresUser's roleName or the cluster's application owner). A change
    /// transfers the database (`ALTER DATABASE ... OWNER TO`).
    #[schemars(length(min = 1, max = 63))]
    pub owner: String,
    /// Encoding, for example `UTF8`; set when the database is created. A later change is
    /// reported (condition `CreateOnlyFieldChanged`), not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub encoding: Option<String>,
    /// Locale (`LC_COLLATE` and `LC_CTYPE`), for example `C` or `en_US.UTF-8`; set when the
    /// database is created. A later change is reported, not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub locale: Option<String>,
    /// Template database to copy when the database is created; `template1`, or `template0`
    /// when an encoding or locale is given. A later change is reported, not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub template: Option<String>,
    /// Largest number of concurrent connections; -1 for no limit.
    #[serde(default = "default_connection_limit")]
    #[schemars(range(min = -1))]
    pub connection_limit: i32,
    /// Schemas to create (and keep) in the database. A schema removed from this list is kept
    /// (its data is not dropped), but its privileges are no longer managed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub schemas: Vec<SchemaSpec>,
    /// Extensions to create in the database (kept when removed from this list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub extensions: Vec<ExtensionSpec>,
    /// Privileges on the database. This list is the truth: privileges of other roles (except the
    /// owner and PUBLIC) are revoked, also when granted by hand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub privileges: Vec<DatabaseGrant>,
    /// Revoke `CONNECT` (and `TEMPORARY`) on the database and `CREATE` on schema `public` from
    /// PUBLIC, so that only the roles granted here connect and create.
    #[serde(default)]
    pub revoke_public: bool,
    /// `Retain` keeps the database when this object is deleted; `Delete` drops it (refused while
    /// other sessions are connected, unless `forceDelete`).
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
    /// With `reclaimPolicy: Delete`: terminate the connected sessions and drop the database
    /// anyway (`DROP DATABASE ... WITH (FORCE)`).
    #[serde(default)]
    pub force_delete: bool,
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
    /// Privileges on the schema and on its tables, sequences and functions (existing ones and,
    /// through default privileges, those the schema's and the database's owners create later).
    /// This list is the truth for every role but the owners and PUBLIC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub privileges: Vec<SchemaGrant>,
}

/// Privileges of one role in a schema.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaGrant {
    /// Role that receives the privileges.
    #[schemars(length(min = 1, max = 63))]
    pub role: String,
    /// On the schema: USAGE, CREATE, or ALL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3), extend("items" = {"type": "string", "enum": ["USAGE", "CREATE", "ALL"]}))]
    pub schema: Vec<String>,
    /// On every table, view and materialized view of the schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9), extend("items" = {"type": "string", "enum": ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN", "ALL"]}))]
    pub tables: Vec<String>,
    /// On every sequence of the schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("items" = {"type": "string", "enum": ["USAGE", "SELECT", "UPDATE", "ALL"]}))]
    pub sequences: Vec<String>,
    /// On every function of the schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2), extend("items" = {"type": "string", "enum": ["EXECUTE", "ALL"]}))]
    pub functions: Vec<String>,
}

/// An extension in the database.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionSpec {
    /// Extension name, for example `pg_stat_statements`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Version; the default version when unset. A change runs `ALTER EXTENSION ... UPDATE TO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub version: Option<String>,
    /// Schema to install into; a change moves it (`ALTER EXTENSION ... SET SCHEMA`).
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
    /// When a statement last ran (drift repairs count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<Time>,
    /// What the last change did, one line per statement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    /// Encoding, locale and template the database was created with (by this object), to report
    /// later changes of these create-only fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_with: Option<CreatedWith>,
}

/// The create-only fields as they were when the database was created.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedWith {
    /// `spec.encoding` at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// `spec.locale` at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// `spec.template` at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}
