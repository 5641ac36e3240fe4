//! What `status` shows, read from the objects (pure): the cluster's summary from its status, one
//! row per instance pod from its role label and the status annotation its instance manager
//! writes, and one row per BackupJob.

use std::collections::BTreeMap;

use api::backup::BackupJob;
use api::contract;
use api::postgres_cluster::{FENCED_ANNOTATION, HIBERNATION_ANNOTATION, PostgresCluster};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

/// The fields of the instance manager's `/status` JSON (pod annotation
/// `postgres.keiailab.io/instance-status`) the plugin shows. Unknown fields are ignored and
/// missing ones default, so that the plugin reads the status of older and newer instance managers.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Reported {
    /// `primary`, `replica` or `fenced`.
    pub role: String,
    /// PostgreSQL is stopped on request or by self-fencing.
    pub fenced: bool,
    /// PostgreSQL accepts connections.
    pub postgres_ready: bool,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Primary: WAL write position.
    pub current_lsn: Option<String>,
    /// Replica: WAL received.
    pub received_lsn: Option<String>,
    /// Replica: WAL replayed.
    pub replay_lsn: Option<String>,
    /// Replica: received but not replayed, in bytes.
    pub lag_bytes: Option<u64>,
    /// Replica: seconds behind in replay.
    pub lag_seconds: Option<f64>,
    /// Replica: the WAL receiver streams.
    pub streaming: bool,
    /// Last restart token handled.
    pub restart_token: Option<String>,
    /// Last error of the instance manager's run loop.
    pub last_error: Option<String>,
    /// A replica cluster's designated primary: its distance to the source's WAL archive.
    pub source_archive: Option<SourceArchive>,
    /// The certificates it installed (TLS on), with their validity.
    pub certificates: Vec<ReportedCertificate>,
}

/// One entry of an instance's `certificates`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReportedCertificate {
    /// `server`, `replication`, `ca`, `source` or `source-ca`.
    pub certificate: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

/// The `sourceArchive` of a designated primary's status.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SourceArchive {
    /// The source cluster.
    pub source: String,
    /// Archived WAL segments not replayed yet.
    pub segments: u64,
    /// Bytes not replayed yet.
    pub bytes: u64,
    /// How long the oldest of them has waited.
    pub seconds: f64,
    /// Why the last listing of the source's archive failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reported {
    /// The status annotation of `pod`, when there is a readable one.
    pub fn of(pod: &Pod) -> Option<Self> {
        pod.annotations()
            .get(contract::ANNOTATION_INSTANCE_STATUS)
            .and_then(|text| serde_json::from_str(text).ok())
    }
}

/// One instance, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRow {
    /// Pod name.
    pub pod: String,
    /// Role label the instance manager set (`primary`, `replica`, `fenced`), or `unknown`.
    pub role: String,
    /// One word: ready, not-ready, fenced, terminating, pending, ...
    pub status: String,
    /// The pod's Ready condition is True.
    pub ready: bool,
    /// Fenced (pod annotation or reported).
    pub fenced: bool,
    /// Being deleted.
    pub terminating: bool,
    /// Current (primary) or received (replica) WAL position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Replayed WAL position (replica).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<String>,
    /// Received but not replayed WAL, in bytes (replica).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// Seconds behind in replay (replica).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Timeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Node the pod runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Pod IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Last restart token the instance manager handled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_token: Option<String>,
    /// Last error the instance manager reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A replica cluster's designated primary: how far behind its source's archive it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_archive: Option<SourceArchive>,
}

impl InstanceRow {
    /// Reads one instance pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let reported = Reported::of(pod).unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let fenced = reported.fenced
            || pod
                .annotations()
                .get(contract::ANNOTATION_FENCED)
                .is_some_and(|value| value == "true");
        let role = pod
            .labels()
            .get(contract::LABEL_ROLE)
            .cloned()
            .unwrap_or_else(|| "unknown".to_string());
        let phase = status.phase.clone().unwrap_or_default();
        let word = if terminating {
            "terminating"
        } else if fenced {
            "fenced"
        } else if ready {
            "ready"
        } else if phase == "Pending" || phase.is_empty() {
            "pending"
        } else if phase == "Failed" {
            "failed"
        } else {
            "not-ready"
        };
        let is_primary = role == contract::role::PRIMARY;
        Self {
            pod: pod.name_any(),
            status: word.to_string(),
            ready,
            fenced,
            terminating,
            lsn: if is_primary {
                reported.current_lsn.clone()
            } else {
                reported
                    .received_lsn
                    .clone()
                    .or(reported.current_lsn.clone())
            },
            replay_lsn: (!is_primary).then_some(reported.replay_lsn).flatten(),
            lag_bytes: (!is_primary).then_some(reported.lag_bytes).flatten(),
            lag_seconds: (!is_primary).then_some(reported.lag_seconds).flatten(),
            timeline: reported.timeline,
            node: pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
            ip: status.pod_ip,
            restart_token: reported.restart_token,
            last_error: reported.last_error,
            source_archive: is_primary.then_some(reported.source_archive).flatten(),
            role,
        }
    }

    /// Whether the instance manager labelled this pod the primary.
    pub fn is_primary(&self) -> bool {
        self.role == contract::role::PRIMARY
    }
}

