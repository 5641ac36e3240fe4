//! What the instance pods say about themselves: role label, readiness, spec hash and the status
//! annotation their instance manager writes. Pure conversions from Pod objects.

use api::contract;
use k8s_openapi::api::core::v1::Pod;

use crate::pods::{MAX_ERROR_CHARS, one_line, pod_problem};

/// One instance pod as the operator sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceView {
    /// Pod name.
    pub name: String,
    /// Ordinal from the StatefulSet name (`<cluster>-<ordinal>`).
    pub ordinal: i32,
    /// Role label the instance manager set, if any.
    pub role: Option<String>,
    /// Pod condition Ready is True.
    pub ready: bool,
    /// The pod is being deleted.
    pub terminating: bool,
    /// Spec hash of the template the pod was made from.
    pub spec_hash: Option<String>,
    /// The pod carries the fenced annotation.
    pub fenced: bool,
    /// Timeline from the instance manager's status annotation.
    pub timeline: Option<i64>,
    /// PostgreSQL is in recovery (`inRecovery` of the status annotation): a replica, or a replica
    /// cluster's designated primary.
    pub in_recovery: Option<bool>,
    /// Replication lag (bytes) from the instance manager's status annotation.
    pub lag_bytes: Option<i64>,
    /// The WAL archiver's report from the status annotation (primary with `spec.backup`).
    pub archive: Option<super::archiving::ArchiveView>,
    /// How the instance last got its data (`lastJoin` of its status annotation).
    pub last_join: Option<String>,
    /// Why the instance cannot start by itself (`dataLost` of its status annotation): the
    /// cluster's only data is gone.
    pub data_lost: Option<String>,
    /// A new cluster's primary still making its application role and database (`bootstrapping`
    /// of its status annotation).
    pub bootstrapping: bool,
    /// The instance manager's last error (`lastError` of its status annotation), shortened to
    /// one line of at most [`MAX_ERROR_CHARS`] characters.
    pub last_error: Option<String>,
    /// Why the pod does not run, from its own status: not scheduled (the scheduler's message),
    /// or a container waiting for a reason that needs the user (an image that cannot be
    /// pulled, a crash loop). Shortened like [`Self::last_error`].
    pub pod_problem: Option<String>,
    /// A replica cluster's designated primary: how far behind its source's WAL archive it is
    /// (`sourceArchive` of its status annotation).
    pub source_archive: Option<SourceArchiveView>,
    /// Digest of the CA bundle PostgreSQL has loaded (`tlsCa` of its status annotation,
    /// [`contract::ca_bundle_digest`]).
    pub tls_ca: Option<String>,
}

/// A designated primary's distance to its source's archive, as the operator reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceArchiveView {
    /// Archived WAL segments not replayed yet.
    pub segments: u64,
    /// Bytes not replayed yet.
    pub bytes: u64,
    /// Why the last listing of the source's archive failed.
    pub error: Option<String>,
}

impl SourceArchiveView {
    /// Reads `sourceArchive` from an instance status report.
    fn from_report(report: &serde_json::Value) -> Option<Self> {
        let lag = report.get("sourceArchive")?;
        let number = |key: &str| lag.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        Some(Self {
            segments: number("segments"),
            bytes: number("bytes"),
            error: lag
                .get("error")
                .and_then(|v| v.as_str())
                .map(|text| one_line(text, MAX_ERROR_CHARS)),
        })
    }
}

impl InstanceView {
    /// Reads a pod of `cluster`.
    pub fn from_pod(cluster: &str, pod: &Pod) -> Self {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ordinal = name
            .strip_prefix(cluster)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.parse().ok())
            .unwrap_or(-1);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        // A pod the operator relabelled `unknown` (a stale primary, see `stale_primary`) is not
        // counted ready, whatever its probe says, until its instance manager labels it again.
        let ready = pod
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            && labels.get(contract::LABEL_ROLE).map(String::as_str)
                != Some(contract::role::UNKNOWN);
        let report: serde_json::Value = annotations
            .get(contract::ANNOTATION_INSTANCE_STATUS)
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        let number = |keys: &[&str]| keys.iter().find_map(|key| report.get(*key)?.as_i64());
        Self {
            name,
            ordinal,
            role: labels.get(contract::LABEL_ROLE).cloned(),
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            spec_hash: annotations.get(contract::ANNOTATION_SPEC_HASH).cloned(),
            fenced: annotations
                .get(contract::ANNOTATION_FENCED)
                .is_some_and(|value| value == "true"),
            timeline: number(&["timeline"]),
            in_recovery: report.get("inRecovery").and_then(|v| v.as_bool()),
            lag_bytes: number(&["lagBytes", "lag_bytes", "replicationLagBytes"]),
            archive: super::archiving::ArchiveView::from_report(&report),
            last_join: report
                .get("lastJoin")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            data_lost: report
                .get("dataLost")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            bootstrapping: report
                .get("bootstrapping")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            last_error: report
                .get("lastError")
                .and_then(|v| v.as_str())
                .map(|text| one_line(text, MAX_ERROR_CHARS)),
            pod_problem: pod_problem(pod),
            source_archive: SourceArchiveView::from_report(&report),
            tls_ca: report
                .get("tlsCa")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        }
    }

    /// Whether the instance manager labelled this pod the primary.
    pub fn is_primary(&self) -> bool {
        self.role.as_deref() == Some(contract::role::PRIMARY)
    }
}

