//! The alerts of a cluster's PrometheusRule: what a DBA expects to be woken for, each with a
//! runbook section in `docs/runbooks.md`. Expressions read the metrics the instance manager
//! exports (README, "Monitoring") with the `namespace` and `cluster` labels the PodMonitor adds.

/// Where the runbooks live (each alert links to its section).
pub const RUNBOOKS_URL: &str =
    "https://github.com/keiailab/postgres-operator/blob/main/docs/runbooks.md";

/// One alerting rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    /// Alert name (also the runbook section's anchor, lower-cased).
    pub name: &'static str,
    /// PromQL, with `SEL` standing for the cluster's label matchers.
    pub expr: &'static str,
    /// How long the expression must hold.
    pub for_: &'static str,
    /// `critical` or `warning`.
    pub severity: &'static str,
    /// One-line summary.
    pub summary: &'static str,
}

/// Every alert.
pub fn alerts() -> Vec<Alert> {
    vec![
        Alert {
            name: "PostgresInstanceDown",
            expr: "up{SEL} == 0 or pg_up{SEL} == 0",
            for_: "1m",
            severity: "critical",
            summary: "An instance of the cluster cannot be scraped or PostgreSQL does not accept connections",
        },
        Alert {
            name: "PostgresNoPrimary",
            expr: "sum(pg_instance_is_primary{SEL}) < 1 or absent(pg_instance_is_primary{SEL})",
            for_: "1m",
            severity: "critical",
            summary: "No instance of the cluster runs as primary: writes fail",
        },
        Alert {
            name: "PostgresMultiplePrimaries",
            expr: "sum(pg_instance_is_primary{SEL}) > 1",
            for_: "30s",
            severity: "critical",
            summary: "More than one instance of the cluster runs as primary",
        },
        Alert {
            name: "PostgresReplicationLag",
            expr: "max by (namespace, cluster, pod, application_name) (pg_instance_standby_lag_bytes{SEL, stage=\"replay\"}) > 1073741824 or max by (namespace, cluster, pod) (pg_replication_lag_seconds{SEL}) > 300",
            for_: "5m",
            severity: "warning",
            summary: "A replica is more than 1 GiB or 5 minutes behind the primary",
        },
        Alert {
            name: "PostgresReplicaNotStreaming",
            expr: "pg_replication_is_replica{SEL} == 1 and on (namespace, pod) pg_instance_replica_streaming{SEL} == 0",
            for_: "2m",
            severity: "warning",
            summary: "A replica does not stream WAL from the primary",
        },
        Alert {
            name: "PostgresWalArchivingFailing",
            expr: "pg_instance_stat_archiver_failing{SEL} == 1 and on (namespace, pod) pg_instance_is_primary{SEL} == 1",
            for_: "5m",
            severity: "critical",
            summary: "The primary fails to archive WAL: point-in-time recovery and pg_wal space are at risk",
        },
        Alert {
            name: "PostgresBackupTooOld",
            // The operator's figure comes from the BackupJobs and survives pod restarts (an
            // instance's own figure starts at 0 again); either may be missing.
            expr: "time() - max by (namespace, cluster) (postgres_operator_backup_last_success_timestamp_seconds{SEL} or pg_instance_backup_last_success_timestamp_seconds{SEL}) > 2 * 86400",
            for_: "10m",
            severity: "warning",
            summary: "The last successful base backup of the cluster is more than 2 days old",
        },
        Alert {
            name: "PostgresDiskNearlyFull",
            expr: "predict_linear(pg_instance_data_disk_available_bytes{SEL}[6h], 4 * 3600) < 0 and pg_instance_data_disk_available_bytes{SEL} > 0",
            for_: "15m",
            severity: "warning",
            summary: "At the current rate the data volume of an instance fills within 4 hours",
        },
        Alert {
            name: "PostgresConnectionsNearLimit",
            expr: "sum by (namespace, cluster, pod) (pg_stat_activity_count{SEL, backend_type=\"client backend\"}) / on (namespace, cluster, pod) max by (namespace, cluster, pod) (pg_settings_max_connections{SEL} - pg_settings_superuser_reserved_connections{SEL} - pg_settings_reserved_connections{SEL}) > 0.9",
            for_: "5m",
            severity: "warning",
            summary: "An instance uses more than 90% of its client connections",
        },
        Alert {
            name: "PostgresTransactionIdWraparound",
            expr: "max by (namespace, cluster, pod, datname) (pg_database_wraparound_age_datfrozenxid_seconds{SEL}) > 1000000000",
            for_: "10m",
            severity: "critical",
            summary: "A database is more than 1 billion transactions from its last freeze (wraparound at 2 billion)",
        },
        Alert {
            name: "PostgresLongRunningTransaction",
            expr: "max by (namespace, cluster, pod) (pg_long_running_transactions_oldest_timestamp_seconds{SEL}) > 3600",
            for_: "5m",
            severity: "warning",
            summary: "A transaction has been open for more than an hour",
        },
        Alert {
            name: "PostgresInstanceFenced",
            expr: "pg_instance_role{SEL, role=\"fenced\"} == 1",
            for_: "1m",
            severity: "warning",
            summary: "An instance is fenced: PostgreSQL is stopped on it until the fence is lifted",
        },
        Alert {
            name: "PostgresFenceProcessDown",
            // Every instance manager forks one at start and starts it again when it is gone;
            // 0 means that failed (out of memory, a process limit).
            expr: "pg_instance_fence_running{SEL} == 0",
            for_: "5m",
            severity: "warning",
            summary: "An instance manager runs without its fence process: were it to hang, its primary would keep accepting writes beside a new one",
        },
        // A replica cluster's designated primary lists its source's WAL archive (every 30 s)
        // and exports the distance; no other instance has these series.
        Alert {
            name: "PostgresReplicaClusterBehind",
            expr: "max by (namespace, cluster, pod, source) (pg_instance_source_archive_lag_seconds{SEL}) > 900",
            for_: "5m",
            severity: "warning",
            summary: "A replica cluster has not replayed WAL its source archived more than 15 minutes ago: promoted now, it would miss those writes",
        },
        Alert {
            name: "PostgresReplicaClusterSourceUnreadable",
            expr: "pg_instance_source_archive_check_failing{SEL} == 1",
            for_: "10m",
            severity: "warning",
            summary: "A replica cluster cannot list its source's WAL archive: it cannot follow the source, and its distance to it is unknown",
        },
        // What is left of an installed certificate, against a fifth of its lifetime, at most 7
        // days: the operator renews at 30 days left by default (cert-manager at a third of the
        // lifetime), so this fires only when renewal failed, or for the copy of a source's
        // certificate a replica cluster streams with, which nothing here renews.
        Alert {
            name: "PostgresCertificateExpiresSoon",
            // The instances' certificates, or a Pooler's (the one PgBouncer presented to its
            // exporter, and the CA bundle it trusts).
            expr: "(pg_instance_certificate_not_after_timestamp_seconds{SEL} - time()) < clamp_max((pg_instance_certificate_not_after_timestamp_seconds{SEL} - pg_instance_certificate_not_before_timestamp_seconds{SEL}) / 5, 7 * 86400) or (pg_pooler_certificate_not_after_timestamp_seconds{SEL} - time()) < clamp_max((pg_pooler_certificate_not_after_timestamp_seconds{SEL} - pg_pooler_certificate_not_before_timestamp_seconds{SEL}) / 5, 7 * 86400)",
            for_: "10m",
            severity: "warning",
            summary: "A certificate an instance or a Pooler uses expires within a fifth of its lifetime (7 days at most) and was not renewed: at expiry clients and replicas are refused",
        },
        // A forced promotion is an event; the operator counts them (from 0 for every cluster
        // with the operator's CA, so that the first one is an increase).
        Alert {
            name: "PostgresCARenewalForced",
            expr: "increase(postgres_operator_ca_renewals_forced_total{SEL}[1h]) > 0",
            for_: "0m",
            severity: "warning",
            summary: "The renewed operator CA had to sign before every instance had loaded it: instances that had not may refuse their peers until restarted",
        },
        // The Poolers' figures come from their exporter (`pg-instance pooler-exporter`), which
        // their PodMonitors label with `cluster` and `pooler`.
        Alert {
            name: "PostgresPoolerDown",
            expr: "pgbouncer_up{SEL} == 0",
            for_: "2m",
            severity: "critical",
            summary: "PgBouncer of a Pooler of the cluster does not answer: its clients cannot connect",
        },
        Alert {
            name: "PostgresPoolerClientsWaiting",
            // Longer than a switchover's pause (pauseTimeoutSeconds, 30 s by default) and for
            // longer than one: clients queue because the pool is too small or PostgreSQL is slow.
            expr: "max by (namespace, cluster, pooler, pod, database) (pgbouncer_pools_client_maxwait_seconds{SEL}) > 30",
            for_: "2m",
            severity: "warning",
            summary: "Clients of a Pooler wait more than 30 s for a server connection",
        },
    ]
}

