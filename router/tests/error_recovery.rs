//! No state poisoned by an error: after a statement fails (at Parse or at run time, on one shard
//! or on all of them, inside a transaction block, through the simple or the extended protocol),
//! the next statements on the same client connection work, including the failed one once its
//! cause is gone (a backend must never be asked to Bind a statement whose Parse failed).

mod common;

use common::{Cluster, SCHEMA_TOML, config_toml, shard_options, start_shards};
use router::{Router, RouterConfig};

/// Count of `customers` rows through `client`, by the simple protocol (auto-prepared: it has a
/// literal) and by the extended protocol (a named client statement, then the unnamed one).
async fn good_statements(client: &tokio_postgres::Client, what: &str) {
    let rows = client
        .simple_query("SELECT count(*) FROM customers WHERE id > 0")
        .await
        .unwrap_or_else(|e| panic!("simple query after {what}: {e:?}"));
    assert!(!rows.is_empty(), "after {what}");
    let count: i64 = client
        .query_one("SELECT count(*) FROM customers WHERE id > $1", &[&0i64])
        .await
        .unwrap_or_else(|e| panic!("extended query after {what}: {e:?}"))
        .get(0);
    assert_eq!(count, 4, "after {what}");
    let statement = client
        .prepare("SELECT name FROM customers WHERE id = $1")
        .await
        .unwrap_or_else(|e| panic!("prepare after {what}: {e:?}"));
    let name: String = client
        .query_one(&statement, &[&3i64])
        .await
        .unwrap_or_else(|e| panic!("named statement after {what}: {e:?}"))
        .get(0);
    assert_eq!(name, "cy", "after {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_of_any_kind_leaves_the_connection_usable() {
    // One backend connection per shard: the connection a failure touched serves the next
    // statement (with 16, a poisoned one could hide behind the others).
    let shards = tokio::task::block_in_place(|| start_shards(2, shard_options()));
    let toml = config_toml(&shards, SCHEMA_TOML).replace("pool_size = 16", "pool_size = 1");
    let config = RouterConfig::from_toml(&toml).expect("router config");
    let router = Router::start(config.clone(), None).await.expect("router");
    let cluster = Cluster {
        shards,
        router,
        config,
    };
    cluster.create_schema().await;
    let client = cluster.client().await;
    client
        .batch_execute(
            "INSERT INTO customers (id, name, region, score) VALUES (1, 'ann', 'n', 1), (2, 'bo', 's', 0), (3, 'cy', 'n', 3), (4, 'di', 's', 0)",
        )
        .await
        .unwrap();
    good_statements(&client, "setup").await;

    // Parse error on every shard (an unknown function), simple and extended; then the function
    // appears and the very same statements must run (a Parse recorded as done would be Bound
    // by name and fail with 26000).
    let parse_fail = "SELECT pgr_recovery_f(id) FROM customers WHERE id > 0";
    assert!(client.simple_query(parse_fail).await.is_err());
    good_statements(&client, "a parse error on every shard (simple)").await;
    let parse_fail_ext = "SELECT pgr_recovery_f(id) FROM customers WHERE id > $1";
    assert!(client.query(parse_fail_ext, &[&0i64]).await.is_err());
    assert!(client.prepare(parse_fail_ext).await.is_err());
    good_statements(&client, "a parse error on every shard (extended)").await;
    // Parse error on one shard only (a single-shard statement).
    let one_shard = "SELECT pgr_recovery_f(id) FROM customers WHERE id = 1";
    assert!(client.simple_query(one_shard).await.is_err());
    assert!(
        client
            .query(
                "SELECT pgr_recovery_f(id) FROM customers WHERE id = $1",
                &[&1i64]
            )
            .await
            .is_err()
    );
    good_statements(&client, "a parse error on one shard").await;
    client
        .batch_execute("CREATE FUNCTION pgr_recovery_f(bigint) RETURNS bigint LANGUAGE sql AS 'SELECT $1 * 10'")
        .await
        .unwrap();
    assert_eq!(
        client.simple_query(parse_fail).await.unwrap().len(),
        4 + 2,
        "rows, description and completion"
    );
    assert_eq!(
        client.query(parse_fail_ext, &[&0i64]).await.unwrap().len(),
        4
    );
    assert_eq!(
        client
            .query(
                "SELECT pgr_recovery_f(id) FROM customers WHERE id = $1",
                &[&1i64]
            )
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(client.simple_query(one_shard).await.unwrap().len(), 1 + 2);

    // Run-time errors: division by zero on one shard (id 2 only), then on every shard.
    assert!(
        client
            .simple_query("SELECT 1 / score FROM customers WHERE id = 2")
            .await
            .is_err()
    );
    good_statements(&client, "a run-time error on one shard").await;
    assert!(
        client
            .simple_query("SELECT 1 / (score - score) FROM customers WHERE id > 0")
            .await
            .is_err()
    );
    assert!(
        client
            .query(
                "SELECT 1 / (score - score) FROM customers WHERE id > $1",
                &[&0i64]
            )
            .await
            .is_err()
    );
    good_statements(&client, "a run-time error on every shard").await;

    // Inside a transaction block: the failure aborts it; statements sent in the aborted block
    // fail (25P02) without being prepared; after ROLLBACK everything works.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .simple_query("SELECT count(*) FROM customers WHERE id > 0")
        .await
        .unwrap();
    assert!(
        client
            .simple_query("SELECT pgr_recovery_g(id) FROM customers WHERE id > 0")
            .await
            .is_err()
    );
    let aborted = client
        .simple_query("SELECT count(*) FROM customers WHERE id > 1")
        .await;
    assert!(aborted.is_err(), "a statement in an aborted block fails");
    assert!(
        client
            .query(
                "SELECT count(*) FROM customers WHERE id > $1 AND score >= $2",
                &[&0i64, &0i32]
            )
            .await
            .is_err()
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    good_statements(&client, "a failed transaction block").await;
    client
        .simple_query("SELECT count(*) FROM customers WHERE id > 1")
        .await
        .unwrap();
    client
        .query(
            "SELECT count(*) FROM customers WHERE id > $1 AND score >= $2",
            &[&0i64, &0i32],
        )
        .await
        .unwrap();
    // A transaction whose first statement fails (the BEGIN rides with it).
    client.batch_execute("BEGIN").await.unwrap();
    assert!(
        client
            .query(
                "SELECT pgr_recovery_h(id) FROM customers WHERE id > $1",
                &[&0i64]
            )
            .await
            .is_err()
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    good_statements(&client, "a failed first statement of a block").await;
}