/// The pod labelled primary (the first one, should two briefly claim it).
pub fn primary(instances: &[InstanceView]) -> Option<&InstanceView> {
    instances.iter().find(|instance| instance.is_primary())
}

/// Pods labelled primary while another pod, labelled primary too, holds the cluster's Lease
/// (`holder`): a primary cut off from the API server cannot take its own label off, and its
/// instance manager fenced it before the Lease could pass (the renew deadline is shorter than
/// the Lease). Nothing is stale while the holder has not labelled itself yet.
pub fn stale_primaries<'a>(
    instances: &'a [InstanceView],
    holder: Option<&str>,
) -> Vec<&'a InstanceView> {
    let Some(holder) = holder else {
        return Vec::new();
    };
    if !instances
        .iter()
        .any(|instance| instance.name == holder && instance.is_primary() && !instance.terminating)
    {
        return Vec::new();
    }
    instances
        .iter()
        .filter(|instance| instance.is_primary() && instance.name != holder)
        .collect()
}

/// Instances to fence, from `spec.fencedInstances` and the cluster's fenced annotation (`"*"` or
/// comma-separated pod names).
pub fn fenced_names(
    spec_list: &[String],
    annotation: Option<&str>,
    pods: &[String],
) -> Vec<String> {
    let mut requested: Vec<String> = spec_list.to_vec();
    if let Some(value) = annotation {
        requested.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_string),
        );
    }
    if requested.iter().any(|name| name == "*") {
        return pods.to_vec();
    }
    pods.iter()
        .filter(|pod| requested.contains(pod))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    /// A pod whose probe passes (Ready), labelled `role`.
    fn ready_pod(name: &str, role: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(contract::LABEL_ROLE.into(), role.into())])),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn reads_role_readiness_hash_and_reported_timeline() {
        let mut pod = ready_pod("db-2", "primary");
        pod.metadata.annotations = Some(BTreeMap::from([
            (contract::ANNOTATION_SPEC_HASH.into(), "abc".into()),
            (
                contract::ANNOTATION_INSTANCE_STATUS.into(),
                r#"{"role":"primary","timeline":3,"lsn":"0/3000060","lastJoin":"reinitdb","bootstrapping":true,"lastError":"initdb failed (exit status: 1):\n  initdb: error: invalid locale name"}"#
                    .into(),
            ),
        ]));
        let view = InstanceView::from_pod("db", &pod);
        assert_eq!(view.ordinal, 2);
        assert!(view.is_primary() && view.ready && !view.terminating && !view.fenced);
        assert_eq!(view.spec_hash.as_deref(), Some("abc"));
        assert_eq!(view.timeline, Some(3));
        assert_eq!(view.last_join.as_deref(), Some("reinitdb"));
        assert!(view.bootstrapping);
        assert_eq!(
            view.last_error.as_deref(),
            Some("initdb failed (exit status: 1): initdb: error: invalid locale name")
        );
    }

    #[test]
    fn a_pod_relabelled_unknown_is_not_ready_whatever_its_probe_says() {
        let pod = ready_pod("db-0", contract::role::UNKNOWN);
        let view = InstanceView::from_pod("db", &pod);
        assert!(!view.ready && !view.is_primary());
    }

    #[test]
    fn fencing_takes_names_from_spec_and_annotation_and_star_means_all() {
        let pods = vec!["db-0".to_string(), "db-1".to_string(), "db-2".to_string()];
        assert_eq!(
            fenced_names(&["db-1".into()], Some("db-2, nope"), &pods),
            ["db-1", "db-2"]
        );
        assert_eq!(fenced_names(&[], Some("*"), &pods), pods);
        assert!(fenced_names(&[], None, &pods).is_empty());
    }

    #[test]
    fn a_primary_label_is_stale_only_once_the_lease_holder_labelled_itself_primary() {
        let view = |name: &str, role: &str| InstanceView {
            name: name.to_string(),
            role: Some(role.to_string()),
            ..InstanceView::default()
        };
        let names = |stale: Vec<&InstanceView>| -> Vec<String> {
            stale.iter().map(|i| i.name.clone()).collect()
        };
        // The partitioned db-0 still claims it; db-1 took the Lease and labelled itself.
        let after = [
            view("db-0", "primary"),
            view("db-1", "primary"),
            view("db-2", "replica"),
        ];
        assert_eq!(names(stale_primaries(&after, Some("db-1"))), ["db-0"]);
        // db-1 holds the Lease but has not labelled itself yet: db-0's label stays.
        let promoting = [
            view("db-0", "primary"),
            view("db-1", "replica"),
            view("db-2", "replica"),
        ];
        assert!(stale_primaries(&promoting, Some("db-1")).is_empty());
        // One primary, the holder; no Lease yet.
        assert!(stale_primaries(&after[1..], Some("db-1")).is_empty());
        assert!(stale_primaries(&after, None).is_empty());
    }
}
