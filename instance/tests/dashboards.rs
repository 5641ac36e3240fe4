//! The Grafana dashboards of `deploy/grafana/dashboards/` against what the code really exports:
//! the PostgreSQL dashboards (cluster overview, instance, replication) read only metrics that the
//! instance manager's `/metrics` serves, scraped from a real primary and a streaming replica on
//! PostgreSQL 18 (with pg_stat_statements and WAL archiving), and a replica cluster's designated
//! primary; the pooler dashboard only metrics the
//! pooler exporter (`pg-instance pooler-exporter`) serves, scraped in front of a real PgBouncer;
//! every dashboard passes the dashboard-linter rules and its PromQL
//! parses under the real promtool.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use api::contract;
use api::pooler::Pooler;
use controllers::pooler::builders::{Target, auth_file_line, pgbouncer_ini};
use instance::database_metrics::Settings;
use instance::status::InstanceStatus;
use serde_json::json;
use testbed::dashboards;
use testbed::pgbouncer::PgBouncer;
use testbed::pooler_exporter::PoolerExporter;
use testbed::{Postgres, PostgresOptions, paths};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The dashboards fed by the instance managers' `/metrics`.
const POSTGRES_DASHBOARDS: &[&str] = &["cluster-overview", "instance", "replication"];

/// Serves an instance manager's HTTP router for the PostgreSQL on `port`; returns its port.
async fn instance_manager(pod: &str, role: &str, port: u16) -> anyhow::Result<u16> {
    instance_manager_with(
        InstanceStatus {
            pod: pod.to_string(),
            role: role.to_string(),
            postgres_ready: true,
            ..InstanceStatus::default()
        },
        port,
    )
    .await
}

