//! The `ContinuousArchiving` condition of a PostgresCluster, from the WAL archiver's report that
//! the primary's instance manager publishes (`walArchive` in its status annotation). Pure.

use api::postgres_cluster::PostgresCluster;

use super::instances::InstanceView;

/// Condition type.
pub const CONTINUOUS_ARCHIVING: &str = "ContinuousArchiving";

/// What the primary's archiver reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveView {
    /// The newest upload succeeded.
    pub healthy: bool,
    /// Last WAL file archived.
    pub last_archived_wal: Option<String>,
    /// Why the last upload failed.
    pub last_failure: Option<String>,
    /// Why the instance refuses to bootstrap the cluster (its repository is in use).
    pub refused: Option<String>,
}

impl ArchiveView {
    /// Reads `walArchive` from an instance status report.
    pub fn from_report(report: &serde_json::Value) -> Option<Self> {
        let archive = report.get("walArchive")?;
        let text = |key: &str| {
            archive
                .get(key)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        Some(Self {
            healthy: archive
                .get("healthy")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            last_archived_wal: text("lastArchivedWal"),
            last_failure: text("lastFailure"),
            refused: text("refused"),
        })
    }
}

/// `(status, reason, message)` of the condition; `None` when the cluster does not archive WAL.
pub fn condition(
    cluster: &PostgresCluster,
    instances: &[&InstanceView],
) -> Option<(bool, &'static str, String)> {
    let backup = cluster.spec.backup.as_ref()?;
    if !backup.wal_archiving {
        return Some((
            false,
            "Disabled",
            "spec.backup.walArchiving is off: point-in-time recovery is not possible".into(),
        ));
    }
    // A new cluster whose repository already holds backups or WAL is not bootstrapped.
    if let Some(refused) = instances
        .iter()
        .find_map(|instance| instance.archive.as_ref()?.refused.clone())
    {
        return Some((false, "ArchiveNotEmpty", refused));
    }
    let primary = instances.iter().find(|instance| instance.is_primary());
    let Some(archive) = primary.and_then(|primary| primary.archive.as_ref()) else {
        return Some((
            false,
            "WaitingForPrimary",
            "no primary reports WAL archiving yet".into(),
        ));
    };
    if archive.healthy {
        Some((
            true,
            "Archiving",
            match &archive.last_archived_wal {
                Some(wal) => format!("WAL is archived continuously; last archived: {wal}"),
                None => "WAL archiving is set up; nothing archived yet".into(),
            },
        ))
    } else {
        let failure = archive.last_failure.as_deref().unwrap_or("unknown error");
        let last = failure
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or(failure);
        Some((
            false,
            "ArchivingFailing",
            format!(
                "WAL uploads to the backup repository fail (WAL is kept on the primary meanwhile): {}",
                last.trim()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(backup: bool) -> PostgresCluster {
        let mut spec = serde_json::json!({"image": "postgres:18"});
        if backup {
            spec["backup"] = serde_json::json!({"s3": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "keys"}}});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": "db"}, "spec": spec,
        }))
        .unwrap()
    }

    fn primary(report: serde_json::Value) -> InstanceView {
        InstanceView {
            name: "db-1".into(),
            role: Some("primary".into()),
            archive: ArchiveView::from_report(&report),
            ..InstanceView::default()
        }
    }

    #[test]
    fn the_primarys_archiver_decides_the_condition() {
        assert!(condition(&cluster(false), &[]).is_none());
        let mut unarchived = cluster(true);
        unarchived.spec.backup.as_mut().unwrap().wal_archiving = false;
        let (status, reason, _) = condition(&unarchived, &[]).unwrap();
        assert!(!status);
        assert_eq!(reason, "Disabled");
        let healthy = primary(
            serde_json::json!({"walArchive": {"healthy": true, "lastArchivedWal": "000000010000000000000007"}}),
        );
        let (status, reason, message) = condition(&cluster(true), &[&healthy]).unwrap();
        assert!(status);
        assert_eq!(reason, "Archiving");
        assert!(message.contains("000000010000000000000007"));
        let failing = primary(
            serde_json::json!({"walArchive": {"healthy": false, "lastFailure": "barman-cloud-wal-archive failed\nERROR: Bucket nope does not exist"}}),
        );
        let (status, reason, message) = condition(&cluster(true), &[&failing]).unwrap();
        assert!(!status);
        assert_eq!(reason, "ArchivingFailing");
        assert!(
            message.ends_with("ERROR: Bucket nope does not exist"),
            "{message}"
        );
        let (status, reason, _) = condition(&cluster(true), &[]).unwrap();
        assert!(!status);
        assert_eq!(reason, "WaitingForPrimary");
    }

    #[test]
    fn a_repository_in_use_is_named_before_any_primary_exists() {
        let refusing = InstanceView {
            name: "db-0".into(),
            archive: ArchiveView::from_report(&serde_json::json!({"walArchive": {
                "healthy": false, "refused": "not bootstrapping: the backup repository s3://backups/db/db already holds archived WAL"}})),
            ..InstanceView::default()
        };
        let (status, reason, message) = condition(&cluster(true), &[&refusing]).unwrap();
        assert!(!status);
        assert_eq!(reason, "ArchiveNotEmpty");
        assert!(message.contains("already holds archived WAL"), "{message}");
    }
}
