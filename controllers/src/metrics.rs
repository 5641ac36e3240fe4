//! Prometheus metrics of the operator: reconcile counts, durations and errors, leadership, and
//! the time of each cluster's newest completed backup.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// Kind the controller reconciles, lowercase (`postgrescluster`).
    pub controller: String,
}

/// Labels of the reconcile counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Kind the controller reconciles, lowercase.
    pub controller: String,
    /// `success` or `error`.
    pub result: String,
}

/// Labels of the per-cluster metrics (the ServiceMonitor keeps them: `honorLabels`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// Namespace of the PostgresCluster.
    pub namespace: String,
    /// Name of the PostgresCluster.
    pub cluster: String,
}

type HistogramFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    errors: Family<ControllerLabels, Counter>,
    durations: HistogramFamily,
    leader: Gauge<i64, AtomicI64>,
    last_backup: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    ca_renewals_forced: Family<ClusterLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `postgres_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("postgres_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let errors = Family::<ControllerLabels, Counter>::default();
        let durations: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let leader = Gauge::<i64, AtomicI64>::default();
        let last_backup = Family::<ClusterLabels, Gauge<f64, AtomicU64>>::default();
        let ca_renewals_forced = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciliations run, by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by controller",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconciliation took, by controller",
            durations.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controllers",
            leader.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "Unix time of the newest completed BackupJob of each cluster, read from the BackupJobs' status (so it survives restarts of the operator and of the instances); the PostgresBackupTooOld alert reads it",
            last_backup.clone(),
        );
        registry.register(
            "ca_renewals_forced",
            "Renewed operator CAs that had to sign before every instance reported loading them (the CARenewalForced event); the PostgresCARenewalForced alert reads it",
            ca_renewals_forced.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            durations,
            leader,
            last_backup,
            ca_renewals_forced,
        }
    }

    /// Records one reconciliation of `controller`.
    pub fn observe_reconcile(&self, controller: &str, duration: Duration, success: bool) {
        let labels = ControllerLabels {
            controller: controller.to_string(),
        };
        self.durations
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        self.reconciles
            .get_or_create(&ResultLabels {
                controller: controller.to_string(),
                result: if success { "success" } else { "error" }.to_string(),
            })
            .inc();
        if !success {
            self.errors.get_or_create(&labels).inc();
        }
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records a completed backup of `namespace/cluster` finished at `unix_seconds` (kept when
    /// newer than the one recorded).
    pub fn observe_backup_completed(&self, namespace: &str, cluster: &str, unix_seconds: f64) {
        let gauge = self.last_backup.get_or_create(&ClusterLabels {
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
        });
        if unix_seconds > gauge.get() {
            gauge.set(unix_seconds);
        }
    }

    fn cluster_labels(namespace: &str, cluster: &str) -> ClusterLabels {
        ClusterLabels {
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
        }
    }

    /// Makes the cluster's forced-renewal counter exist (at 0), so that its first forced
    /// renewal is an increase an alert sees.
    pub fn track_ca_renewals(&self, namespace: &str, cluster: &str) {
        let _created = self
            .ca_renewals_forced
            .get_or_create(&Self::cluster_labels(namespace, cluster));
    }

    /// Counts a forced promotion of the cluster's renewed CA.
    pub fn observe_ca_renewal_forced(&self, namespace: &str, cluster: &str) {
        self.ca_renewals_forced
            .get_or_create(&Self::cluster_labels(namespace, cluster))
            .inc();
    }

    /// Drops the series of a deleted cluster.
    pub fn forget_cluster(&self, namespace: &str, cluster: &str) {
        let labels = Self::cluster_labels(namespace, cluster);
        self.last_backup.remove(&labels);
        self.ca_renewals_forced.remove(&labels);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_errors_and_durations_are_exported() {
        let metrics = Metrics::new();
        metrics.observe_reconcile("postgrescluster", Duration::from_millis(20), true);
        metrics.observe_reconcile("postgrescluster", Duration::from_millis(20), false);
        metrics.set_leader(true);
        let text = metrics.encode();
        assert!(text.contains(
            "postgres_operator_reconciles_total{controller=\"postgrescluster\",result=\"success\"} 1"
        ), "{text}");
        assert!(text.contains(
            "postgres_operator_reconcile_errors_total{controller=\"postgrescluster\"} 1"
        ));
        assert!(text.contains(
            "postgres_operator_reconcile_duration_seconds_count{controller=\"postgrescluster\"} 2"
        ));
        assert!(text.contains("postgres_operator_leader 1"));
    }

    #[test]
    fn forced_ca_renewals_count_from_zero_and_leave_with_the_cluster() {
        let metrics = Metrics::new();
        metrics.track_ca_renewals("prod", "db");
        let series =
            "postgres_operator_ca_renewals_forced_total{namespace=\"prod\",cluster=\"db\"}";
        assert!(metrics.encode().contains(&format!("{series} 0")));
        metrics.observe_ca_renewal_forced("prod", "db");
        metrics.track_ca_renewals("prod", "db");
        assert!(metrics.encode().contains(&format!("{series} 1")));
        metrics.observe_backup_completed("prod", "db", 2000.0);
        metrics.forget_cluster("prod", "db");
        let text = metrics.encode();
        assert!(!text.contains("cluster=\"db\""), "{text}");
    }

    #[test]
    fn the_newest_backup_of_each_cluster_is_exported() {
        let metrics = Metrics::new();
        metrics.observe_backup_completed("prod", "db", 2000.0);
        metrics.observe_backup_completed("prod", "db", 1000.0);
        let text = metrics.encode();
        assert!(
            text.contains("postgres_operator_backup_last_success_timestamp_seconds{namespace=\"prod\",cluster=\"db\"} 2000.0"),
            "{text}"
        );
    }
}
