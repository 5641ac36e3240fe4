//! The PrometheusRule's alerts under the real promtool (built by `cargo xtask setup` from the
//! pinned Prometheus Go module): `promtool check rules`, then `promtool test rules` with one test
//! per alert on synthetic series, where it must fire, and where it must stay quiet.

use std::process::Command;

use controllers::monitoring::alerts::{RUNBOOKS_URL, alerts, rule_group};
use serde_json::{Value, json};

const NAMESPACE: &str = "prod";
const CLUSTER: &str = "db";

/// A synthetic series: metric name, extra labels (besides namespace and cluster), values.
type Series = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// One alert's scenario: series that make it fire (and the labels of the alert), and series
/// that must keep it quiet; evaluated at `eval_minutes`.
struct Case {
    alert: &'static str,
    eval_minutes: u32,
    firing: &'static [Series],
    labels: &'static [(&'static str, &'static str)],
    quiet: &'static [Series],
}

const DB0: (&str, &str) = ("pod", "db-0");
const DB1: (&str, &str) = ("pod", "db-1");
const POOL0: (&str, &str) = ("pod", "pool-7d9c-x2k4");

fn cases() -> Vec<Case> {
    vec![
        Case {
            alert: "PostgresInstanceDown",
            eval_minutes: 20,
            firing: &[("up", &[DB0, ("job", "postgres")], "0x30")],
            labels: &[DB0, ("job", "postgres")],
            quiet: &[("up", &[DB0, ("job", "postgres")], "1x30")],
        },
        Case {
            alert: "PostgresNoPrimary",
            eval_minutes: 20,
            firing: &[
                ("pg_instance_is_primary", &[DB0], "0x30"),
                ("pg_instance_is_primary", &[DB1], "0x30"),
            ],
            labels: &[],
            quiet: &[
                ("pg_instance_is_primary", &[DB0], "1x30"),
                ("pg_instance_is_primary", &[DB1], "0x30"),
            ],
        },
        Case {
            alert: "PostgresMultiplePrimaries",
            eval_minutes: 20,
            firing: &[
                ("pg_instance_is_primary", &[DB0], "1x30"),
                ("pg_instance_is_primary", &[DB1], "1x30"),
            ],
            labels: &[],
            quiet: &[
                ("pg_instance_is_primary", &[DB0], "1x30"),
                ("pg_instance_is_primary", &[DB1], "0x30"),
            ],
        },
        Case {
            alert: "PostgresReplicationLag",
            eval_minutes: 20,
            firing: &[(
                "pg_instance_standby_lag_bytes",
                &[DB0, ("application_name", "db-1"), ("stage", "replay")],
                "2000000000x30",
            )],
            labels: &[DB0, ("application_name", "db-1")],
            quiet: &[(
                "pg_instance_standby_lag_bytes",
                &[DB0, ("application_name", "db-1"), ("stage", "replay")],
                "1000x30",
            )],
        },
        Case {
            alert: "PostgresReplicaNotStreaming",
            eval_minutes: 20,
            firing: &[
                ("pg_replication_is_replica", &[DB1], "1x30"),
                ("pg_instance_replica_streaming", &[DB1], "0x30"),
            ],
            labels: &[DB1],
            quiet: &[
                ("pg_replication_is_replica", &[DB1], "1x30"),
                ("pg_instance_replica_streaming", &[DB1], "1x30"),
            ],
        },
        Case {
            alert: "PostgresWalArchivingFailing",
            eval_minutes: 20,
            firing: &[
                ("pg_instance_stat_archiver_failing", &[DB0], "1x30"),
                ("pg_instance_is_primary", &[DB0], "1x30"),
            ],
            labels: &[DB0],
            quiet: &[
                ("pg_instance_stat_archiver_failing", &[DB0], "0x30"),
                ("pg_instance_is_primary", &[DB0], "1x30"),
            ],
        },
        Case {
            alert: "PostgresBackupTooOld",
            // time() is 3 days in: a backup at time 0 is too old, one taken each minute is not.
            eval_minutes: 3 * 24 * 60,
            firing: &[(
                "pg_instance_backup_last_success_timestamp_seconds",
                &[DB0],
                "0x4400",
            )],
            labels: &[],
            quiet: &[(
                "pg_instance_backup_last_success_timestamp_seconds",
                &[DB0],
                "0+60x4400",
            )],
        },
        Case {
            alert: "PostgresBackupTooOld",
            // The instances restarted (their own figure is 0 again), but the operator exports
            // the newest BackupJob's time: no alert; and one when that time is old.
            eval_minutes: 3 * 24 * 60,
            firing: &[
                (
                    "postgres_operator_backup_last_success_timestamp_seconds",
                    &[("job", "postgres-operator")],
                    "0x4400",
                ),
                (
                    "pg_instance_backup_last_success_timestamp_seconds",
                    &[DB0],
                    "0x4400",
                ),
            ],
            labels: &[],
            quiet: &[
                (
                    "postgres_operator_backup_last_success_timestamp_seconds",
                    &[("job", "postgres-operator")],
                    "0+60x4400",
                ),
                (
                    "pg_instance_backup_last_success_timestamp_seconds",
                    &[DB0],
                    "0x4400",
                ),
            ],
        },
        Case {
            alert: "PostgresDiskNearlyFull",
            eval_minutes: 40,
            firing: &[(
                "pg_instance_data_disk_available_bytes",
                &[DB0],
                "1000000000-10000000x60",
            )],
            labels: &[DB0],
            quiet: &[(
                "pg_instance_data_disk_available_bytes",
                &[DB0],
                "1000000000x60",
            )],
        },
        Case {
            alert: "PostgresFenceProcessDown",
            eval_minutes: 20,
            firing: &[("pg_instance_fence_running", &[DB0], "0x30")],
            labels: &[DB0],
            quiet: &[("pg_instance_fence_running", &[DB0], "1x30")],
        },
        Case {
            alert: "PostgresReplicaClusterBehind",
            // Waiting a minute more every minute: past 900 s at minute 16, for 5 minutes.
            eval_minutes: 30,
            firing: &[(
                "pg_instance_source_archive_lag_seconds",
                &[DB0, ("source", "main")],
                "0+60x40",
            )],
            labels: &[DB0, ("source", "main")],
            quiet: &[(
                "pg_instance_source_archive_lag_seconds",
                &[DB0, ("source", "main")],
                // Segments arrive and are replayed: never a minute and a half behind.
                "0 30 60 90 0 30 60 90 0 30 60 90 0 30 60 90 0 30 60 90 0 30 60 90 0 30 60 90 0 30 60 90",
            )],
        },
        Case {
            alert: "PostgresReplicaClusterSourceUnreadable",
            eval_minutes: 20,
            firing: &[(
                "pg_instance_source_archive_check_failing",
                &[DB0, ("source", "main")],
                "1x30",
            )],
            labels: &[DB0, ("source", "main")],
            quiet: &[(
                "pg_instance_source_archive_check_failing",
                &[DB0, ("source", "main")],
                "0x30",
            )],
        },
        // At minute 20 (time() = 1200): a 90-day certificate with 6 days left fires; one with
        // 8 days left, or a 1-day certificate with 6 hours left (more than a fifth of its
        // lifetime), does not.
        Case {
            alert: "PostgresCertificateExpiresSoon",
            eval_minutes: 20,
            firing: &[
                (
                    "pg_instance_certificate_not_after_timestamp_seconds",
                    &[DB0, ("certificate", "server")],
                    "519600x30",
                ),
                (
                    "pg_instance_certificate_not_before_timestamp_seconds",
                    &[DB0, ("certificate", "server")],
                    "-7256400x30",
                ),
            ],
            labels: &[DB0, ("certificate", "server")],
            quiet: &[
                (
                    "pg_instance_certificate_not_after_timestamp_seconds",
                    &[DB0, ("certificate", "server")],
                    "692400x30",
                ),
                (
                    "pg_instance_certificate_not_before_timestamp_seconds",
                    &[DB0, ("certificate", "server")],
                    "-7083600x30",
                ),
                (
                    "pg_instance_certificate_not_after_timestamp_seconds",
                    &[DB0, ("certificate", "replication")],
                    "22800x30",
                ),
                (
                    "pg_instance_certificate_not_before_timestamp_seconds",
                    &[DB0, ("certificate", "replication")],
                    "-63600x30",
                ),
            ],
        },
        // The same for a Pooler's certificate, as its exporter saw PgBouncer present it.
        Case {
            alert: "PostgresCertificateExpiresSoon",
            eval_minutes: 20,
            firing: &[
                (
                    "pg_pooler_certificate_not_after_timestamp_seconds",
                    &[POOL0, ("pooler", "pool"), ("certificate", "server")],
                    "519600x30",
                ),
                (
                    "pg_pooler_certificate_not_before_timestamp_seconds",
                    &[POOL0, ("pooler", "pool"), ("certificate", "server")],
                    "-7256400x30",
                ),
            ],
            labels: &[POOL0, ("pooler", "pool"), ("certificate", "server")],
            quiet: &[
                (
                    "pg_pooler_certificate_not_after_timestamp_seconds",
                    &[POOL0, ("pooler", "pool"), ("certificate", "server")],
                    "692400x30",
                ),
                (
                    "pg_pooler_certificate_not_before_timestamp_seconds",
                    &[POOL0, ("pooler", "pool"), ("certificate", "server")],
                    "-7083600x30",
                ),
            ],
        },
        // A renewal forced at minute 10 fires; one counted before (the counter at 1 all
        // along) does not.
        Case {
            alert: "PostgresCARenewalForced",
            eval_minutes: 20,
            firing: &[(
                "postgres_operator_ca_renewals_forced_total",
                &[],
                "0x10 1x20",
            )],
            labels: &[],
            quiet: &[("postgres_operator_ca_renewals_forced_total", &[], "1x30")],
        },
        Case {
            alert: "PostgresConnectionsNearLimit",
            eval_minutes: 20,
            firing: &[
                (
                    "pg_stat_activity_count",
                    &[DB0, ("backend_type", "client backend"), ("state", "active")],
                    "95x30",
                ),
                ("pg_settings_max_connections", &[DB0], "100x30"),
                ("pg_settings_superuser_reserved_connections", &[DB0], "3x30"),
                ("pg_settings_reserved_connections", &[DB0], "0x30"),
            ],
            labels: &[DB0],
            quiet: &[
                (
                    "pg_stat_activity_count",
                    &[DB0, ("backend_type", "client backend"), ("state", "active")],
                    "10x30",
                ),
                ("pg_settings_max_connections", &[DB0], "100x30"),
                ("pg_settings_superuser_reserved_connections", &[DB0], "3x30"),
                ("pg_settings_reserved_connections", &[DB0], "0x30"),
            ],
        },
        Case {
            alert: "PostgresTransactionIdWraparound",
            eval_minutes: 20,
            firing: &[(
                "pg_database_wraparound_age_datfrozenxid_seconds",
                &[DB0, ("datname", "app")],
                "1500000000x30",
            )],
            labels: &[DB0, ("datname", "app")],
            quiet: &[(
                "pg_database_wraparound_age_datfrozenxid_seconds",
                &[DB0, ("datname", "app")],
                "1000000x30",
            )],
        },
        Case {
            alert: "PostgresLongRunningTransaction",
            eval_minutes: 20,
            firing: &[(
                "pg_long_running_transactions_oldest_timestamp_seconds",
                &[DB0],
                "7200x30",
            )],
            labels: &[DB0],
            quiet: &[(
                "pg_long_running_transactions_oldest_timestamp_seconds",
                &[DB0],
                "10x30",
            )],
        },
        Case {
            alert: "PostgresInstanceFenced",
            eval_minutes: 20,
            firing: &[("pg_instance_role", &[DB1, ("role", "fenced")], "1x30")],
            labels: &[DB1, ("role", "fenced")],
            quiet: &[("pg_instance_role", &[DB1, ("role", "fenced")], "0x30")],
        },
        Case {
            alert: "PostgresPoolerDown",
            eval_minutes: 20,
            firing: &[("pgbouncer_up", &[POOL0, ("pooler", "pool")], "0x30")],
            labels: &[POOL0, ("pooler", "pool")],
            quiet: &[("pgbouncer_up", &[POOL0, ("pooler", "pool")], "1x30")],
        },
        Case {
            alert: "PostgresPoolerClientsWaiting",
            eval_minutes: 20,
            firing: &[(
                "pgbouncer_pools_client_maxwait_seconds",
                &[
                    POOL0,
                    ("pooler", "pool"),
                    ("database", "app"),
                    ("user", "app"),
                ],
                "45x30",
            )],
            labels: &[POOL0, ("pooler", "pool"), ("database", "app")],
            // One long pause (a switchover held at a 45 s pauseTimeoutSeconds) is no alert.
            quiet: &[(
                "pgbouncer_pools_client_maxwait_seconds",
                &[
                    POOL0,
                    ("pooler", "pool"),
                    ("database", "app"),
                    ("user", "app"),
                ],
                "0x10 45 0x20",
            )],
        },
    ]
}

