//! Backup metrics (prefix `pg_instance_`): WAL archiving progress and failures, base backups.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The backup metrics; clones share their values.
#[derive(Clone, Debug, Default)]
pub struct BackupMetrics {
    /// Unix time of the last WAL file archived.
    pub last_archived_time: Gauge<f64, AtomicU64>,
    /// Number of the last WAL segment archived (log id * 256 + segment, timeline left out).
    pub last_archived_segment: Gauge,
    /// WAL files archived.
    pub archived: Counter,
    /// Failed WAL uploads.
    pub failures: Counter,
    /// WAL files waiting to be archived.
    pub pending: Gauge,
    /// Base backups completed on this instance.
    pub backups_completed: Counter,
    /// Base backups failed on this instance.
    pub backups_failed: Counter,
    /// Unix time of the last base backup this instance completed (the PostgresBackupTooOld
    /// alert reads its maximum over the cluster's instances).
    pub last_backup_time: Gauge<f64, AtomicU64>,
}

impl BackupMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "wal_archive_last_archived_timestamp_seconds",
            "Unix time of the last WAL file archived to the backup repository",
            self.last_archived_time.clone(),
        );
        registry.register(
            "wal_archive_last_archived_segment",
            "Number of the last WAL segment archived (log id * 256 + segment)",
            self.last_archived_segment.clone(),
        );
        registry.register(
            "wal_archive_archived",
            "WAL files archived to the backup repository",
            self.archived.clone(),
        );
        registry.register(
            "wal_archive_failures",
            "Failed WAL uploads to the backup repository",
            self.failures.clone(),
        );
        registry.register(
            "wal_archive_pending_segments",
            "WAL files ready to archive and not archived yet",
            self.pending.clone(),
        );
        registry.register(
            "base_backups_completed",
            "Base backups completed by this instance",
            self.backups_completed.clone(),
        );
        registry.register(
            "base_backups_failed",
            "Base backups failed on this instance",
            self.backups_failed.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "Unix time of the last base backup this instance completed",
            self.last_backup_time.clone(),
        );
    }
}

/// The segment number of a WAL file name (`TTTTTTTTLLLLLLLLSSSSSSSS[.partial]`), for 16 MiB
/// segments; `None` for history files.
pub fn segment_number(name: &str) -> Option<i64> {
    let base = name.strip_suffix(".partial").unwrap_or(name);
    if base.len() != 24 {
        return None;
    }
    let log = i64::from_str_radix(&base[8..16], 16).ok()?;
    let segment = i64::from_str_radix(&base[16..24], 16).ok()?;
    Some(log * 256 + segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_numbers() {
        assert_eq!(segment_number("000000010000000000000003"), Some(3));
        assert_eq!(
            segment_number("000000020000000100000004.partial"),
            Some(260)
        );
        assert_eq!(segment_number("00000002.history"), None);
    }
}
