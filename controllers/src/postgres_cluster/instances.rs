//! What the instance pods say about themselves: role label, readiness, spec hash and the status
//! annotation their instance manager writes. Pure conversions from Pod objects.

use api::contract;
use k8s_openapi::api::core::v1::Pod;

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
}

/// Waiting reasons of a container that do not go away by themselves.
const STUCK_REASONS: [&str; 7] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// See [`InstanceView::pod_problem`].
fn pod_problem(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let unscheduled = status.conditions.iter().flatten().find(|condition| {
        condition.type_ == "PodScheduled"
            && condition.status == "False"
            && condition.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(condition) = unscheduled {
        let message = condition.message.as_deref().unwrap_or("no reason given");
        return Some(one_line(
            &format!("not scheduled: {message}"),
            MAX_ERROR_CHARS,
        ));
    }
    let containers = status.init_container_statuses.iter().flatten();
    containers
        .chain(status.container_statuses.iter().flatten())
        .find_map(|container| {
            let waiting = container.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            STUCK_REASONS.contains(&reason).then(|| {
                let message = waiting.message.as_deref().unwrap_or_default();
                one_line(
                    &format!("container {}: {reason}: {message}", container.name),
                    MAX_ERROR_CHARS,
                )
                .trim_end_matches([' ', ':'])
                .to_string()
            })
        })
}

/// Longest instance error the cluster status repeats: the status stays small and a condition
/// message readable; the whole text is in the pod's annotation and the instance's log.
pub const MAX_ERROR_CHARS: usize = 400;

/// `text` on one line (runs of white space, new lines included, become one space), cut to
/// `max` characters with an ellipsis.
pub fn one_line(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
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
        let ready = pod
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
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

    #[test]
    fn reads_role_readiness_hash_and_reported_timeline() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("db-2".into()),
                labels: Some(BTreeMap::from([(
                    contract::LABEL_ROLE.into(),
                    "primary".into(),
                )])),
                annotations: Some(BTreeMap::from([
                    (contract::ANNOTATION_SPEC_HASH.into(), "abc".into()),
                    (
                        contract::ANNOTATION_INSTANCE_STATUS.into(),
                        r#"{"role":"primary","timeline":3,"lsn":"0/3000060","lastJoin":"reinitdb","bootstrapping":true,"lastError":"initdb failed (exit status: 1):\n  initdb: error: invalid locale name"}"#
                            .into(),
                    ),
                ])),
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
        };
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
    fn a_pod_that_cannot_run_says_why() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": "db-0"}, "status": status}),
            )
            .unwrap()
        };
        let unscheduled = pod(serde_json::json!({"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient cpu."}]}));
        assert_eq!(
            InstanceView::from_pod("db", &unscheduled)
                .pod_problem
                .as_deref(),
            Some("not scheduled: 0/1 nodes are available: 1 Insufficient cpu.")
        );
        let pulling = pod(serde_json::json!({"containerStatuses": [{
            "name": "postgres", "image": "pg:19", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"pg:19\""}}}]}));
        assert_eq!(
            InstanceView::from_pod("db", &pulling)
                .pod_problem
                .as_deref(),
            Some("container postgres: ImagePullBackOff: Back-off pulling image \"pg:19\"")
        );
        // Starting is no problem.
        let creating = pod(serde_json::json!({"containerStatuses": [{
            "name": "postgres", "image": "pg:18", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(InstanceView::from_pod("db", &creating).pod_problem, None);
    }

    #[test]
    fn an_error_is_put_on_one_line_and_cut_at_a_character_boundary() {
        assert_eq!(one_line("a\n\n b\tc ", 10), "a b c");
        assert_eq!(one_line("ééééé", 4), "ééé…");
        assert_eq!(one_line("abcd", 4), "abcd");
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
}
