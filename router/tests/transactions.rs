//! Transactions: one-shard transactions run there; multi-shard ones commit with 2PC, atomically,
//! and a router killed between PREPARE and COMMIT PREPARED leaves nothing partial after restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::RouterProcess;
use common::{Cluster, SCHEMA_TOML, config_toml, connect};
use router::vindex::KeyValue;

/// Two customer ids on different shards, the first on the lower shard.
fn ids_on_two_shards(cluster: &Cluster) -> (i64, i64) {
    let topology = cluster.router.state().runtime().topology.clone();
    let shard = |id: i64| {
        topology.groups[0]
            .vindex
            .shard_for(&KeyValue::Int(id))
            .unwrap()
    };
    let a = (1..).find(|id| shard(*id) == 0).unwrap();
    let b = (1..).find(|id| shard(*id) == 1).unwrap();
    (a, b)
}

async fn count_everywhere(cluster: &Cluster, sql: &str) -> i64 {
    let mut total = 0;
    for shard in &cluster.shards {
        let n: i64 = shard
            .client()
            .await
            .unwrap()
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0);
        total += n;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_transactions_are_atomic() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    let (a, b) = ids_on_two_shards(&cluster);

    // Commit: both rows, no prepared transaction left, decision row cleaned up.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("INSERT INTO customers (id, name) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    client
        .execute("INSERT INTO customers (id, name) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    // Inside the transaction the rows are visible through the router.
    let seen: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 2);
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        count_everywhere(&cluster, "SELECT count(*) FROM customers").await,
        2
    );
    assert_eq!(
        count_everywhere(&cluster, "SELECT count(*) FROM pg_prepared_xacts").await,
        0
    );
    assert_eq!(
        count_everywhere(&cluster, "SELECT count(*) FROM pgrouter.decisions").await,
        0
    );

    // Rollback: nothing.
    client.batch_execute("BEGIN; INSERT INTO customers (id, name) VALUES (1001, 'x'), (1002, 'y'), (1003, 'z'); ROLLBACK").await.unwrap();
    assert_eq!(
        count_everywhere(&cluster, "SELECT count(*) FROM customers WHERE id > 1000").await,
        0
    );

    // An error aborts the transaction: later statements fail with 25P02 until ROLLBACK, and the
    // connection stays usable.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "INSERT INTO customers (id, name) VALUES ($1, 'dup')",
            &[&(a + 100_000)],
        )
        .await
        .unwrap();
    let error = client
        .execute(
            "INSERT INTO customers (id, name) VALUES ($1, 'again')",
            &[&a],
        )
        .await
        .unwrap_err();
    assert_eq!(error.code().unwrap().code(), "23505");
    let error = client.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(error.code().unwrap().code(), "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        count_everywhere(
            &cluster,
            "SELECT count(*) FROM customers WHERE name = 'dup'"
        )
        .await,
        0
    );

    // A shard that fails to PREPARE (deferred unique check) aborts every shard's part.
    client
        .batch_execute("CREATE TABLE orders_check (customer_id bigint, code int, CONSTRAINT code_once UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)")
        .await
        .unwrap();
    let extra = format!(
        "{SCHEMA_TOML}\n[[sharded_tables]]\nname = \"orders_check\"\ntable_group = \"customers\"\nshard_key = \"customer_id\"\n"
    );
    cluster
        .router
        .reload(&router::RouterConfig::from_toml(&config_toml(&cluster.shards, &extra)).unwrap())
        .unwrap();
    let (a, b) = ids_on_two_shards(&cluster);
    let topology = cluster.router.state().runtime().topology.clone();
    let b2 = (b + 1..)
        .find(|id| {
            topology.groups[0]
                .vindex
                .shard_for(&KeyValue::Int(*id))
                .unwrap()
                == 1
        })
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "INSERT INTO orders_check (customer_id, code) VALUES ($1, 1)",
            &[&a],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO orders_check (customer_id, code) VALUES ($1, 7)",
            &[&b],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO orders_check (customer_id, code) VALUES ($1, 7)",
            &[&b2],
        )
        .await
        .unwrap();
    let error = client.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(error.code().unwrap().code(), "40001", "{error:?}");
    assert_eq!(
        count_everywhere(&cluster, "SELECT count(*) FROM orders_check").await,
        0
    );
    assert_eq!(
        count_everywhere(&cluster, "SELECT count(*) FROM pg_prepared_xacts").await,
        0
    );
    // The connection is still usable.
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // Command tags come back through the simple protocol too (inside and outside a transaction).
    for sql in [
        format!("UPDATE customers SET name = name WHERE id = {a}"),
        format!("BEGIN; UPDATE customers SET name = name WHERE id = {b}; COMMIT"),
    ] {
        let messages = client.simple_query(&sql).await.unwrap();
        assert!(
            messages
                .iter()
                .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1))),
            "{sql}: {messages:?}"
        );
    }

    // Autocommit multi-shard writes are atomic too (implicit 2PC).
    let updated = client
        .execute("UPDATE customers SET name = name || '!'", &[])
        .await
        .unwrap();
    assert_eq!(updated, 2);
    let metrics = cluster.metrics().await;
    assert!(
        metrics.contains("pg_router_two_phase_commits_total{outcome=\"committed\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pg_router_queries_total{plan=\"single_shard\"}"),
        "{metrics}"
    );
}