/// The rule group of one cluster, as the PrometheusRule's `spec.groups` entry.
pub fn rule_group(namespace: &str, cluster: &str) -> serde_json::Value {
    let selector = format!("namespace=\"{namespace}\", cluster=\"{cluster}\"");
    let rules: Vec<serde_json::Value> = alerts()
        .into_iter()
        .map(|alert| {
            serde_json::json!({
                "alert": alert.name,
                "expr": alert.expr.replace("SEL", &selector),
                "for": alert.for_,
                "labels": {"severity": alert.severity},
                "annotations": {
                    "summary": alert.summary,
                    "description": format!("{} (cluster {namespace}/{cluster}{{{{ if $labels.pod }}}}, pod {{{{ $labels.pod }}}}{{{{ end }}}}).", alert.summary),
                    "runbook_url": format!("{RUNBOOKS_URL}#{}", alert.name.to_lowercase()),
                },
            })
        })
        .collect();
    serde_json::json!({"name": format!("postgres-cluster-{cluster}"), "rules": rules})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alert_is_scoped_to_the_cluster_and_has_a_runbook_section() {
        let runbooks = include_str!("../../../docs/runbooks.md");
        let group = rule_group("prod", "db");
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let expr = rule["expr"].as_str().unwrap();
            assert!(!expr.contains("SEL"), "{name}: {expr}");
            assert!(
                expr.contains("namespace=\"prod\", cluster=\"db\""),
                "{name}: {expr}"
            );
            assert!(
                runbooks.contains(&format!("## {name}")),
                "docs/runbooks.md has no section for {name}"
            );
        }
    }
}
