//! Prometheus metrics of one instance, refreshed from its status every tick.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::status::InstanceStatus;

/// Label set of the role gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    /// `primary`, `replica` or `fenced`.
    pub role: String,
}

/// Label set of a replica cluster's distance to its source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// The source cluster (`bootstrap.recovery.sourceCluster`).
    pub source: String,
}

/// Label set of an installed certificate's validity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabel {
    /// `server`, `replication`, `ca`, `source` or `source-ca`.
    pub certificate: String,
}

/// The validity of the installed certificates (the `PostgresCertificateExpiresSoon` alert
/// compares what is left with the certificate's lifetime).
#[derive(Default)]
struct Certificates {
    not_before: Family<CertificateLabel, Gauge>,
    not_after: Family<CertificateLabel, Gauge>,
}

/// A replica cluster's distance to its source's WAL archive: series only on its designated
/// primary (a family, so that no other instance shows a zero that would read as "caught up").
#[derive(Default)]
struct SourceArchive {
    bytes: Family<SourceLabel, Gauge>,
    seconds: Family<SourceLabel, Gauge<f64, AtomicU64>>,
    segments: Family<SourceLabel, Gauge>,
    failing: Family<SourceLabel, Gauge>,
}

/// The metrics.
pub struct Metrics {
    registry: Registry,
    up: Gauge,
    role: Family<RoleLabel, Gauge>,
    timeline: Gauge,
    lag_bytes: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    connections: Gauge,
    commits: Gauge,
    rollbacks: Gauge,
    wal_bytes: Gauge,
    restarts: Gauge,
    disk_available: Gauge,
    fence_running: Gauge,
    fence_restarts: Gauge,
    source_archive: SourceArchive,
    certificates: Certificates,
    /// Backup metrics (WAL archiving, base backups).
    pub backup: crate::backup::metrics::BackupMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `pg_instance` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pg_instance");
        let metrics = Self {
            up: Gauge::default(),
            role: Family::default(),
            timeline: Gauge::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            connections: Gauge::default(),
            commits: Gauge::default(),
            rollbacks: Gauge::default(),
            wal_bytes: Gauge::default(),
            restarts: Gauge::default(),
            disk_available: Gauge::default(),
            fence_running: Gauge::default(),
            fence_restarts: Gauge::default(),
            source_archive: SourceArchive::default(),
            certificates: Certificates::default(),
            backup: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "up",
            "1 when PostgreSQL accepts connections",
            metrics.up.clone(),
        );
        registry.register(
            "role",
            "1 for the current role of the instance",
            metrics.role.clone(),
        );
        registry.register(
            "timeline",
            "Current PostgreSQL timeline",
            metrics.timeline.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "Received but not yet replayed WAL (replicas)",
            metrics.lag_bytes.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Age of the last replayed transaction when behind (replicas)",
            metrics.lag_seconds.clone(),
        );
        registry.register(
            "connections",
            "Client connections",
            metrics.connections.clone(),
        );
        registry.register(
            "commits",
            "Committed transactions, all databases",
            metrics.commits.clone(),
        );
        registry.register(
            "rollbacks",
            "Rolled back transactions, all databases",
            metrics.rollbacks.clone(),
        );
        registry.register(
            "wal_bytes",
            "WAL bytes generated",
            metrics.wal_bytes.clone(),
        );
        registry.register(
            "postgres_restarts",
            "Times the instance manager restarted a crashed PostgreSQL",
            metrics.restarts.clone(),
        );
        metrics.backup.register(&mut registry);
        registry.register(
            "data_disk_available_bytes",
            "Free bytes on the data directory's file system",
            metrics.disk_available.clone(),
        );
        registry.register(
            "fence_running",
            "1 when the fence process runs (it stops a primary whose instance manager hangs)",
            metrics.fence_running.clone(),
        );
        registry.register(
            "fence_restarts",
            "Times the fence process was found gone and started again",
            metrics.fence_restarts.clone(),
        );
        registry.register(
            "source_archive_lag_bytes",
            "Replica cluster: WAL in the source's archive not replayed yet, in bytes",
            metrics.source_archive.bytes.clone(),
        );
        registry.register(
            "source_archive_lag_seconds",
            "Replica cluster: how long the oldest archived WAL segment not replayed yet has waited",
            metrics.source_archive.seconds.clone(),
        );
        registry.register(
            "source_archive_lag_segments",
            "Replica cluster: WAL segments in the source's archive not replayed yet",
            metrics.source_archive.segments.clone(),
        );
        registry.register(
            "source_archive_check_failing",
            "Replica cluster: 1 when the last listing of the source's archive failed",
            metrics.source_archive.failing.clone(),
        );
        registry.register(
            "certificate_not_before_timestamp_seconds",
            "Start of validity of an installed certificate (TLS on), Unix time",
            metrics.certificates.not_before.clone(),
        );
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "Expiry of an installed certificate (TLS on; for `ca`, the CA of the bundle that expires last), Unix time",
            metrics.certificates.not_after.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Copies the status into the gauges.
    pub fn update(&self, status: &InstanceStatus) {
        self.up.set(i64::from(status.postgres_ready));
        for role in [
            api::contract::role::PRIMARY,
            api::contract::role::REPLICA,
            api::contract::role::FENCED,
        ] {
            self.role
                .get_or_create(&RoleLabel {
                    role: role.to_string(),
                })
                .set(i64::from(status.role == role));
        }
        self.timeline.set(i64::from(status.timeline.unwrap_or(0)));
        self.lag_bytes.set(status.lag_bytes.unwrap_or(0) as i64);
        self.lag_seconds.set(status.lag_seconds.unwrap_or(0.0));
        self.connections.set(status.connections);
        self.commits.set(status.commits);
        self.rollbacks.set(status.rollbacks);
        self.wal_bytes.set(status.wal_bytes);
        self.restarts.set(status.postgres_restarts as i64);
        self.disk_available
            .set(status.data_disk_available_bytes.unwrap_or(0) as i64);
        let fence = status.fence.unwrap_or_default();
        self.fence_running.set(i64::from(fence.running));
        self.fence_restarts.set(fence.restarts as i64);
        let source = &self.source_archive;
        match &status.source_archive {
            Some(lag) => {
                let label = SourceLabel {
                    source: lag.source.clone(),
                };
                source.bytes.get_or_create(&label).set(lag.bytes as i64);
                source.seconds.get_or_create(&label).set(lag.seconds);
                source
                    .segments
                    .get_or_create(&label)
                    .set(lag.segments as i64);
                source
                    .failing
                    .get_or_create(&label)
                    .set(i64::from(lag.error.is_some()));
            }
            None => {
                source.bytes.clear();
                source.seconds.clear();
                source.segments.clear();
                source.failing.clear();
            }
        }
        self.update_certificates(&status.certificates);
    }