fn series_list(series: &[Series]) -> Value {
    series
        .iter()
        .map(|(name, labels, values)| {
            let mut all = vec![
                format!("namespace=\"{NAMESPACE}\""),
                format!("cluster=\"{CLUSTER}\""),
            ];
            all.extend(labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")));
            json!({"series": format!("{name}{{{}}}", all.join(", ")), "values": values})
        })
        .collect()
}

fn expected_alert(case: &Case) -> Value {
    let alert = alerts()
        .into_iter()
        .find(|alert| alert.name == case.alert)
        .unwrap_or_else(|| panic!("no alert {}", case.alert));
    let mut labels = serde_json::Map::new();
    // Aggregations keep namespace and cluster only where the expression says so.
    let aggregated_away = matches!(
        case.alert,
        "PostgresNoPrimary" | "PostgresMultiplePrimaries"
    );
    if !aggregated_away {
        labels.insert("namespace".into(), json!(NAMESPACE));
        labels.insert("cluster".into(), json!(CLUSTER));
    }
    for (key, value) in case.labels {
        labels.insert(key.to_string(), json!(value));
    }
    labels.insert("severity".into(), json!(alert.severity));
    let pod = case
        .labels
        .iter()
        .find(|(k, _)| *k == "pod")
        .map(|(_, v)| *v);
    let description = match pod {
        Some(pod) => format!(
            "{} (cluster {NAMESPACE}/{CLUSTER}, pod {pod}).",
            alert.summary
        ),
        None => format!("{} (cluster {NAMESPACE}/{CLUSTER}).", alert.summary),
    };
    json!({
        "exp_labels": labels,
        "exp_annotations": {
            "summary": alert.summary,
            "description": description,
            "runbook_url": format!("{RUNBOOKS_URL}#{}", alert.name.to_lowercase()),
        },
    })
}

#[test]
fn every_alert_fires_when_it_should_and_stays_quiet_otherwise() {
    let promtool = testbed::paths::promtool();
    assert!(
        promtool.exists(),
        "promtool not found at {} (run `cargo xtask setup`, or set PROMTOOL)",
        promtool.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        serde_yaml::to_string(&json!({"groups": [rule_group(NAMESPACE, CLUSTER)]})).unwrap(),
    )
    .unwrap();

    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let cases = cases();
    let tested: Vec<&str> = cases.iter().map(|case| case.alert).collect();
    for alert in alerts() {
        assert!(
            tested.contains(&alert.name),
            "no promtool test for {}",
            alert.name
        );
    }
    let mut tests = Vec::new();
    for case in &cases {
        let eval_time = format!("{}m", case.eval_minutes);
        tests.push(json!({
            "name": format!("{} fires", case.alert),
            "interval": "1m",
            "input_series": series_list(case.firing),
            "alert_rule_test": [{"eval_time": eval_time, "alertname": case.alert,
                                 "exp_alerts": [expected_alert(case)]}],
        }));
        tests.push(json!({
            "name": format!("{} stays quiet", case.alert),
            "interval": "1m",
            "input_series": series_list(case.quiet),
            "alert_rule_test": [{"eval_time": eval_time, "alertname": case.alert,
                                 "exp_alerts": []}],
        }));
    }
    let tests_file = dir.path().join("tests.yaml");
    std::fs::write(
        &tests_file,
        serde_yaml::to_string(
            &json!({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                      "tests": tests}),
        )
        .unwrap(),
    )
    .unwrap();
    let test = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(&tests_file)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
