//! The sharding part of a PostgresCluster's spec: shards, table groups, sharded and reference
//! tables, and the pg-router deployment in front of them.

use k8s_openapi::api::core::v1::ResourceRequirements;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Sharding: the cluster is `shards` shards, each a primary with replicas, behind pg-router.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.tableGroups) || self.tableGroups.all(g, self.tableGroups.exists_one(o, o.name == g.name))", "message": "sharding.tableGroups: every table group needs a unique name"},
    {"rule": "!has(self.shardedTables) || (has(self.tableGroups) && self.shardedTables.all(t, self.tableGroups.exists(g, g.name == t.tableGroup)))", "message": "sharding.shardedTables: every table's tableGroup must name an entry of sharding.tableGroups"},
    {"rule": "!has(self.shardedTables) || self.shardedTables.all(t, self.shardedTables.exists_one(o, o.name == t.name))", "message": "sharding.shardedTables: a table is listed once"},
    {"rule": "!has(self.shardedTables) || !has(self.referenceTables) || self.shardedTables.all(t, !(t.name in self.referenceTables))", "message": "sharding: a table is either sharded (shardedTables) or a reference table (referenceTables), not both"},
    {"rule": "!has(self.shardedTables) || self.shardedTables.all(t, !has(t.lookups) || t.lookups.all(l, !self.shardedTables.exists(o, o.name == l.table)))", "message": "sharding.shardedTables[].lookups[].table: a lookup table lives on the first shard only, so it may not be a sharded table"},
    {"rule": "!has(self.shardedTables) || !has(self.referenceTables) || self.shardedTables.all(t, !has(t.lookups) || t.lookups.all(l, !(l.table in self.referenceTables)))", "message": "sharding.shardedTables[].lookups[].table: a lookup table lives on the first shard only, so it may not be a reference table"}
]))]
pub struct ShardingSpec {
    /// Number of shards. Changed only by a ShardSplitJob.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 1 && self <= 256", "message": "sharding.shards must be between 1 and 256"}
    ]))]
    pub shards: i32,
    /// pg-router deployment.
    #[serde(default)]
    pub router: RouterSpec,
    /// Table groups: tables sharded by the same key, whose rows with equal keys live on the same
    /// shard. The operator writes one ShardRange per shard and group when the cluster is created.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub table_groups: Vec<TableGroupSpec>,
    /// Sharded tables and their shard-key column.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub sharded_tables: Vec<ShardedTableSpec>,
    /// Reference tables: a full copy on every shard (reads go to one shard, writes to all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("items" = {"type": "string", "minLength": 1, "maxLength": 63}))]
    pub reference_tables: Vec<String>,
}

/// A table group of a sharded cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.vindex == 'hash' || self.vindex == 'range'", "message": "tableGroups[].vindex: hash and range are supported for table groups on Kubernetes (consistent-hash is not yet; lookup vindexes are per column: shardedTables[].lookups)"},
    {"rule": "self.vindex != 'range' || self.keyType == 'bigint'", "message": "tableGroups[].vindex range needs keyType bigint: its ranges are integer key values"}
]))]
pub struct TableGroupSpec {
    /// Group name (lower case), used in ShardRange names.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// How a shard key maps onto the ranges: `hash` (PostgreSQL's partition hash of the key, as
    /// a signed 64-bit value) or `range` (the integer key itself).
    #[serde(default)]
    pub vindex: crate::sharding::VindexKind,
    /// Type of the shard key of every table in the group.
    #[serde(default)]
    pub key_type: ShardKeyType,
}

/// Type of a shard key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ShardKeyType {
    /// smallint, integer or bigint.
    #[default]
    Bigint,
    /// text or varchar.
    Text,
}

/// A sharded table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.lookups) || self.lookups.all(l, l.column != self.shardKey)", "message": "shardedTables[].lookups[].column: the shard key routes by itself; a lookup vindex is for another column"},
    {"rule": "!has(self.lookups) || self.lookups.all(l, self.lookups.exists_one(o, o.column == l.column))", "message": "shardedTables[].lookups: one lookup vindex per column"}
]))]
pub struct ShardedTableSpec {
    /// Table name (unqualified, lower case).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Its table group (an entry of `tableGroups`).
    #[schemars(length(min = 1, max = 40))]
    pub table_group: String,
    /// Its shard-key column.
    #[schemars(length(min = 1, max = 63))]
    pub shard_key: String,
    /// Lookup vindexes: other columns whose value pg-router resolves to the shard key through a
    /// lookup table, so that a statement restricted by such a column (`WHERE email = $1`) goes to
    /// one shard instead of all. The router writes the lookup rows with every INSERT into the
    /// table, in the same transaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub lookups: Vec<LookupVindexSpec>,
}

/// A lookup vindex of a sharded table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LookupVindexSpec {
    /// The looked-up column (not the shard key).
    #[schemars(length(min = 1, max = 63))]
    pub column: String,
    /// The lookup table, created by the application on every shard (DDL through the router goes
    /// to all) and kept by the router on the first shard: columns `value` (the column's type,
    /// primary key) and `key` (the shard key's type).
    #[schemars(length(min = 1, max = 63))]
    pub table: String,
}

/// HorizontalPodAutoscaler of the pg-router Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minReplicas <= self.maxReplicas", "message": "router.autoscaling.minReplicas must not exceed maxReplicas"}
]))]
pub struct RouterAutoscaling {
    /// Fewest router pods.
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
    /// Most router pods.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU utilization (percent of the requested CPU) the autoscaler aims at.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percent: i32,
}

fn default_target_cpu() -> i32 {
    70
}

/// pg-router deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Number of pg-router pods (stateless).
    #[serde(default = "default_router_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// pg-router image; the operator's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources of the router container (CPU requests are needed by `autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scale the router with a HorizontalPodAutoscaler on CPU; `replicas` is then only the
    /// starting size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<RouterAutoscaling>,
}

impl Eq for RouterSpec {}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            replicas: default_router_replicas(),
            image: None,
            resources: None,
            autoscaling: None,
        }
    }
}

fn default_router_replicas() -> i32 {
    2
}
