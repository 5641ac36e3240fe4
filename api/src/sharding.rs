//! ShardRange (which hash range of a table group lives on which shard) and ShardSplitJob (online split).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::ClusterReference;

/// One key range of a table group, and the shard that owns it. The source of truth for pg-router.
///
/// Ranges cover the signed 64-bit space of PostgreSQL's partition hash (`hashint8extended` and
/// friends with the partition seed): `start` is inclusive, `end` exclusive; the open end of the
/// space is written as `end: null` (unbounded).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "ShardRange",
    namespaced,
    status = "ShardRangeStatus",
    shortname = "pgrange",
    category = "postgres",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"TableGroup","type":"string","jsonPath":".spec.tableGroup"}"#,
    printcolumn = r#"{"name":"Shard","type":"string","jsonPath":".spec.shard"}"#,
    printcolumn = r#"{"name":"Start","type":"integer","jsonPath":".spec.start"}"#,
    printcolumn = r#"{"name":"End","type":"integer","jsonPath":".spec.end"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".spec.state"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.start) || !has(self.end) || self.start < self.end", "message": "start must be lower than end: a range holds the hashes start <= h < end"},
    {"rule": "self.cluster == oldSelf.cluster && self.tableGroup == oldSelf.tableGroup", "message": "cluster and tableGroup are immutable"},
    {"rule": "self.epoch >= oldSelf.epoch", "message": "epoch may only grow: each cut-over of a split raises it, so a router can tell a newer layout from an older one"}
]))]
pub struct ShardRangeSpec {
    /// Sharded cluster.
    pub cluster: ClusterReference,
    /// Table group: tables sharded by the same key, whose rows with equal keys live together.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$")
    )]
    pub table_group: String,
    /// Shard that owns the range, for example `shard-0`.
    #[schemars(length(min = 1, max = 63))]
    pub shard: String,
    /// First hash of the range (inclusive); the lowest 64-bit value when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    /// End of the range (exclusive); the end of the hash space when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<i64>,
    /// How pg-router treats the range.
    #[serde(default)]
    pub state: ShardRangeState,
    /// Vindex that maps the shard key to the hash space.
    #[serde(default)]
    pub vindex: VindexKind,
    /// Routing epoch: raised by every cut-over that moves the range to another shard. The old
    /// shard refuses writes to a moved range with a message naming the epoch, so a router still
    /// on an older epoch retries on the new layout.
    #[serde(default)]
    pub epoch: i64,
}

/// Router-visible state of a range.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ShardRangeState {
    /// Reads and writes go to the shard.
    #[default]
    Active,
    /// Writes pause briefly (cut-over of a split).
    WritePaused,
    /// The range moved away; kept only until clean-up.
    Retired,
}

/// Function from shard key to shard.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VindexKind {
    /// PostgreSQL's partition hash of the key, placed on the range that holds it.
    #[default]
    Hash,
    /// The key value itself, placed on the range that holds it.
    Range,
    /// Consistent hashing of the key.
    ConsistentHash,
    /// A lookup table maps a non-shard-key column to the shard.
    Lookup,
}

/// Observed state of a ShardRange.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardRangeStatus {
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An online split of one ShardRange into two, moving the upper half to a new shard.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "ShardSplitJob",
    namespaced,
    status = "ShardSplitJobStatus",
    shortname = "pgsplit",
    category = "postgres",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.sourceRange"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a ShardSplitJob's spec is immutable: delete it (which rolls back an unfinished split) and create a new one"}
]))]
pub struct ShardSplitJobSpec {
    /// Sharded cluster.
    pub cluster: ClusterReference,
    /// Name of the ShardRange to split.
    #[schemars(length(min = 1, max = 253))]
    pub source_range: String,
    /// Hash where the upper half starts; the middle of the source range when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_point: Option<i64>,
    /// Name of the new shard that receives the upper half.
    #[schemars(length(min = 1, max = 63))]
    pub target_shard: String,
    /// Longest write pause allowed at cut-over; the job waits for catch-up until it fits.
    /// The operator's pg-router holds a paused range's writes for 65 s, longer than the
    /// largest value allowed here (60000), so a held write outlives any cut-over.
    #[serde(default = "default_max_write_pause_ms")]
    #[schemars(range(min = 100, max = 60000))]
    pub max_write_pause_millis: i32,
    /// Compare row counts and checksums of source and target before cut-over.
    #[serde(default = "crate::common::default_true")]
    pub verify: bool,
}

/// The largest `maxWritePauseMillis` a ShardSplitJob accepts (the schema's bound).
pub const MAX_WRITE_PAUSE_MILLIS: i32 = 60_000;

fn default_max_write_pause_ms() -> i32 {
    2000
}

/// The seven steps of a split, in order.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum SplitStep {
    /// Compute the split point and the target.
    Plan,
    /// Create the target shard.
    ProvisionTarget,
    /// Copy a consistent snapshot of the moving rows.
    CopySnapshot,
    /// Stream changes with logical replication until the target is close behind.
    CatchUp,
    /// Compare counts and checksums.
    Verify,
    /// Pause writes in the router, let the target catch up, switch the ranges.
    CutOver,
    /// Drop moved rows from the source and the replication objects.
    CleanUp,
}

/// Observed state of a ShardSplitJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardSplitJobStatus {
    /// Pending, Running, Succeeded, Failed or RolledBack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Current step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<SplitStep>,
    /// Split point chosen by the Plan step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_point: Option<i64>,
    /// Rows copied so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_copied: Option<i64>,
    /// Write pause measured at cut-over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_pause_millis: Option<i64>,
    /// Shard that owned the whole range before the split (recorded by the Plan step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_shard: Option<String>,
    /// The ShardRange holding the moving (upper) half, created by the Plan step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_range: Option<String>,
    /// Cut-over attempts aborted because catch-up did not fit in `maxWritePauseMillis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_cut_overs: Option<i32>,
    /// When the job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