/// Starts pg-router on `config` (which listens on port 0) and waits until it listens; its
/// output goes to `log`.
async fn start_router(config: &Path, log: &Path, fault: Option<&str>) -> RouterProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pg-router"));
    command.arg("--config").arg(config);
    if let Some(fault) = fault {
        command.env("PG_ROUTER_FAULT", fault);
    }
    RouterProcess::start(command, log).await
}

async fn crash_and_recover(fault: &str) -> (Cluster, i64) {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let (a, b) = ids_on_two_shards(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    std::fs::write(&path, config_toml(&cluster.shards, SCHEMA_TOML)).unwrap();
    let log = dir.path().join("router.log");

    let process = start_router(&path, &log, Some(fault)).await;
    let client = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        process.port
    ))
    .await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "INSERT INTO customers (id, name) VALUES ($1, 'crash')",
            &[&a],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO customers (id, name) VALUES ($1, 'crash')",
            &[&b],
        )
        .await
        .unwrap();
    let result = client.batch_execute("COMMIT").await;
    assert!(result.is_err(), "the router should have died during COMMIT");
    drop(process);
    let prepared = count_everywhere(&cluster, "SELECT count(*) FROM pg_prepared_xacts").await;
    assert_eq!(
        prepared, 1,
        "the other shard's branch is prepared and in doubt"
    );

    // A new router instance resolves it from the decision record.
    let restarted_log = dir.path().join("router-restarted.log");
    let _process = start_router(&path, &restarted_log, None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if count_everywhere(&cluster, "SELECT count(*) FROM pg_prepared_xacts").await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in-doubt transaction not resolved"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = count_everywhere(
        &cluster,
        "SELECT count(*) FROM customers WHERE name = 'crash'",
    )
    .await;
    (cluster, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_after_prepare_leaves_no_partial_commit() {
    let (_cluster, rows) = crash_and_recover("crash_after_prepare").await;
    assert_eq!(rows, 0, "no decision was recorded: every branch rolls back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_after_the_decision_commits_everywhere() {
    let (_cluster, rows) = crash_and_recover("crash_after_decision").await;
    assert_eq!(rows, 2, "the decision was commit: every branch commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_across_pooled_backends() {
    let cluster = Cluster::start(2).await;
    let a = cluster.client().await;
    let b = cluster.client().await;
    a.batch_execute("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    // SHOW goes to any shard and any pooled connection: the setting is replayed where needed.
    for _ in 0..6 {
        assert_eq!(show(&a).await, "1234ms");
        assert_eq!(show(&b).await, "0");
    }
    // An invalid setting is refused and not remembered.
    let error = a
        .batch_execute("SET no_such_setting_xyz = 1")
        .await
        .unwrap_err();
    assert!(error.code().is_some(), "{error:?}");
    assert_eq!(show(&a).await, "1234ms");
    a.batch_execute("RESET ALL").await.unwrap();
    for _ in 0..4 {
        assert_eq!(show(&a).await, "0");
    }
    // Named prepared statements survive pooled backends changing under them.
    let statement = a.prepare("SELECT $1::int + 1").await.unwrap();
    for i in 0..10i32 {
        let _ = b.query_one("SELECT 1", &[]).await.unwrap();
        let row = a.query_one(&statement, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
}

async fn show(client: &tokio_postgres::Client) -> String {
    client
        .simple_query("SHOW statement_timeout")
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap()
}
