//! The `ReplicaCluster` condition of a PostgresCluster with `spec.replica`: whether it follows its
//! source's WAL archive (read-only), is being promoted, or was promoted. Pure.

use api::postgres_cluster::{PostgresCluster, ReplicaStreaming};

use super::instances::{InstanceView, SourceArchiveView};

/// Condition type.
pub const REPLICA_CLUSTER: &str = "ReplicaCluster";

/// Whether the cluster is a replica cluster now (`spec.replica.enabled` with a recovery source).
pub fn is_replica_cluster(cluster: &PostgresCluster) -> bool {
    cluster
        .spec
        .replica
        .as_ref()
        .is_some_and(|replica| replica.enabled)
        && cluster
            .spec
            .bootstrap
            .as_ref()
            .is_some_and(|bootstrap| bootstrap.recovery.is_some())
}

/// The source's primary a replica cluster streams from (`spec.replica.streaming`), while it is
/// a replica cluster.
pub fn streaming_source(cluster: &PostgresCluster) -> Option<&ReplicaStreaming> {
    cluster
        .spec
        .replica
        .as_ref()
        .filter(|_| is_replica_cluster(cluster))
        .and_then(|replica| replica.streaming.as_ref())
}

/// The designated primary's distance to the source's archive, as a clause of the message (in
/// segments, not seconds: the message changes when a segment arrives or is replayed, not at
/// every check).
fn distance(lag: &SourceArchiveView) -> String {
    if let Some(error) = &lag.error {
        return format!(" (its distance to the archive is unknown: listing it failed: {error})");
    }
    match lag.segments {
        0 => " (caught up with the archive)".to_string(),
        segments => format!(
            " ({segments} archived WAL segment(s), {} MiB, not replayed yet)",
            lag.bytes.div_ceil(1024 * 1024)
        ),
    }
}

/// `(status, reason, message)` of the condition; `None` without `spec.replica`.
pub fn condition(
    cluster: &PostgresCluster,
    primary: Option<&InstanceView>,
) -> Option<(bool, &'static str, String)> {
    cluster.spec.replica.as_ref()?;
    let recovery = cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|bootstrap| bootstrap.recovery.as_ref())?;
    let source = format!(
        "{} (s3://{}/{})",
        recovery.source_cluster,
        recovery.source.bucket,
        recovery.source.path.as_deref().unwrap_or_default()
    );
    if is_replica_cluster(cluster) {
        let distance = primary
            .and_then(|primary| primary.source_archive.as_ref())
            .map(distance)
            .unwrap_or_default();
        let primary = primary.map_or_else(|| "no instance yet".to_string(), |p| p.name.clone());
        return Some((
            true,
            "FollowingSource",
            format!(
                "a replica cluster: its designated primary ({primary}) replays the WAL archive of {source} and accepts no writes{distance}; set spec.replica.enabled to false to promote it"
            ),
        ));
    }
    Some(match primary {
        Some(primary) if primary.in_recovery == Some(false) => (
            false,
            "Promoted",
            format!(
                "promoted: {} accepts writes; the cluster no longer follows {source}",
                primary.name
            ),
        ),
        _ => (
            false,
            "Promoting",
            format!(
                "spec.replica.enabled is false: the rolling update promotes the cluster (it stops following {source})"
            ),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(enabled: bool) -> PostgresCluster {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "PostgresCluster",
            "metadata": {"name": "dr", "namespace": "default"},
            "spec": {
                "image": "postgres:18",
                "replica": {"enabled": enabled},
                "bootstrap": {"recovery": {"source": {"endpoint": "http://s3:9000", "bucket": "main", "path": "eu", "credentialsSecret": {"name": "keys"}}, "sourceCluster": "main"}}
            }
        }))
        .unwrap()
    }

    fn primary(in_recovery: bool) -> InstanceView {
        InstanceView {
            name: "dr-0".into(),
            role: Some("primary".into()),
            in_recovery: Some(in_recovery),
            ..InstanceView::default()
        }
    }

    #[test]
    fn a_replica_cluster_names_its_source_and_how_to_promote_it() {
        let (status, reason, message) = condition(&cluster(true), Some(&primary(true))).unwrap();
        assert!(status);
        assert_eq!(reason, "FollowingSource");
        assert!(message.contains("dr-0"), "{message}");
        assert!(message.contains("main (s3://main/eu)"), "{message}");
        assert!(message.contains("spec.replica.enabled"), "{message}");
    }

    #[test]
    fn the_message_says_how_far_behind_the_archive_the_designated_primary_is() {
        let message = |lag: Option<SourceArchiveView>| {
            let primary = InstanceView {
                source_archive: lag,
                ..primary(true)
            };
            condition(&cluster(true), Some(&primary)).unwrap().2
        };
        assert!(
            !message(None).contains("archive is unknown") && !message(None).contains("caught up"),
            "not measured yet: nothing said"
        );
        let caught_up = message(Some(SourceArchiveView::default()));
        assert!(
            caught_up.contains("(caught up with the archive)"),
            "{caught_up}"
        );
        let behind = message(Some(SourceArchiveView {
            segments: 3,
            bytes: 40 * 1024 * 1024 + 1,
            error: None,
        }));
        assert!(
            behind.contains("(3 archived WAL segment(s), 41 MiB, not replayed yet)"),
            "{behind}"
        );
        let failing = message(Some(SourceArchiveView {
            error: Some("AccessDenied".into()),
            ..SourceArchiveView::default()
        }));
        assert!(
            failing.contains("listing it failed: AccessDenied"),
            "{failing}"
        );
    }

    #[test]
    fn turned_off_it_is_promoting_until_the_primary_accepts_writes() {
        let promoting = condition(&cluster(false), Some(&primary(true))).unwrap();
        assert_eq!((promoting.0, promoting.1), (false, "Promoting"));
        let promoted = condition(&cluster(false), Some(&primary(false))).unwrap();
        assert_eq!((promoted.0, promoted.1), (false, "Promoted"));
        assert!(promoted.2.contains("dr-0 accepts writes"), "{}", promoted.2);
    }

    #[test]
    fn no_condition_without_spec_replica() {
        let mut plain = cluster(true);
        plain.spec.replica = None;
        assert_eq!(condition(&plain, None), None);
    }
}