/// One condition of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionRow {
    /// Ready, Progressing, Degraded, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// Machine-readable reason.
    pub reason: String,
    /// What it means.
    pub message: String,
    /// When the status last changed.
    pub since: Timestamp,
}

/// One BackupJob of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupRow {
    /// BackupJob name.
    pub name: String,
    /// Backup or Restore.
    pub action: String,
    /// pgBackRest or barmanCloud.
    pub method: String,
    /// Pending, Running, Completed, Failed (empty before the operator saw it).
    pub phase: String,
    /// When the object was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<Timestamp>,
    /// When the run started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started: Option<Timestamp>,
    /// When the run finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<Timestamp>,
    /// Backup label in the repository.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
}

impl BackupRow {
    /// Reads one BackupJob.
    pub fn from_job(job: &BackupJob) -> Self {
        let status = job.status.clone().unwrap_or_default();
        Self {
            name: job.name_any(),
            action: api_spelling(&job.spec.action),
            method: api_spelling(&job.spec.method),
            phase: status.phase.unwrap_or_default(),
            created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
            started: status.started_at.map(|t| t.0),
            completed: status.completed_at.map(|t| t.0),
            backup_id: status.backup_id,
        }
    }
}

/// An enum value as the API spells it (its JSON string).
fn api_spelling<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One kind of certificate the instances use, at its earliest expiry among them.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRow {
    /// `server`, `replication`, `ca` (the latest CA of the bundle), `source`, `source-ca`.
    pub certificate: String,
    /// The earliest expiry any instance reports for it.
    pub expires: Timestamp,
    /// The instances that report that expiry.
    pub instances: Vec<String>,
}

/// The certificates the pods' instances report, one row per kind in a fixed order, each at
/// the earliest expiry (the one that breaks first) with the instances that have it.
fn certificate_rows(pods: &[Pod]) -> Vec<CertificateRow> {
    const ORDER: [&str; 5] = ["server", "replication", "ca", "source", "source-ca"];
    let mut rows: Vec<CertificateRow> = Vec::new();
    for pod in pods {
        let Some(reported) = Reported::of(pod) else {
            continue;
        };
        for installed in reported.certificates {
            let Ok(expires) = Timestamp::from_second(installed.not_after) else {
                continue;
            };
            match rows
                .iter_mut()
                .find(|row| row.certificate == installed.certificate)
            {
                Some(row) if expires < row.expires => {
                    row.expires = expires;
                    row.instances = vec![pod.name_any()];
                }
                Some(row) if expires == row.expires => row.instances.push(pod.name_any()),
                Some(_) => {}
                None => rows.push(CertificateRow {
                    certificate: installed.certificate,
                    expires,
                    instances: vec![pod.name_any()],
                }),
            }
        }
    }
    let rank = |name: &str| {
        ORDER
            .iter()
            .position(|known| *known == name)
            .unwrap_or(ORDER.len())
    };
    rows.sort_by(|a, b| {
        rank(&a.certificate)
            .cmp(&rank(&b.certificate))
            .then_with(|| a.certificate.cmp(&b.certificate))
    });
    for row in &mut rows {
        row.instances.sort_by_key(|pod| natural_key(pod));
    }
    rows
}

/// Everything `status` shows about a cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Cluster name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Phase the operator reports (empty before its first reconciliation).
    pub phase: String,
    /// Image the instances run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Instances asked for.
    pub instances: i32,
    /// Instances ready (operator's count).
    pub ready_instances: i32,
    /// Current primary (operator's status, else the pod labelled primary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Timeline of the primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<i64>,
    /// Hibernation asked for (spec or annotation).
    pub hibernated: bool,
    /// Fence requests (spec.fencedInstances and the annotation).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<String>,
    /// Switchover asked for on the cluster (spec.switchoverTo or the annotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_requested: Option<String>,
    /// Switchover in flight (the annotation on the Lease the instance managers act on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_in_flight: Option<String>,
    /// Conditions of the cluster.
    pub conditions: Vec<ConditionRow>,
    /// The instance pods, primary first.
    pub instance_pods: Vec<InstanceRow>,
    /// BackupJobs of the cluster, newest first.
    pub backups: Vec<BackupRow>,
    /// The certificates the instances use (TLS on), each at its earliest expiry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateRow>,
}

