//! The forwarding fast path (`frontend/forward.rs`): a statement on one shard outside a
//! transaction is answered with the shard's own messages, in both protocols. Its answers,
//! large results, errors (before and after rows) and cancels are PostgreSQL's, the next
//! statement always works, and what must take the general path (several shards, transactions)
//! still does: `pg_router_forwarded_total` counts which path answered.

mod common;

use std::time::Duration;

use common::Cluster;
use tokio_postgres::SimpleQueryMessage;

/// `pg_router_forwarded_total` now.
async fn forwarded(cluster: &Cluster) -> u64 {
    let metrics = cluster.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("pg_router_forwarded_total "))
        .map_or(0, |value| value.trim().parse().expect("a counter value"))
}

/// The rows (as text) and the row count of CommandComplete of a simple query.
async fn simple(client: &tokio_postgres::Client, sql: &str) -> (Vec<Vec<String>>, u64) {
    let mut rows = Vec::new();
    let mut count = None;
    for message in client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    {
        match message {
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            SimpleQueryMessage::CommandComplete(n) => count = Some(n),
            _ => {}
        }
    }
    (rows, count.expect("a CommandComplete"))
}

fn code(error: &tokio_postgres::Error) -> Option<&str> {
    error.code().map(|c| c.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_shard_statements_are_forwarded_and_others_take_the_general_path() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    let before = forwarded(&cluster).await;

    // Simple protocol: single-row writes and key lookups (auto-prepared on the shard).
    for id in 1..=10 {
        let (_, inserted) = simple(
            &client,
            &format!("INSERT INTO customers (id, name, score) VALUES ({id}, 'c{id}', {id})"),
        )
        .await;
        assert_eq!(inserted, 1);
    }
    let (rows, count) = simple(&client, "SELECT name, score FROM customers WHERE id = 7").await;
    assert_eq!(rows, [["c7", "7"]]);
    assert_eq!(count, 1);
    let (rows, count) = simple(&client, "SELECT name FROM customers WHERE id = 11").await;
    assert!(rows.is_empty());
    assert_eq!(count, 0);
    // Extended protocol, typed parameters and binary results.
    let row = client
        .query_one("SELECT name, score FROM customers WHERE id = $1", &[&3i64])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "c3");
    assert_eq!(row.get::<_, i32>(1), 3);
    let updated = client
        .execute(
            "UPDATE customers SET score = score + 100 WHERE id = $1",
            &[&3i64],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1);
    let after = forwarded(&cluster).await;
    assert_eq!(
        after - before,
        10 + 2 + 2,
        "statements answered by forwarding"
    );

    // Several shards, and statements in a transaction, take the general path.
    let (rows, _) = simple(&client, "SELECT count(*), sum(score) FROM customers").await;
    assert_eq!(rows, [["10", "155"]]);
    client
        .batch_execute(
            "BEGIN; UPDATE customers SET score = 0 WHERE id = 1; SELECT name FROM customers WHERE id = 1; COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(forwarded(&cluster).await, after);
    let (rows, _) = simple(&client, "SELECT score FROM customers WHERE id = 1").await;
    assert_eq!(rows, [["0"]], "the transaction's write is visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_errors_and_cancels_on_the_forwarded_path_leave_the_connection_usable() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    // A row larger than the router's output buffer (64 KiB): forwarded in several writes.
    simple(
        &client,
        "INSERT INTO customers (id, name, score) VALUES (1, repeat('x', 200000), 0)",
    )
    .await;
    let before = forwarded(&cluster).await;
    let (rows, _) = simple(&client, "SELECT name FROM customers WHERE id = 1").await;
    assert_eq!(rows[0][0].len(), 200_000);
    let row = client
        .query_one("SELECT name FROM customers WHERE id = $1", &[&1i64])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0).len(), 200_000);

    // An error before any row, in both protocols; the next statement works.
    let error = client
        .simple_query("SELECT 1 / score FROM customers WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(code(&error), Some("22012"), "{error:?}");
    let error = client
        .query_one("SELECT 1 / score FROM customers WHERE id = $1", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(code(&error), Some("22012"), "{error:?}");
    let (rows, _) = simple(&client, "SELECT score FROM customers WHERE id = 1").await;
    assert_eq!(rows, [["0"]]);

    // An error after rows were sent: the rows, then the error, as PostgreSQL itself answers.
    let error = client
        .simple_query("SELECT 10 / unnest(ARRAY[2, 1, 0]) FROM customers WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(code(&error), Some("22012"), "{error:?}");
    // A constraint violation keeps its detail.
    let error = client
        .simple_query("INSERT INTO customers (id, name) VALUES (1, 'again')")
        .await
        .unwrap_err();
    assert_eq!(code(&error), Some("23505"), "{error:?}");
    let detail = error.as_db_error().and_then(|e| e.detail()).unwrap_or("");
    assert!(detail.contains("(id)=(1)"), "{error:?}");
    let (rows, _) = simple(&client, "SELECT length(name) FROM customers WHERE id = 1").await;
    assert_eq!(rows, [["200000"]]);

    // A cancel reaches the shard running the forwarded statement.
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let error = client
        .simple_query("SELECT pg_sleep(60) FROM customers WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(code(&error), Some("57014"), "{error:?}");
    canceller.await.unwrap().unwrap();
    let (rows, _) = simple(&client, "SELECT score FROM customers WHERE id = 1").await;
    assert_eq!(rows, [["0"]]);
    assert_eq!(
        forwarded(&cluster).await - before,
        10,
        "every statement above was answered by forwarding"
    );
}
