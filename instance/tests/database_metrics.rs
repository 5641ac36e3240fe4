//! The database part of `/metrics` on real PostgreSQL 18: every family present and moving under
//! pgbench load with a streaming replica (lag grows while the replica does not replay, a slot's
//! retained WAL grows while its replica is stopped), user-defined queries (good, bad, slow, an
//! unparsable file), the scrape deadline, and the scrape time on a database of 1000 tables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use instance::database_metrics::{DatabaseMetrics, Settings};
use testbed::{Postgres, PostgresOptions, paths};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn collector(port: u16, timeout: Duration, custom_queries: Option<PathBuf>) -> DatabaseMetrics {
    let metrics = DatabaseMetrics::default();
    let connection = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
        .parse()
        .unwrap();
    metrics.configure(Settings {
        connection,
        timeout,
        custom_queries,
    });
    metrics
}

/// Samples of the exposition: `name{labels}` (as written) -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples of `name` whose labels contain every one of `labels` (`k="v"`).
fn sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for (key, value) in samples(text) {
        let (sample_name, sample_labels) = key.split_once('{').unwrap_or((&key, ""));
        if sample_name == name && labels.iter().all(|label| sample_labels.contains(label)) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    sum(text, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{text}"))
}

fn pgbench(port: u16, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(paths::pg_bin().join("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
        .args(args)
        .arg("postgres")
        .output()
        .context("running pgbench")?;
    if !output.status.success() {
        bail!(
            "pgbench {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Every family named in the README's "Monitoring" table for a primary with a replica.
const PRIMARY_FAMILIES: &[&str] = &[
    "pg_up",
    "pg_instance_is_primary",
    "pg_replication_is_replica",
    "pg_instance_checkpoint_timeline",
    "pg_postmaster_start_time_seconds",
    "pg_settings_max_connections",
    "pg_database_size_bytes",
    "pg_database_connection_limit",
    "pg_database_wraparound_age_datfrozenxid_seconds",
    "pg_database_wraparound_age_datminmxid_seconds",
    "pg_stat_database_xact_commit",
    "pg_stat_database_numbackends",
    "pg_stat_activity_count",
    "pg_stat_activity_max_tx_duration",
    "pg_long_running_transactions",
    "pg_long_running_transactions_oldest_timestamp_seconds",
    "pg_instance_oldest_xmin_age",
    "pg_locks_count",
    "pg_stat_replication_pg_current_wal_lsn_bytes",
    "pg_stat_replication_pg_wal_lsn_diff",
    "pg_instance_standby_lag_bytes",
    "pg_instance_standby_lag_seconds",
    "pg_instance_standby_streaming",
    "pg_replication_slots_active",
    "pg_replication_slots_pg_wal_lsn_diff",
    "pg_instance_stat_wal_records_total",
    "pg_instance_stat_wal_bytes_total",
    "pg_wal_segments",
    "pg_wal_size_bytes",
    "pg_stat_archiver_archived_count",
    "pg_stat_archiver_failed_count",
    "pg_instance_stat_archiver_failing",
    "pg_instance_stat_archiver_ready_segments",
    "pg_stat_checkpointer_num_timed_total",
    "pg_stat_checkpointer_num_requested_total",
    "pg_stat_checkpointer_buffers_written_total",
    "pg_stat_bgwriter_buffers_alloc_total",
    "pg_instance_stat_io_reads_total",
    "pg_instance_stat_io_writes_total",
    "pg_instance_stat_io_extends_total",
    "pg_instance_stat_io_hits_total",
    "pg_stat_statements_calls_total",
    "pg_stat_statements_seconds_total",
    "pg_instance_scrape_duration_seconds",
    "pg_instance_scrape_query_errors",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn families_are_present_and_move_under_load_with_a_replica() -> anyhow::Result<()> {
    let primary = Postgres::start_with(
        PostgresOptions::default()
            .setting("shared_preload_libraries", "pg_stat_statements")
            .setting("track_io_timing", "on")
            .setting("archive_mode", "on")
            .setting("archive_command", "/bin/false"),
    )?;
    primary.psql("CREATE EXTENSION pg_stat_statements")?;
    let mut replica = testbed::replica::Replica::start(&primary, "replica1")?;
    pgbench(primary.port(), &["-i", "-s", "2", "-q"])?;
    primary.psql("SELECT pg_switch_wal()")?;

    let metrics = collector(primary.port(), Duration::from_secs(5), None);
    let before = metrics.collect().await;
    for family in PRIMARY_FAMILIES {
        assert!(
            sum(&before, family, &[]).is_some(),
            "family {family} missing in:\n{before}"
        );
    }
    assert_eq!(value(&before, "pg_up", &[]), 1.0);
    assert_eq!(value(&before, "pg_instance_is_primary", &[]), 1.0);
    assert_eq!(value(&before, "pg_instance_checkpoint_timeline", &[]), 1.0);
    assert_eq!(
        value(&before, "pg_instance_scrape_query_errors", &[]),
        0.0,
        "{before}"
    );
    assert_eq!(
        value(
            &before,
            "pg_instance_standby_streaming",
            &["application_name=\"walreceiver\""]
        ),
        1.0
    );
    assert!(
        value(
            &before,
            "pg_database_wraparound_age_datfrozenxid_seconds",
            &["datname=\"postgres\""]
        ) > 0.0
    );

    // A transaction held open (with a lock and an xid) while pgbench runs.
    let holder = primary.client().await?;
    holder
        .batch_execute(
            "CREATE TABLE held (id int); BEGIN; LOCK TABLE held IN SHARE MODE; SELECT pg_current_xact_id();",
        )
        .await?;
    pgbench(primary.port(), &["-T", "3", "-c", "4", "-j", "2"])?;
    primary.psql("SELECT pg_switch_wal()")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = metrics.collect().await;

    let grows = |name: &str, labels: &[&str]| {
        let (old, new) = (value(&before, name, labels), value(&after, name, labels));
        assert!(new > old, "{name} {labels:?} did not grow: {old} -> {new}");
    };
    grows("pg_stat_database_xact_commit", &["datname=\"postgres\""]);
    grows("pg_stat_database_tup_updated", &["datname=\"postgres\""]);
    grows("pg_instance_stat_wal_records_total", &[]);
    grows("pg_instance_stat_wal_bytes_total", &[]);
    grows(
        "pg_instance_stat_io_hits_total",
        &["backend_type=\"client backend\""],
    );
    grows("pg_stat_statements_calls_total", &[]);
    grows("pg_stat_archiver_failed_count", &[]);
    assert_eq!(value(&after, "pg_instance_stat_archiver_failing", &[]), 1.0);
    assert!(value(&after, "pg_instance_stat_archiver_ready_segments", &[]) >= 1.0);
    assert!(
        value(
            &after,
            "pg_long_running_transactions_oldest_timestamp_seconds",
            &[]
        ) >= 3.0,
        "{after}"
    );
    assert!(
        value(
            &after,
            "pg_instance_oldest_xmin_age",
            &["source=\"backend\""]
        ) > 0.0
    );
    assert!(
        value(
            &after,
            "pg_locks_count",
            &["datname=\"postgres\"", "mode=\"sharelock\""]
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "pg_stat_activity_count",
            &["state=\"idle in transaction\""]
        ) >= 1.0
    );
    holder.batch_execute("COMMIT").await?;

    // The replica reports itself as one.
    let on_replica = collector(replica.port(), Duration::from_secs(5), None)
        .collect()
        .await;
    assert_eq!(value(&on_replica, "pg_replication_is_replica", &[]), 1.0);
    assert_eq!(value(&on_replica, "pg_instance_is_primary", &[]), 0.0);
    assert_eq!(
        value(&on_replica, "pg_instance_replica_streaming", &[]),
        1.0
    );
    assert!(sum(&on_replica, "pg_replication_lag_seconds", &[]).is_some());

    // Lag grows while the replica does not replay.
    let replica_client = {
        let (client, connection) = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            replica.port()
        )
        .parse::<tokio_postgres::Config>()?
        .connect(tokio_postgres::NoTls)
        .await?;
        tokio::spawn(connection);
        client
    };
    replica_client
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await?;
    pgbench(primary.port(), &["-T", "1", "-c", "2"])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_1 = metrics.collect().await;
    pgbench(primary.port(), &["-T", "1", "-c", "2"])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_2 = metrics.collect().await;
    let lag_1 = value(&paused_1, "pg_stat_replication_pg_wal_lsn_diff", &[]);
    let lag_2 = value(&paused_2, "pg_stat_replication_pg_wal_lsn_diff", &[]);
    assert!(
        lag_1 > 0.0 && lag_2 > lag_1,
        "replay lag {lag_1} -> {lag_2}"
    );
    assert!(
        value(
            &paused_2,
            "pg_instance_standby_lag_bytes",
            &["stage=\"replay\""]
        ) > 0.0
    );
    let on_paused_replica = collector(replica.port(), Duration::from_secs(5), None)
        .collect()
        .await;
    assert!(
        value(
            &on_paused_replica,
            "pg_instance_replica_replay_pending_bytes",
            &[]
        ) > 0.0
    );
    drop(replica_client);

    // A stopped replica: its slot goes inactive and retains more and more WAL.
    replica.stop();
    let stopped_1 = metrics.collect().await;
    pgbench(primary.port(), &["-T", "1", "-c", "2"])?;
    let stopped_2 = metrics.collect().await;
    let slot = ["slot_name=\"replica1\""];
    assert_eq!(value(&stopped_2, "pg_replication_slots_active", &slot), 0.0);
    let retained_1 = value(&stopped_1, "pg_replication_slots_pg_wal_lsn_diff", &slot);
    let retained_2 = value(&stopped_2, "pg_replication_slots_pg_wal_lsn_diff", &slot);
    assert!(
        retained_2 > retained_1,
        "retained WAL {retained_1} -> {retained_2}"
    );
    assert!(sum(&stopped_2, "pg_stat_replication_pg_wal_lsn_diff", &[]).is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_queries_bad_queries_and_slow_queries_never_fail_the_scrape() -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    postgres.psql(
        "CREATE TABLE orders (status text); INSERT INTO orders VALUES ('new'), ('new'), ('paid')",
    )?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("queries.yaml");
    std::fs::write(
        &file,
        r#"
pg_orders:
  query: "SELECT status, count(*) AS count FROM orders GROUP BY status"
  metrics:
    - status:
        usage: "LABEL"
        description: "Order status"
    - count:
        usage: "GAUGE"
        description: "Orders by status"
broken:
  query: "SELECT * FROM no_such_table"
  metrics:
    - x:
        usage: "GAUGE"
slow:
  query: "SELECT 1 AS x FROM pg_sleep(30)"
  metrics:
    - x:
        usage: "GAUGE"
"#,
    )?;
    let timeout = Duration::from_millis(1500);
    let metrics = collector(postgres.port(), timeout, Some(file.clone()));

    let started = Instant::now();
    let text = metrics.collect().await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < timeout + Duration::from_millis(700),
        "the scrape took {elapsed:?} with a {timeout:?} deadline"
    );
    assert_eq!(value(&text, "pg_orders_count", &["status=\"new\""]), 2.0);
    assert_eq!(value(&text, "pg_orders_count", &["status=\"paid\""]), 1.0);
    assert_eq!(
        value(
            &text,
            "pg_instance_scrape_query_errors",
            &["query=\"broken\""]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "pg_instance_scrape_query_errors",
            &["query=\"slow\""]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "pg_instance_scrape_query_errors",
            &["query=\"database_size\""]
        ),
        0.0
    );
    assert_eq!(
        value(&text, "pg_instance_custom_queries_config_error", &[]),
        0.0
    );
    assert!(sum(&text, "pg_database_size_bytes", &[]).is_some());

    // After a timeout the next scrape connects again and works.
    let again = metrics.collect().await;
    assert_eq!(value(&again, "pg_up", &[]), 1.0);
    assert_eq!(
        value(
            &again,
            "pg_instance_scrape_query_errors",
            &["query=\"role\""]
        ),
        0.0
    );

    // An unparsable file is a metric; the built-in figures are still served.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&file, "pg_orders: [not, a, query")?;
    let broken_file = metrics.collect().await;
    assert_eq!(
        value(&broken_file, "pg_instance_custom_queries_config_error", &[]),
        1.0
    );
    assert_eq!(value(&broken_file, "pg_instance_is_primary", &[]), 1.0);

    // A server that does not answer: pg_up 0, still a scrape.
    let unreachable = collector(testbed::free_port(), timeout, None)
        .collect()
        .await;
    assert_eq!(value(&unreachable, "pg_up", &[]), 0.0);
    Ok(())
}

/// GET /metrics from the instance manager's HTTP router; returns the body and the time it took.
async fn scrape(port: u16) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let elapsed = started.elapsed();
    let text = String::from_utf8(response)?;
    let (_, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok((body.to_string(), elapsed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_with_1000_tables() -> anyhow::Result<()> {
    let postgres = Postgres::start()?;
    postgres.psql(
        "DO $$ BEGIN FOR i IN 1..1000 LOOP \
         EXECUTE format('CREATE TABLE t%s (id bigint PRIMARY KEY, v text)', i); END LOOP; END $$",
    )?;
    let shared = instance::http::Shared::new("test-0", 1024, Duration::from_secs(2));
    let connection = postgres.connection_string("postgres").parse()?;
    shared.database.configure(Settings {
        connection,
        timeout: Duration::from_secs(5),
        custom_queries: None::<PathBuf>,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let router = instance::http::router(Arc::clone(&shared));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let (first, _) = scrape(port).await?;
    assert!(
        first.ends_with("# EOF\n") && first.matches("# EOF").count() == 1,
        "{first}"
    );
    assert!(first.contains("\npg_instance_up "), "{first}");
    assert!(
        first.contains("\npg_database_size_bytes{datname=\"postgres\"} "),
        "{first}"
    );
    let mut times = Vec::new();
    for _ in 0..10 {
        times.push(scrape(port).await?.1);
    }
    times.sort();
    println!(
        "metrics_scrape_ms_1000_tables median={:.1} max={:.1}",
        times[times.len() / 2].as_secs_f64() * 1000.0,
        times[times.len() - 1].as_secs_f64() * 1000.0
    );
    server.abort();
    Ok(())
}