/// Builds the view from the objects the API returned.
pub fn cluster_view(
    cluster: &PostgresCluster,
    pods: &[Pod],
    lease_annotations: &BTreeMap<String, String>,
    jobs: &[BackupJob],
    backups_shown: usize,
) -> ClusterView {
    let status = cluster.status.clone().unwrap_or_default();
    let annotations = cluster.annotations();
    let mut instance_pods: Vec<InstanceRow> = pods.iter().map(InstanceRow::from_pod).collect();
    sort_instances(&mut instance_pods);
    let mut fenced = cluster.spec.fenced_instances.clone();
    fenced.extend(
        annotations
            .get(FENCED_ANNOTATION)
            .map(|value| crate::fence::FenceList::parse(value).names())
            .unwrap_or_default(),
    );
    let primary = status.current_primary.clone().or_else(|| {
        instance_pods
            .iter()
            .find(|i| i.is_primary())
            .map(|i| i.pod.clone())
    });
    let mut backups: Vec<BackupRow> = jobs
        .iter()
        .filter(|job| job.spec.cluster.name == cluster.name_any())
        .map(BackupRow::from_job)
        .collect();
    backups.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.name.cmp(&b.name)));
    backups.truncate(backups_shown);
    ClusterView {
        name: cluster.name_any(),
        namespace: cluster.namespace().unwrap_or_default(),
        phase: status.phase.unwrap_or_default(),
        image: status.image.or(cluster.spec.image.clone()),
        instances: cluster.spec.instances,
        ready_instances: status.ready_instances,
        primary,
        timeline: status.timeline,
        hibernated: cluster.spec.hibernation
            || annotations
                .get(HIBERNATION_ANNOTATION)
                .is_some_and(|value| value == "on" || value == "true"),
        fenced,
        switchover_requested: cluster.spec.switchover_to.clone().or_else(|| {
            annotations
                .get(contract::ANNOTATION_SWITCHOVER_TO)
                .filter(|value| !value.is_empty())
                .cloned()
        }),
        switchover_in_flight: lease_annotations
            .get(contract::ANNOTATION_SWITCHOVER_TO)
            .filter(|value| !value.is_empty())
            .cloned(),
        conditions: status
            .conditions
            .iter()
            .map(|c| ConditionRow {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                since: c.last_transition_time.0,
            })
            .collect(),
        instance_pods,
        backups,
        certificates: certificate_rows(pods),
    }
}

/// Orders instances as `status` lists them: the primary first, then by ordinal.
pub fn sort_instances(instances: &mut [InstanceRow]) {
    instances.sort_by(|a, b| {
        b.is_primary()
            .cmp(&a.is_primary())
            .then_with(|| natural_key(&a.pod).cmp(&natural_key(&b.pod)))
    });
}

