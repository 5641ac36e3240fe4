//! The pure part of the BackupJob reconciler: which instance takes the backup, and what an
//! instance manager's answer means for the job's status.

use api::BackupJob;
use api::contract;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

/// One instance pod, as the reconciler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Pod name.
    pub name: String,
    /// Pod IP.
    pub ip: String,
    /// Port of the instance manager's HTTP endpoints.
    pub http_port: u16,
    /// PostgreSQL's port (where a backup to a volume copies from).
    pub postgres_port: u16,
    /// `primary`, `replica` or `fenced` (the role label).
    pub role: String,
    /// PostgreSQL serves, and (replicas) streams from the primary.
    pub healthy: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PublishedStatus {
    #[serde(default)]
    postgres_ready: bool,
    #[serde(default)]
    streaming: bool,
    #[serde(default)]
    in_recovery: Option<bool>,
}

/// The candidate of a pod, when it has an IP. In a replica cluster (`designated`) the primary is
/// a standby replaying the source's archive, and is backed up as a replica is.
pub fn candidate(pod: &Pod, designated: bool) -> Option<Candidate> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let ip = pod
        .status
        .as_ref()
        .and_then(|status| status.pod_ip.clone())
        .filter(|ip| !ip.is_empty())?;
    let http_port = contract::container_port(
        pod,
        contract::PORT_NAME_STATUS,
        contract::INSTANCE_HTTP_PORT,
    );
    let postgres_port =
        contract::container_port(pod, contract::PORT_NAME_POSTGRES, contract::POSTGRES_PORT);
    let role = labels
        .get(contract::LABEL_ROLE)
        .cloned()
        .unwrap_or_default();
    let published: PublishedStatus = annotations
        .get(contract::ANNOTATION_INSTANCE_STATUS)
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default();
    let healthy = published.postgres_ready
        && match role.as_str() {
            contract::role::PRIMARY => published.in_recovery == Some(designated),
            contract::role::REPLICA => published.streaming,
            _ => false,
        };
    Some(Candidate {
        name: pod.metadata.name.clone().unwrap_or_default(),
        ip,
        http_port,
        postgres_port,
        role,
        healthy,
    })
}

/// The instance that takes the backup: a healthy replica when `prefer_replica` and there is one,
/// else the healthy primary; `None` when neither.
pub fn pick(candidates: &[Candidate], prefer_replica: bool) -> Option<&Candidate> {
    let healthy = |role: &str| {
        candidates
            .iter()
            .filter(|candidate| candidate.healthy && candidate.role == role)
            .min_by(|a, b| a.name.cmp(&b.name))
    };
    if prefer_replica && let Some(replica) = healthy(contract::role::REPLICA) {
        return Some(replica);
    }
    healthy(contract::role::PRIMARY)
}

/// Why a job of a cluster waits for another one: base backups of a cluster run one at a time,
/// oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    /// The job may start.
    Go,
    /// This job (its name) is running.
    Running(String),
    /// This older job (its name) has not run yet, and goes first.
    Queued(String),
}

/// Whether `job` (a backup to the cluster's object store) may start now, given the BackupJobs of
/// its namespace. A cluster takes one base backup to its store at a time: barman names a backup
/// by the second it starts, so two that start in the same second, on two instances, would write
/// one backup. Jobs queue in the order they were created (then by name); finished and deleted
/// ones, and backups to a volume (each into a claim of its own), do not count.
pub fn turn(job: &BackupJob, jobs: &[BackupJob]) -> Turn {
    let key = |job: &BackupJob| {
        (
            job.metadata.creation_timestamp.clone().map(|t| t.0),
            job.metadata.name.clone().unwrap_or_default(),
        )
    };
    let mine = key(job);
    let phase = |job: &BackupJob| {
        job.status
            .as_ref()
            .and_then(|status| status.phase.clone())
            .unwrap_or_default()
    };
    let rivals = jobs.iter().filter(|other| {
        other.metadata.name != job.metadata.name
            && other.spec.cluster.name == job.spec.cluster.name
            && other.spec.volume.is_none()
            && other.metadata.deletion_timestamp.is_none()
            && !matches!(phase(other).as_str(), "Completed" | "Failed")
    });
    let mut queued: Option<(_, String)> = None;
    for other in rivals {
        let name = other.metadata.name.clone().unwrap_or_default();
        if phase(other) == "Running" {
            return Turn::Running(name);
        }
        let other_key = key(other);
        if other_key < mine
            && queued
                .as_ref()
                .is_none_or(|(oldest, _)| other_key < *oldest)
        {
            queued = Some((other_key, name));
        }
    }
    queued.map_or(Turn::Go, |(_, name)| Turn::Queued(name))
}

/// A base backup run as the instance manager reports it (`GET /backups/{name}`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    /// `Running`, `Completed` or `Failed`.
    pub phase: String,
    /// The backup, once completed.
    #[serde(default)]
    pub backup: Option<RunBackup>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// End of the run (RFC 3339).
    #[serde(default)]
    pub completed_at: Option<String>,
}

