//! PostgresUser: a declarative role with attributes, memberships and a password kept in a Secret.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ClusterReference, default_true};

/// A role inside a PostgresCluster, kept as declared.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "PostgresUser",
    namespaced,
    status = "PostgresUserStatus",
    shortname = "pguser",
    category = "postgres",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.roleName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Applied","type":"date","jsonPath":".status.appliedAt"}"#,
    printcolumn = r#"{"name":"Login","type":"string","jsonPath":".status.activeLogin","priority":1}"#,
    printcolumn = r#"{"name":"Password Set","type":"date","jsonPath":".status.passwordSetAt","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresUserSpec {
    /// Cluster that holds the role.
    pub cluster: ClusterReference,
    /// Role name. Immutable.
    #[schemars(length(min = 1, max = 63), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "roleName is immutable: create another PostgresUser to get a role of another name"},
        {"rule": "!self.startsWith('pg_')", "message": "role names starting with pg_ are reserved by PostgreSQL"},
        {"rule": "!(self in ['postgres', 'streaming_replica', 'pgbouncer_auth'])", "message": "roleName may not be postgres, streaming_replica or pgbouncer_auth: those roles belong to the operator"}
    ]))]
    pub role_name: String,
    /// Role attributes.
    #[serde(default)]
    pub attributes: RoleAttributes,
    /// Roles this role is a member of (`GRANT group TO role`). A membership removed from this
    /// list is revoked; memberships granted by hand are revoked too (the list is the truth).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub member_of: Vec<Membership>,
    /// Where the password lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PasswordSpec>,
    /// Password expiry (`VALID UNTIL`), an RFC 3339 time such as `2027-01-01T00:00:00Z`;
    /// `infinity` or unset for no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [
        {"rule": "self == 'infinity' || self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$')", "message": "validUntil must be an RFC 3339 time such as 2027-01-01T00:00:00Z, or infinity"}
    ]))]
    pub valid_until: Option<String>,
    /// `Retain` keeps the role when this object is deleted; `Delete` drops it (refused with a
    /// condition while the role owns objects, unless `reassignOwnedTo` is set).
    #[serde(default)]
    pub reclaim_policy: crate::postgres_database::ReclaimPolicy,
    /// With `reclaimPolicy: Delete`: the role that receives the objects this role owns (in every
    /// database, `REASSIGN OWNED` then `DROP OWNED`) before it is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub reassign_owned_to: Option<String>,
}

/// Membership in a group role, with the PostgreSQL 16+ grant options.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    /// The group role.
    #[schemars(length(min = 1, max = 63))]
    pub role: String,
    /// `WITH ADMIN`: this role may grant the group to others.
    #[serde(default)]
    pub admin: bool,
    /// `WITH INHERIT`: this role uses the group's privileges without `SET ROLE`.
    #[serde(default = "default_true")]
    pub inherit: bool,
    /// `WITH SET`: this role may `SET ROLE` to the group.
    #[serde(default = "default_true")]
    pub set: bool,
}

/// Role attributes (CREATE ROLE options).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleAttributes {
    /// LOGIN.
    #[serde(default = "default_true")]
    pub login: bool,
    /// SUPERUSER.
    #[serde(default)]
    pub superuser: bool,
    /// CREATEDB.
    #[serde(default)]
    pub create_db: bool,
    /// CREATEROLE.
    #[serde(default)]
    pub create_role: bool,
    /// REPLICATION.
    #[serde(default)]
    pub replication: bool,
    /// BYPASSRLS.
    #[serde(default)]
    pub bypass_rls: bool,
    /// INHERIT.
    #[serde(default = "default_true")]
    pub inherit: bool,
    /// CONNECTION LIMIT; -1 for no limit.
    #[serde(default = "default_connection_limit")]
    #[schemars(range(min = -1))]
    pub connection_limit: i32,
}

impl Default for RoleAttributes {
    fn default() -> Self {
        Self {
            login: true,
            superuser: false,
            create_db: false,
            create_role: false,
            replication: false,
            bypass_rls: false,
            inherit: true,
            connection_limit: -1,
        }
    }
}

fn default_connection_limit() -> i32 {
    -1
}

/// Password source and rotation. The password is stored in PostgreSQL only as a SCRAM-SHA-256
/// verifier the instance manager computes: the cleartext never reaches a statement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.rotationDays) || self.generate", "message": "password.rotationDays needs generate: true (the operator can only rotate a password it generates)"}
]))]
pub struct PasswordSpec {
    /// Secret with the key `password`. With `generate`, the instance manager writes it (owned by
    /// this PostgresUser) with the keys `username`, `password`, `host`, `port`, `dbname`, `uri`,
    /// `jdbc-uri` and `pgpass`; otherwise it reads `password` from it (a change of the Secret
    /// changes the role's password at the next periodic reconcile, within a minute).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Generate a strong password into the Secret when it does not exist.
    #[serde(default)]
    pub generate: bool,
    /// Database named in the generated Secret's `dbname`, `uri`, `jdbc-uri` and `pgpass`;
    /// `postgres` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub database: Option<String>,
    /// Rotate the generated password every this many days, without client errors: the role
    /// `roleName` becomes a group (NOLOGIN) with two login roles `<roleName>_a` and
    /// `<roleName>_b` that inherit it and `SET ROLE` to it on login (so what they create belongs to
    /// the group). A rotation gives the idle login role a new password, then points the Secret's
    /// `username` and `password` at it; the previous login role keeps working for
    /// `rotationGraceSeconds` (`VALID UNTIL`), then stops. A rotation can also be requested at
    /// any time with the annotation `postgres.keiailab.io/rotate-password` (any new value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub rotation_days: Option<i32>,
    /// How long the previous credentials keep working after a rotation, in seconds: longer than
    /// the time applications take to see the new Secret (a mounted Secret follows within about a
    /// minute and a half).
    #[serde(default = "default_rotation_grace_seconds")]
    #[schemars(range(min = 1, max = 2592000))]
    pub rotation_grace_seconds: i64,
}

fn default_rotation_grace_seconds() -> i64 {
    600
}

/// Annotation on a PostgresUser that requests a password rotation now (with
/// `password.rotationDays` set): any value not yet handled, for example a timestamp.
pub const ROTATE_PASSWORD_ANNOTATION: &str = "postgres.keiailab.io/rotate-password";

/// Observed state of a PostgresUser.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresUserStatus {
    /// When the password was last set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_set_at: Option<Time>,
    /// When the role was last changed (a statement ran); drift repairs count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<Time>,
    /// What the last change did, one short line per statement (never a password or verifier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    /// With rotation: the login role the Secret names now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_login: Option<String>,
    /// The value of the rotate-password annotation last handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_request: Option<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