/// Sorts `db-10` after `db-9`.
fn natural_key(name: &str) -> (String, u64) {
    match name.rsplit_once('-') {
        Some((stem, ordinal)) if ordinal.parse::<u64>().is_ok() => {
            (stem.to_string(), ordinal.parse().unwrap_or_default())
        }
        _ => (name.to_string(), 0),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    /// A pod as an instance manager leaves it.
    pub fn pod(name: &str, role: &str, ready: bool, reported: serde_json::Value) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([
                    (contract::LABEL_CLUSTER.into(), "db".into()),
                    (contract::LABEL_ROLE.into(), role.into()),
                ])),
                annotations: Some(BTreeMap::from([(
                    contract::ANNOTATION_INSTANCE_STATUS.into(),
                    reported.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.1.0.7".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn a_replica_row_shows_received_lsn_lag_and_timeline() {
        let row = InstanceRow::from_pod(&pod(
            "db-1",
            "replica",
            true,
            json!({"role": "replica", "receivedLsn": "0/5000000", "replayLsn": "0/4F00000",
                   "lagBytes": 1048576, "timeline": 2, "futureField": [1]}),
        ));
        assert_eq!(row.status, "ready");
        assert_eq!(row.lsn.as_deref(), Some("0/5000000"));
        assert_eq!(row.lag_bytes, Some(1048576));
        assert_eq!(row.timeline, Some(2));
        assert_eq!(row.node.as_deref(), Some("node-a"));
        assert_eq!(row.ip.as_deref(), Some("10.1.0.7"));
    }

    #[test]
    fn a_primary_row_shows_its_current_lsn_and_no_lag() {
        let row = InstanceRow::from_pod(&pod(
            "db-0",
            "primary",
            true,
            json!({"role": "primary", "currentLsn": "0/5000100", "lagBytes": 0, "timeline": 2}),
        ));
        assert!(row.is_primary());
        assert_eq!(row.lsn.as_deref(), Some("0/5000100"));
        assert_eq!(row.lag_bytes, None);
    }

    #[test]
    fn a_designated_primary_row_shows_its_distance_to_the_sources_archive() {
        let row = InstanceRow::from_pod(&pod(
            "dr-0",
            "primary",
            true,
            json!({"role": "primary", "inRecovery": true, "sourceArchive": {"source": "db",
                   "segments": 2, "bytes": 25165824, "seconds": 75.5,
                   "checkedAt": "2026-12-04T10:00:00Z"}}),
        ));
        let lag = row.source_archive.expect("the distance");
        assert_eq!(
            (lag.source.as_str(), lag.segments, lag.bytes),
            ("db", 2, 25165824)
        );
        assert_eq!(lag.seconds, 75.5);
    }

    #[test]
    fn each_certificate_shows_its_earliest_expiry_and_the_instances_that_have_it() {
        let certificates = |server: i64| {
            json!({"role": "replica", "certificates": [
                {"certificate": "ca", "notBefore": 0, "notAfter": 9_000_000},
                {"certificate": "server", "notBefore": 0, "notAfter": server},
                {"certificate": "custom", "notBefore": 0, "notAfter": 5}]})
        };
        let pods = [
            pod("db-10", "replica", true, certificates(2_000_000)),
            pod("db-2", "replica", true, certificates(1_000_000)),
            pod("db-1", "primary", true, certificates(1_000_000)),
            pod("db-3", "replica", true, json!({"role": "replica"})),
        ];
        let rows = certificate_rows(&pods);
        let seen: Vec<(&str, i64, Vec<&str>)> = rows
            .iter()
            .map(|row| {
                (
                    row.certificate.as_str(),
                    row.expires.as_second(),
                    row.instances.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("server", 1_000_000, vec!["db-1", "db-2"]),
                ("ca", 9_000_000, vec!["db-1", "db-2", "db-10"]),
                ("custom", 5, vec!["db-1", "db-2", "db-10"]),
            ]
        );
    }

    #[test]
    fn fenced_and_unreadable_status_are_shown_as_such() {
        let mut fenced = pod(
            "db-2",
            "fenced",
            false,
            json!({"role": "fenced", "fenced": true}),
        );
        fenced
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(contract::ANNOTATION_FENCED.into(), "true".into());
        assert_eq!(InstanceRow::from_pod(&fenced).status, "fenced");
        let garbled = pod("db-3", "replica", false, json!("not an object"));
        let row = InstanceRow::from_pod(&garbled);
        assert_eq!(row.status, "not-ready");
        assert_eq!(row.lsn, None);
    }

    #[test]
    fn the_view_puts_the_primary_first_and_keeps_only_this_clusters_backups() {
        let cluster: PostgresCluster = serde_json::from_value(json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": "db", "namespace": "ns",
                         "annotations": {FENCED_ANNOTATION: "db-10"}},
            "spec": {"instances": 3, "image": "pg:18", "hibernation": true},
            "status": {"phase": "Healthy", "readyInstances": 2, "timeline": 2}
        }))
        .unwrap();
        let pods = [
            pod("db-10", "replica", true, json!({})),
            pod("db-9", "replica", true, json!({})),
            pod("db-11", "primary", true, json!({})),
        ];
        let job = |name: &str, cluster: &str, created: &str| -> BackupJob {
            serde_json::from_value(json!({
                "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "BackupJob",
                "metadata": {"name": name, "creationTimestamp": created},
                "spec": {"cluster": {"name": cluster}},
                "status": {"phase": "Completed"}
            }))
            .unwrap()
        };
        let jobs = [
            job("old", "db", "2026-12-01T00:00:00Z"),
            job("other", "elsewhere", "2026-12-03T00:00:00Z"),
            job("new", "db", "2026-12-02T00:00:00Z"),
        ];
        let lease = BTreeMap::from([(
            contract::ANNOTATION_SWITCHOVER_TO.to_string(),
            "db-9".to_string(),
        )]);
        let view = cluster_view(&cluster, &pods, &lease, &jobs, 5);
        let names: Vec<_> = view.instance_pods.iter().map(|i| i.pod.as_str()).collect();
        assert_eq!(names, ["db-11", "db-9", "db-10"]);
        assert_eq!(view.primary.as_deref(), Some("db-11"));
        assert_eq!(view.image.as_deref(), Some("pg:18"));
        assert!(view.hibernated);
        assert_eq!(view.fenced, ["db-10"]);
        assert_eq!(view.switchover_in_flight.as_deref(), Some("db-9"));
        let backups: Vec<_> = view.backups.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(backups, ["new", "old"]);
        assert_eq!(view.backups[0].method, "barmanCloud");
        assert_eq!(view.backups[0].action, "Backup");
    }
}
