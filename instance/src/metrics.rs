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