/// The backup of a completed run.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunBackup {
    /// Backup id.
    pub backup_id: String,
    /// Begin LSN.
    #[serde(default)]
    pub begin_lsn: Option<String>,
    /// End LSN.
    #[serde(default)]
    pub end_lsn: Option<String>,
    /// Begin time.
    #[serde(default)]
    pub begin_time: Option<String>,
    /// End time.
    #[serde(default)]
    pub end_time: Option<String>,
    /// Size in bytes.
    #[serde(default)]
    pub size_bytes: Option<i64>,
}

/// A failure reason a user can act on, from the engine's last lines.
pub fn failure_reason(pod: &str, error: &str) -> String {
    let hint = if error.contains("NoSuchBucket") || error.contains("does not exist") {
        " The bucket does not exist: create it, or fix spec.backup.s3.bucket."
    } else if error.contains("InvalidAccessKeyId")
        || error.contains("SignatureDoesNotMatch")
        || error.contains("AccessDenied")
        || error.contains("Unable to locate credentials")
    {
        " The store refused the credentials: check the Secret named by spec.backup.s3.credentialsSecret."
    } else if error.contains("Could not connect") || error.contains("Connection refused") {
        " The store is unreachable: check spec.backup.s3.endpoint and the network."
    } else {
        ""
    };
    let last = error
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or(error);
    format!(
        "the backup on {pod} failed: {}.{hint}",
        last.trim().trim_end_matches('.')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str, role: &str, healthy: bool) -> Candidate {
        Candidate {
            name: name.into(),
            ip: "10.0.0.1".into(),
            http_port: 8000,
            postgres_port: 5432,
            role: role.into(),
            healthy,
        }
    }

    #[test]
    fn prefers_a_healthy_replica_when_asked() {
        let pods = [
            candidate("c-1", "primary", true),
            candidate("c-2", "replica", false),
            candidate("c-3", "replica", true),
        ];
        assert_eq!(pick(&pods, true).unwrap().name, "c-3");
        assert_eq!(pick(&pods, false).unwrap().name, "c-1");
        let no_replica = [
            candidate("c-1", "primary", true),
            candidate("c-2", "replica", false),
        ];
        assert_eq!(pick(&no_replica, true).unwrap().name, "c-1");
        assert!(pick(&[candidate("c-1", "primary", false)], false).is_none());
    }

    #[test]
    fn a_replica_clusters_designated_primary_is_a_candidate_only_there() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "dr-0",
                "labels": {(contract::LABEL_ROLE): "primary"},
                "annotations": {(contract::ANNOTATION_INSTANCE_STATUS): r#"{"postgresReady":true,"inRecovery":true}"#}
            },
            "status": {"podIP": "10.0.0.7"}
        }))
        .unwrap();
        assert!(candidate_of(&pod, true).healthy, "designated primary");
        assert!(
            !candidate_of(&pod, false).healthy,
            "a primary in recovery of an ordinary cluster is not one to back up"
        );
    }

    fn candidate_of(pod: &Pod, designated: bool) -> Candidate {
        super::candidate(pod, designated).unwrap()
    }

    fn job(name: &str, cluster: &str, created: &str, phase: Option<&str>) -> BackupJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "BackupJob",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
            "spec": {"cluster": {"name": cluster}},
            "status": phase.map(|phase| serde_json::json!({"phase": phase})),
        }))
        .unwrap()
    }

    #[test]
    fn a_cluster_takes_one_backup_to_its_store_at_a_time_oldest_first() {
        let early = "2026-12-07T10:00:00Z";
        let late = "2026-12-07T10:00:01Z";
        let me = job("b", "db", early, None);
        // Alone, or beside finished jobs, a backup to a volume and other clusters' running
        // ones: go.
        let mut to_volume = job("copy", "db", "2026-12-07T09:00:00Z", Some("Running"));
        to_volume.spec.volume = Some(Default::default());
        let others = [
            to_volume,
            job("done", "db", "2026-12-07T09:00:00Z", Some("Completed")),
            job("broken", "db", "2026-12-07T09:00:00Z", Some("Failed")),
            job("elsewhere", "other", early, Some("Running")),
            me.clone(),
        ];
        assert_eq!(turn(&me, &others), Turn::Go);
        // A running job of the cluster, even a younger one, goes on first.
        let running = [me.clone(), job("z", "db", late, Some("Running"))];
        assert_eq!(turn(&me, &running), Turn::Running("z".into()));
        // An older job that waits goes first (the oldest of them), a younger one after.
        let queue = [
            job("c", "db", late, Some("Pending")),
            job("a2", "db", early, None),
            job("a1", "db", early, Some("Pending")),
            job("old", "db", "2026-12-07T09:59:59Z", Some("Pending")),
        ];
        assert_eq!(turn(&me, &queue), Turn::Queued("old".into()));
        assert_eq!(
            turn(&me, &queue[..2]),
            Turn::Queued("a2".into()),
            "created in the same second: by name"
        );
        assert_eq!(turn(&me, &queue[..1]), Turn::Go, "a younger job waits");
    }

    #[test]
    fn failure_reasons_say_what_to_fix() {
        let reason = failure_reason(
            "c-1",
            "barman-cloud-backup failed\nERROR: Bucket missing-bucket does not exist",
        );
        assert!(reason.contains("create it"), "{reason}");
        assert!(
            reason.starts_with("the backup on c-1 failed: ERROR: Bucket"),
            "{reason}"
        );
    }
}