    fn update_certificates(&self, installed: &[crate::tls::CertificateValidity]) {
        let families = &self.certificates;
        // A certificate no longer installed (a replica cluster promoted, TLS turned off) leaves.
        families.not_before.clear();
        families.not_after.clear();
        for validity in installed {
            let label = CertificateLabel {
                certificate: validity.certificate.clone(),
            };
            families
                .not_before
                .get_or_create(&label)
                .set(validity.not_before);
            families
                .not_after
                .get_or_create(&label)
                .set(validity.not_after);
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_certificates_are_reported_and_leave_when_uninstalled() {
        let metrics = Metrics::new();
        let validity = |certificate: &str, not_after| crate::tls::CertificateValidity {
            certificate: certificate.to_string(),
            not_before: 1_000,
            not_after,
        };
        metrics.update(&InstanceStatus {
            certificates: vec![validity("server", 9_000), validity("source-ca", 5_000)],
            ..InstanceStatus::default()
        });
        let text = metrics.encode();
        for line in [
            "pg_instance_certificate_not_after_timestamp_seconds{certificate=\"server\"} 9000",
            "pg_instance_certificate_not_after_timestamp_seconds{certificate=\"source-ca\"} 5000",
            "pg_instance_certificate_not_before_timestamp_seconds{certificate=\"server\"} 1000",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        metrics.update(&InstanceStatus {
            certificates: vec![validity("server", 9_500)],
            ..InstanceStatus::default()
        });
        let text = metrics.encode();
        assert!(text.contains("{certificate=\"server\"} 9500"), "{text}");
        assert!(
            !text.contains("source-ca"),
            "promoted: no source any more: {text}"
        );
    }

    #[test]
    fn the_fence_process_is_reported() {
        let metrics = Metrics::new();
        metrics.update(&InstanceStatus {
            fence: Some(crate::watchdog::FenceReport {
                running: true,
                restarts: 2,
            }),
            ..InstanceStatus::default()
        });
        let text = metrics.encode();
        assert!(text.contains("pg_instance_fence_running 1"), "{text}");
        assert!(text.contains("pg_instance_fence_restarts 2"), "{text}");
    }

    #[test]
    fn only_a_designated_primary_shows_its_distance_to_the_source() {
        let metrics = Metrics::new();
        let mut status = InstanceStatus {
            role: "primary".into(),
            source_archive: Some(crate::backup::source_lag::SourceArchiveLag {
                source: "main".into(),
                segments: 3,
                bytes: 50_331_648,
                seconds: 12.5,
                error: Some("timeout".into()),
                ..Default::default()
            }),
            ..InstanceStatus::default()
        };
        metrics.update(&status);
        let text = metrics.encode();
        for line in [
            "pg_instance_source_archive_lag_bytes{source=\"main\"} 50331648",
            "pg_instance_source_archive_lag_seconds{source=\"main\"} 12.5",
            "pg_instance_source_archive_lag_segments{source=\"main\"} 3",
            "pg_instance_source_archive_check_failing{source=\"main\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        status.source_archive = None;
        metrics.update(&status);
        assert!(
            !metrics.encode().contains("source=\"main\""),
            "promoted: no series"
        );
    }

    #[test]
    fn metrics_show_role_and_lag() {
        let metrics = Metrics::new();
        metrics.update(&InstanceStatus {
            role: "replica".into(),
            postgres_ready: true,
            lag_bytes: Some(42),
            ..InstanceStatus::default()
        });
        let text = metrics.encode();
        assert!(text.contains("pg_instance_up 1"), "{text}");
        assert!(text.contains("pg_instance_fence_running 0"), "{text}");
        assert!(
            text.contains("pg_instance_role{role=\"replica\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pg_instance_replication_lag_bytes 42"),
            "{text}"
        );
    }
}
