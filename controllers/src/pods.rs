//! What a pod's own status says about why it does not run, for the conditions of the objects
//! whose pods they are (PostgresCluster instances, Pooler and router pods).

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

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

/// Why `pod` does not run, from its own status: not scheduled (the scheduler's message), or a
/// container waiting for a reason that needs the user (an image that cannot be pulled, a crash
/// loop). On one line, at most [`MAX_ERROR_CHARS`] characters; `None` while it starts or runs.
pub fn pod_problem(pod: &Pod) -> Option<String> {
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

/// Why the pods of `selector` in `namespace` that cannot run do not, for the end of a condition
/// message: `; <pod>: <problem>` each (see [`pod_problem`]), by pod name. A failed list says
/// nothing: the count of ready pods the message starts with stands on its own.
pub async fn stuck(client: &kube::Client, namespace: &str, selector: &str) -> String {
    let pods = match Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await
    {
        Ok(pods) => pods.items,
        Err(error) => {
            tracing::debug!(namespace, selector, %error, "listing pods failed");
            return String::new();
        }
    };
    let mut stuck: Vec<(String, String)> = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| Some((pod.name_any(), pod_problem(pod)?)))
        .collect();
    stuck.sort();
    stuck
        .iter()
        .map(|(pod, problem)| format!("; {pod}: {problem}"))
        .collect()
}

/// Longest error a status repeats: the status stays small and a condition message readable;
/// the whole text is in the pod's status or annotation and in its log.
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

#[cfg(test)]
mod tests {
    use super::*;

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
            pod_problem(&unscheduled).as_deref(),
            Some("not scheduled: 0/1 nodes are available: 1 Insufficient cpu.")
        );
        let pulling = pod(serde_json::json!({"containerStatuses": [{
            "name": "postgres", "image": "pg:19", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"pg:19\""}}}]}));
        assert_eq!(
            pod_problem(&pulling).as_deref(),
            Some("container postgres: ImagePullBackOff: Back-off pulling image \"pg:19\"")
        );
        // Starting is no problem.
        let creating = pod(serde_json::json!({"containerStatuses": [{
            "name": "postgres", "image": "pg:18", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(pod_problem(&creating), None);
    }

    #[test]
    fn an_error_is_put_on_one_line_and_cut_at_a_character_boundary() {
        assert_eq!(one_line("a\n\n b\tc ", 10), "a b c");
        assert_eq!(one_line("ééééé", 4), "ééé…");
        assert_eq!(one_line("abcd", 4), "abcd");
    }
}