/// As [`instance_manager`], publishing `status`.
async fn instance_manager_with(status: InstanceStatus, port: u16) -> anyhow::Result<u16> {
    let shared = instance::http::Shared::new(&status.pod, 1024, Duration::from_secs(2));
    // What the manager's loop publishes after each probe of PostgreSQL.
    shared.set_status(status);
    shared.database.configure(Settings {
        connection: format!("host=127.0.0.1 port={port} user=postgres dbname=postgres").parse()?,
        timeout: Duration::from_secs(5),
        custom_queries: None::<PathBuf>,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_port = listener.local_addr()?.port();
    let router = instance::http::router(shared);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(http_port)
}

/// GET /metrics on 127.0.0.1:`port`.
async fn scrape(port: u16) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (_, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok(body.to_string())
}

fn report(missing: &[(String, String)]) -> String {
    missing
        .iter()
        .map(|(place, metric)| format!("  {place}: {metric}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dashboards_query_only_metrics_the_instance_manager_exports() -> anyhow::Result<()>
{
    // Arrange: a primary with pg_stat_statements, archiving (failing) and a streaming replica,
    // each behind an instance manager's /metrics.
    let primary = Postgres::start_with(
        PostgresOptions::default()
            .setting("shared_preload_libraries", "pg_stat_statements")
            .setting("track_io_timing", "on")
            .setting("archive_mode", "on")
            .setting("archive_command", "/bin/true")
            // Slots report a safe WAL size only under a limit.
            .setting("max_slot_wal_keep_size", "1GB"),
    )?;
    primary.psql("CREATE EXTENSION pg_stat_statements")?;
    let replica = testbed::replica::Replica::start(&primary, "replica1")?;
    primary.psql(
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal()",
    )?;
    let primary_http = instance_manager("db-0", contract::role::PRIMARY, primary.port()).await?;
    let replica_http = instance_manager("db-1", contract::role::REPLICA, replica.port()).await?;
    // A replica cluster's designated primary (its PostgreSQL is the replica's here: what the
    // dashboards need is its distance to the source's archive, which the manager's loop
    // publishes after each listing).
    let designated_http = instance_manager_with(
        InstanceStatus {
            pod: "dr-0".into(),
            role: contract::role::PRIMARY.into(),
            postgres_ready: true,
            source_archive: Some(instance::backup::source_lag::SourceArchiveLag {
                source: "db".into(),
                segments: 2,
                bytes: 20 << 20,
                seconds: 42.0,
                ..Default::default()
            }),
            ..InstanceStatus::default()
        },
        replica.port(),
    )
    .await?;

    // Act: scrape both, as Prometheus would.
    let deadline = Instant::now() + Duration::from_secs(20);
    let exported = loop {
        let primary_text = scrape(primary_http).await?;
        let replica_text = scrape(replica_http).await?;
        let mut exported = dashboards::exported_names(&primary_text);
        exported.extend(dashboards::exported_names(&replica_text));
        exported.extend(dashboards::exported_names(&scrape(designated_http).await?));
        // The replica's WAL receiver and the standby's row appear once it streams; the lag
        // figures a moment later, with the standby's first reply (its replay_lsn is NULL until
        // then, and a NULL is no sample).
        let streaming = primary_text.contains("pg_instance_standby_streaming{")
            && primary_text.contains("pg_instance_standby_lag_bytes{")
            && primary_text.contains("pg_stat_replication_pg_wal_lsn_diff{")
            && replica_text.contains("pg_instance_replica_streaming");
        if streaming || Instant::now() > deadline {
            break exported;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(exported.contains("pg_instance_up"), "{exported:?}");
    assert!(
        exported.contains("pg_stat_statements_calls_total"),
        "{exported:?}"
    );

    // Assert: every metric a panel or a variable reads is exported.
    for name in POSTGRES_DASHBOARDS {
        let dashboard = dashboards::load(name);
        let queries = dashboards::queries(&dashboard);
        assert!(queries.len() > 10, "{name}: {} queries", queries.len());
        let missing = dashboards::unexported(&dashboard, &exported);
        assert!(
            missing.is_empty(),
            "dashboard {name} queries metrics nobody exports:\n{}",
            report(&missing)
        );
    }
    // And the check would catch one that is not.
    let mut broken = dashboards::load("instance");
    broken["panels"][1]["targets"][0]["expr"] = json!("max(pg_instance_no_such_metric)");
    assert_eq!(
        dashboards::unexported(&broken, &exported),
        [(
            format!("panel {}", broken["panels"][1]["title"]),
            "pg_instance_no_such_metric".to_string()
        )]
    );
    Ok(())
}

#[test]
fn pooler_dashboard_queries_only_metrics_the_pooler_exporter_serves() {
    // Arrange: a real PgBouncer with the Pooler's pgbouncer.ini and the exporter (the real
    // `pg-instance pooler-exporter`) reading its admin console. The console answers without
    // PostgreSQL, and its own pool gives a row to every family.
    let pooler: Pooler = serde_json::from_value(json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "Pooler",
        "metadata": {"name": "pool", "namespace": "default"},
        "spec": {"cluster": {"name": "db"}, "type": "rw"},
    }))
    .unwrap();
    let mut bouncer = PgBouncer::prepare().unwrap();
    let target = Target {
        host: "127.0.0.1".into(),
        port: testbed::free_port(),
        listen_addr: "127.0.0.1".into(),
        listen_port: bouncer.port(),
        auth_file: bouncer.auth_file().display().to_string(),
        unix_socket_dir: String::new(),
    };
    bouncer
        .start(&pgbouncer_ini(&pooler, &target), &auth_file_line("dash-pw"))
        .unwrap();
    let exporter = PoolerExporter::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_pg-instance")),
        bouncer.port(),
        contract::POOLER_AUTH_USER,
        "dash-pw",
    )
    .unwrap();

    // Act: scrape it.
    let text = exporter.scrape().unwrap();
    assert!(
        text.contains("\npgbouncer_up 1\n"),
        "{text}\n{}",
        exporter.log()
    );
    let exported = dashboards::exported_names(&text);

    // Assert: every name the pooler dashboard and alerts rely on is served, and every metric
    // the dashboard queries is among those served.
    for name in dashboards::POOLER_METRICS {
        assert!(exported.contains(*name), "{name} is not served:\n{text}");
    }
    let missing = dashboards::unexported(&dashboards::load("pooler"), &exported);
    assert!(missing.is_empty(), "{}", report(&missing));
}

#[test]
fn every_dashboard_passes_the_linter_rules_and_its_promql_parses_under_promtool() {
    let names = dashboards::names();
    assert_eq!(
        names,
        [
            "cluster-overview",
            "instance",
            "pooler",
            "replication",
            "router"
        ]
    );
    let mut uids = BTreeSet::new();
    let mut rules = Vec::new();
    for name in &names {
        let dashboard = dashboards::load(name);
        let problems = dashboards::lint(&dashboard);
        assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
        assert!(uids.insert(dashboard["uid"].as_str().unwrap().to_string()));
        for (index, query) in dashboards::queries(&dashboard).iter().enumerate() {
            rules.push(json!({
                "record": format!("dashboard:{}:{index}", name.replace('-', "_")),
                "expr": dashboards::promql_for_parser(&query.expr),
            }));
        }
    }

    // promtool parses each query as a recording rule's expression.
    let promtool = paths::promtool();
    assert!(
        promtool.exists(),
        "promtool not found at {} (run `cargo xtask setup`, or set PROMTOOL)",
        promtool.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboards.yaml");
    let write = |rules: &[serde_json::Value]| {
        let groups = json!({"groups": [{"name": "dashboards", "rules": rules}]});
        std::fs::write(&file, serde_yaml::to_string(&groups).unwrap()).unwrap();
    };
    let check = |file: &std::path::Path| {
        Command::new(&promtool)
            .args(["check", "rules", "--lint=none"])
            .arg(file)
            .output()
            .unwrap()
    };
    write(&rules);
    let output = check(&file);
    assert!(
        output.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The same check refuses a query that does not parse.
    write(&[json!({"record": "dashboard:broken", "expr": "sum(rate(x[5m])"})]);
    assert!(!check(&file).status.success());
}
