//! BackupJob (one backup or restore run) and ScheduledBackup (a cron schedule of BackupJobs).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::ClusterReference;
use crate::postgres_cluster::RecoveryTarget;

/// One backup, restore or point-in-time-recovery run against a PostgresCluster's backup repository.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "BackupJob",
    namespaced,
    status = "BackupJobStatus",
    shortname = "pgbackup",
    category = "postgres",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a BackupJob's spec is immutable: create a new BackupJob instead"},
    {"rule": "self.action == 'Backup' ? !has(self.target) && !has(self.backupId) : true", "message": "target and backupId only apply to action Restore"}
]))]
pub struct BackupJobSpec {
    /// Cluster whose backup repository (spec.backup) this job uses.
    pub cluster: ClusterReference,
    /// `Backup` takes a base backup; `Restore` restores the cluster in place from one.
    #[serde(default)]
    pub action: BackupAction,
    /// Tool that moves the data.
    #[serde(default)]
    pub method: BackupMethod,
    /// `full`, `diff` or `incr` (pgBackRest backup types); ignored by barman-cloud.
    #[serde(default)]
    pub backup_type: BackupType,
    /// Backup to restore (action Restore); the latest when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub backup_id: Option<String>,
    /// Point-in-time target (action Restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RecoveryTarget>,
    /// Take the backup from a replica when one is healthy, to spare the primary.
    #[serde(default)]
    pub prefer_replica: bool,
}

/// What a BackupJob does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BackupAction {
    /// Take a base backup.
    #[default]
    Backup,
    /// Restore from a backup.
    Restore,
}

/// Backup tool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BackupMethod {
    /// pgBackRest.
    #[default]
    PgBackRest,
    /// barman-cloud (barman-cloud-backup / barman-cloud-restore).
    BarmanCloud,
}

/// pgBackRest backup type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    /// Full backup.
    #[default]
    Full,
    /// Differential (since the last full).
    Diff,
    /// Incremental (since the last backup).
    Incr,
}

/// Observed state of a BackupJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupJobStatus {
    /// Pending, Running, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Backup label in the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// WAL location where the backup starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_lsn: Option<String>,
    /// WAL location where the backup ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A cron schedule that creates BackupJobs and prunes old ones.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "ScheduledBackup",
    namespaced,
    status = "ScheduledBackupStatus",
    shortname = "pgsched",
    category = "postgres",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Last","type":"date","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledBackupSpec {
    /// Cluster to back up.
    pub cluster: ClusterReference,
    /// Cron schedule in UTC with five fields (minute hour day-of-month month day-of-week), or a macro
    /// such as `@daily`.
    #[schemars(length(min = 1, max = 128), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|([0-9*,/-]+|[A-Za-z?*,/-]+)([ \\t]+([0-9*,/-]+|[A-Za-z?*,/-]+)){4})$')",
        "message": "schedule must be a cron expression with five fields (minute hour day-of-month month day-of-week), such as '0 3 * * *', or a macro such as @daily"
    }]))]
    pub schedule: String,
    /// Method of the BackupJobs it creates.
    #[serde(default)]
    pub method: crate::backup::BackupMethod,
    /// Backup type of the BackupJobs it creates.
    #[serde(default)]
    pub backup_type: BackupType,
    /// Completed BackupJobs to keep; older ones are deleted (the repository's own retention still applies).
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_jobs: i32,
    /// Pause the schedule without deleting it.
    #[serde(default)]
    pub suspend: bool,
    /// Create a first BackupJob right away instead of waiting for the first scheduled time.
    #[serde(default)]
    pub immediate: bool,
}

fn default_keep() -> i32 {
    7
}

/// Observed state of a ScheduledBackup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledBackupStatus {
    /// When the last BackupJob was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When the next BackupJob is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// Name of the last BackupJob created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_job: Option<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
