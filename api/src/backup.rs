//! BackupJob (one backup or restore run) and ScheduledBackup (a cron schedule of BackupJobs).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ClusterReference, StorageSpec};

/// One backup, restore or point-in-time-recovery run against a PostgresCluster's backup repository,
/// or a base backup into a volume of its own.
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
    printcolumn = r#"{"name":"Backup","type":"string","priority":1,"jsonPath":".status.backupId"}"#,
    printcolumn = r#"{"name":"Claim","type":"string","priority":1,"jsonPath":".status.volumeClaim"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a BackupJob's spec is immutable: create a new BackupJob instead"},
    {"rule": "self.action == 'Backup'", "message": "a BackupJob never restores over a running cluster: to restore or recover to a point in time, create a new PostgresCluster with spec.bootstrap.recovery (backupId, target)"},
    {"rule": "self.method == 'barmanCloud'", "message": "method pgBackRest is not available: the pgBackRest the package registries serve (2.45) predates PostgreSQL 18; use method barmanCloud"},
    {"rule": "self.backupType == 'full'", "message": "barman-cloud takes full backups only: remove backupType or set it to full"}
]))]
pub struct BackupJobSpec {
    /// Cluster to back up; its backup repository (spec.backup) receives the backup unless
    /// `volume` is set.
    pub cluster: ClusterReference,
    /// `Backup` takes a base backup. `Restore` is refused: a restore never overwrites a running
    /// cluster; create a new PostgresCluster with `spec.bootstrap.recovery` instead.
    #[serde(default)]
    pub action: BackupAction,
    /// Engine that moves the data to the object store: `barmanCloud` (pgBackRest is refused, see
    /// the README). A backup to a `volume` is pg_basebackup's.
    #[serde(default)]
    pub method: BackupMethod,
    /// `full` only (barman-cloud takes full backups).
    #[serde(default)]
    pub backup_type: BackupType,
    /// Take the backup from a healthy streaming replica when there is one, to spare the primary;
    /// from the primary otherwise.
    #[serde(default)]
    pub prefer_replica: bool,
    /// Take the backup into a new PersistentVolumeClaim of this size (and StorageClass) instead
    /// of the cluster's object store, which the cluster then needs not have: a Kubernetes Job
    /// runs pg_basebackup (with the WAL the copy needs to be consistent) against the chosen
    /// instance, and `status.volumeClaim` names the claim (the BackupJob's name). A new cluster
    /// restores it with `spec.bootstrap.volume.claimName`. The claim outlives the BackupJob:
    /// delete the claim to delete the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<StorageSpec>,
}

/// What a BackupJob does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BackupAction {
    /// Take a base backup.
    #[default]
    Backup,
    /// Refused: restores go into a new cluster (`spec.bootstrap.recovery`).
    Restore,
}

/// Backup engine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BackupMethod {
    /// Refused: the pgBackRest the registries serve (2.45) predates PostgreSQL 18.
    PgBackRest,
    /// barman-cloud (barman-cloud-backup, barman-cloud-wal-archive, barman-cloud-restore).
    #[default]
    BarmanCloud,
}

/// Backup type; barman-cloud takes `full` backups only.
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
    /// Backup label in the repository (for a backup to a volume, the label pg_basebackup wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// PersistentVolumeClaim holding a backup taken to a volume (`spec.volume`): the name to give
    /// `spec.bootstrap.volume.claimName` of a new cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim: Option<String>,
    /// WAL location where the backup starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_lsn: Option<String>,
    /// WAL location where the backup ends (a restore replays at least up to here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    /// When the backup began, as the engine recorded it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_time: Option<String>,
    /// When the backup ended, as the engine recorded it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// Size of the database files in the backup, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Instance (pod) that took the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Why the backup failed, and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
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
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.method == 'barmanCloud'", "message": "method pgBackRest is not available: the pgBackRest the package registries serve (2.45) predates PostgreSQL 18; use method barmanCloud"},
    {"rule": "self.backupType == 'full'", "message": "barman-cloud takes full backups only: remove backupType or set it to full"}
]))]
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
    /// Finished BackupJobs to keep; older ones are deleted (the backups stay in the repository
    /// until `spec.backup.retention` of the cluster expires them; with `volume`, their claims
    /// are deleted with them).
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_jobs: i32,
    /// Take the backups from a healthy replica when there is one (as BackupJob.preferReplica).
    #[serde(default)]
    pub prefer_replica: bool,
    /// Take each backup into a new volume of this size (as BackupJob.volume) instead of the
    /// cluster's object store. `keepJobs` then counts the backup volumes kept: the claim of each
    /// BackupJob the schedule prunes is deleted with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<StorageSpec>,
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

/// Environment of the instance manager for backups (what the operator sets on the PostgreSQL
/// container): the repository and the recovery source as JSON, the engine's folder, the keys.
pub mod instance_env {
    /// Folder with the barman-cloud commands.
    pub const BARMAN_BIN: &str = "BARMAN_BIN";
    /// `spec.backup` of the PostgresCluster, as JSON.
    pub const BACKUP_REPOSITORY: &str = "BACKUP_REPOSITORY";
    /// `spec.bootstrap.recovery` of the PostgresCluster, as JSON.
    pub const BOOTSTRAP_RECOVERY: &str = "BOOTSTRAP_RECOVERY";
    /// `true` while `spec.replica.enabled`: the instances keep following the recovery source's
    /// WAL archive instead of promoting at its end.
    pub const REPLICA_CLUSTER: &str = "REPLICA_CLUSTER";
    /// Host of the source's primary a replica cluster streams from (`spec.replica.streaming`);
    /// its certificates are mounted in the TLS folder's `source/`.
    pub const REPLICA_SOURCE_HOST: &str = "REPLICA_SOURCE_HOST";
    /// Port of the source's primary.
    pub const REPLICA_SOURCE_PORT: &str = "REPLICA_SOURCE_PORT";
    /// Access key id of the repository (from `spec.backup.s3.credentialsSecret`).
    pub const AWS_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
    /// Secret access key of the repository.
    pub const AWS_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
    /// Access key id of the recovery source (from `spec.bootstrap.recovery.source.credentialsSecret`).
    pub const RECOVERY_AWS_ACCESS_KEY_ID: &str = "RECOVERY_AWS_ACCESS_KEY_ID";
    /// Secret access key of the recovery source.
    pub const RECOVERY_AWS_SECRET_ACCESS_KEY: &str = "RECOVERY_AWS_SECRET_ACCESS_KEY";
    /// PEM of the CA of the repository's TLS certificate (`spec.backup.s3.caSecret`).
    pub const BACKUP_CA_BUNDLE: &str = "BACKUP_CA_BUNDLE";
    /// PEM of the CA of the recovery source's TLS certificate.
    pub const RECOVERY_CA_BUNDLE: &str = "RECOVERY_CA_BUNDLE";
    /// Key of the credentials Secret that holds the access key id.
    pub const SECRET_KEY_ACCESS_KEY_ID: &str = "ACCESS_KEY_ID";
    /// Key of the credentials Secret that holds the secret access key.
    pub const SECRET_KEY_SECRET_ACCESS_KEY: &str = "ACCESS_SECRET_KEY";
}
