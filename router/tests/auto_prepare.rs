//! Auto-prepare: simple-protocol statements whose literals are plain values reach the shard as
//! a prepared shape with the literals bound, give the same answers as PostgreSQL itself, report
//! errors at the client's positions, and can be switched off.

mod common;

use common::{SCHEMA_TOML, config_toml, connect, shard_options, start_shards};
use router::{Router, RouterConfig};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::ErrorPosition;

/// Text of every row of a simple query.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// A router in front of `shards`, with auto-prepare on or off and `pool_size` connections.
async fn router(shards: &[testbed::Postgres], auto_prepare: bool, pool_size: usize) -> Router {
    let toml = config_toml(shards, SCHEMA_TOML).replace(
        "[backend]\npool_size = 16\n",
        &format!("[backend]\npool_size = {pool_size}\nauto_prepare = {auto_prepare}\n"),
    );
    let config = RouterConfig::from_toml(&toml).expect("router config");
    Router::start(config, None)
        .await
        .expect("starting the router")
}

fn url(router: &Router) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        router.address().port()
    )
}

const TABLE: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, region text, score int);
     INSERT INTO customers VALUES (1, 'ann', 'north', 10), (2, 'it''s', 'south', 20), (3, 'bob', NULL, 2147483647)";

/// One shard holding [`TABLE`], and a client connected to it directly.
async fn shard_with_table() -> (Vec<testbed::Postgres>, tokio_postgres::Client) {
    let shards = tokio::task::block_in_place(|| start_shards(1, shard_options()));
    let direct = shards[0].client().await.unwrap();
    direct.batch_execute(TABLE).await.unwrap();
    (shards, direct)
}

/// A shard with [`TABLE`] and a client to it, and an auto-preparing router in front of it
/// with a client through it.
struct Bed {
    direct: tokio_postgres::Client,
    client: tokio_postgres::Client,
    _shards: Vec<testbed::Postgres>,
    _router: Router,
}

impl Bed {
    async fn start(pool_size: usize) -> Self {
        let (shards, direct) = shard_with_table().await;
        let router = router(&shards, true, pool_size).await;
        let client = connect(&url(&router)).await;
        Self {
            direct,
            client,
            _shards: shards,
            _router: router,
        }
    }
}

/// What the shard's backends last ran: `pg_stat_activity.query` of the router's connections.
async fn shard_queries(shard: &tokio_postgres::Client, prefix: &str) -> Vec<String> {
    shard
        .query(
            "SELECT query FROM pg_stat_activity WHERE query LIKE $1 || '%' AND pid <> pg_backend_pid()",
            &[&prefix],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_literals_reach_the_shard_as_parameters_with_the_same_answers() {
    // Arrange: one shard holding the rows, a router with auto-prepare (the default) and one
    // without, and a direct connection for comparison.
    let (shards, direct) = shard_with_table().await;
    let prepared = router(&shards, true, 4).await;
    let plain = router(&shards, false, 4).await;
    let through_prepared = connect(&url(&prepared)).await;
    let through_plain = connect(&url(&plain)).await;

    // Act + assert: every statement answers exactly as PostgreSQL does, twice (the second run
    // reuses the statement prepared on the shard connection).
    let statements = [
        "SELECT name, score FROM customers WHERE id = 2",
        "SELECT id, region FROM customers WHERE name = 'it''s'",
        "SELECT id FROM customers WHERE score = 2147483647",
        "SELECT id FROM customers WHERE id = 99999999999999999999",
        "SELECT id FROM customers WHERE id = 9223372036854775807",
        "SELECT id, name FROM customers WHERE id IN (1, 3) AND score >= 10 ORDER BY id LIMIT 5",
        "SELECT count(*) FROM customers WHERE id = 1 AND region = 'north'",
        "SELECT id, 'constant', score + 1 FROM customers WHERE id = 1",
        "SELECT id FROM customers WHERE score = 5 * 2 AND id = -1 + 2",
        "SELECT id FROM customers WHERE score - 2147483647 = 0 AND id = 3",
    ];
    for sql in statements {
        let expected = rows(&direct, sql).await;
        for _ in 0..2 {
            assert_eq!(rows(&through_prepared, sql).await, expected, "{sql}");
            assert_eq!(rows(&through_plain, sql).await, expected, "{sql}");
        }
    }
    // An integer stays the type PostgreSQL gives the literal: int4 arithmetic overflows there
    // as it does directly (an int8 parameter would not).
    let overflow = "SELECT id FROM customers WHERE score + 2147483647 > 0 AND id = 1";
    let expected = direct.simple_query(overflow).await.unwrap_err();
    for client in [&through_prepared, &through_plain] {
        let failure = client.simple_query(overflow).await.unwrap_err();
        assert_eq!(failure.code(), expected.code(), "{failure:?}");
        assert_eq!(
            failure.code(),
            Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE)
        );
    }
    // Writes too: an insert and an update by key, then the row as PostgreSQL stores it.
    rows(
        &through_prepared,
        "INSERT INTO customers (id, name, region, score) VALUES (4, 'dee', 'east', 40)",
    )
    .await;
    rows(
        &through_prepared,
        "UPDATE customers SET region = 'west', score = score + -40 + 41 WHERE id = 4",
    )
    .await;
    assert_eq!(
        rows(
            &direct,
            "SELECT id, name, region, score FROM customers WHERE id = 4"
        )
        .await,
        vec![vec![
            Some("4".into()),
            Some("dee".into()),
            Some("west".into()),
            Some("41".into())
        ]]
    );

    // Assert: the shard ran the shape with parameters for the auto-prepared router, and the
    // client's literal text for the other one.
    rows(
        &through_prepared,
        "SELECT region FROM customers WHERE id = 3",
    )
    .await;
    rows(&through_plain, "SELECT region FROM customers WHERE id = 1").await;
    let ran = shard_queries(&direct, "SELECT region FROM customers WHERE id").await;
    assert!(
        ran.iter()
            .any(|q| q == "SELECT region FROM customers WHERE id = $1"),
        "{ran:?}"
    );
    assert!(
        ran.iter()
            .any(|q| q == "SELECT region FROM customers WHERE id = 1"),
        "{ran:?}"
    );
    assert!(
        !ran.iter().any(|q| q.contains("id = 3")),
        "auto-prepared: no literal in the shard's text: {ran:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_error_points_at_the_clients_text() {
    // Arrange
    let Bed {
        direct,
        client,
        _shards,
        _router,
    } = Bed::start(2).await;
    let sql = "SELECT name FROM customers WHERE name = 'a rather long literal' AND id = 12345 AND missing = 1";

    // Act: the same failing statement directly and through the router.
    let expected = direct.simple_query(sql).await.unwrap_err();
    let failure = client.simple_query(sql).await.unwrap_err();

    // Assert: same SQLSTATE, message and position in the client's text.
    let (expected, failure) = (
        expected.as_db_error().unwrap(),
        failure.as_db_error().unwrap(),
    );
    assert_eq!(failure.code(), expected.code());
    assert_eq!(failure.message(), expected.message());
    assert!(
        matches!(expected.position(), Some(ErrorPosition::Original(_))),
        "{expected:?}"
    );
    assert_eq!(failure.position(), expected.position());
    // And the session goes on.
    assert_eq!(
        rows(&client, "SELECT name FROM customers WHERE id = 1").await,
        vec![vec![Some("ann".into())]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_shapes_on_one_connection_stay_correct_past_the_statement_bound() {
    // Arrange: one pooled connection, so every shape is prepared on it.
    let Bed {
        direct: _,
        client,
        _shards,
        _router,
    } = Bed::start(1).await;

    // Act + assert: more distinct shapes than a connection keeps prepared, each answering
    // right, and the first shapes again after they were closed.
    for round in 0..2 {
        for shape in 0..300 {
            let sql = format!(
                "SELECT name AS c{shape} FROM customers WHERE id = {}",
                shape % 3 + 1
            );
            let expected = ["ann", "it's", "bob"][shape % 3];
            assert_eq!(
                rows(&client, &sql).await,
                vec![vec![Some(expected.to_string())]],
                "round {round}: {sql}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_in_a_transaction_run_inside_it_with_the_begin_in_their_pipeline() {
    // Arrange
    let Bed {
        direct,
        client,
        _shards,
        _router,
    } = Bed::start(2).await;
    let count = |id: i64| {
        let direct = &direct;
        async move {
            direct
                .query_one("SELECT count(*) FROM customers WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };

    // Act + assert: the first statement on the shard, auto-prepared or the client's own
    // prepared statement, runs inside the transaction the BEGIN opened: read only refuses it.
    for statement in ["simple", "extended"] {
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        let refused = match statement {
            "simple" => client
                .simple_query("INSERT INTO customers (id, name) VALUES (10, 'ro')")
                .await
                .map(|_| ()),
            _ => client
                .execute(
                    "INSERT INTO customers (id, name) VALUES ($1, 'ro')",
                    &[&10i64],
                )
                .await
                .map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(
            refused.code().map(|c| c.code()),
            Some("25006"),
            "{statement}: {refused:?}"
        );
        client.batch_execute("ROLLBACK").await.unwrap();
    }
    assert_eq!(count(10).await, 0);

    // A rolled-back transaction leaves nothing; a committed one keeps both statements.
    for (end, expected) in [("ROLLBACK", 0), ("COMMIT", 1)] {
        client.batch_execute("BEGIN").await.unwrap();
        client
            .simple_query("INSERT INTO customers (id, name) VALUES (11, 'tx')")
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO customers (id, name) VALUES ($1, 'tx')",
                &[&12i64],
            )
            .await
            .unwrap();
        client.batch_execute(end).await.unwrap();
        assert_eq!(
            (count(11).await, count(12).await),
            (expected, expected),
            "{end}"
        );
    }
    for id in 1..=3 {
        client.batch_execute("BEGIN").await.unwrap();
        let name = rows(
            &client,
            &format!("SELECT name FROM customers WHERE id = {id}"),
        )
        .await;
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!(name.len(), 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_keeps_the_statements_the_router_prepared_on_its_connections() {
    // Arrange: one pooled connection, holding an auto-prepared shape and a client's prepared
    // statement.
    let Bed {
        direct: _,
        client,
        _shards,
        _router,
    } = Bed::start(1).await;
    let statement = client
        .prepare("SELECT name FROM customers WHERE id = $1")
        .await
        .unwrap();
    let by_id = |id: i64| {
        let (client, statement) = (&client, &statement);
        async move {
            client
                .query_one(statement, &[&id])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(by_id(1).await, "ann");
    client
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(
        rows(&client, "SELECT name FROM customers WHERE id = 3").await,
        vec![vec![Some("bob".into())]]
    );

    // Act: what poolers and frameworks send when a connection is handed back.
    let messages = client.simple_query("DISCARD ALL").await.unwrap();

    // Assert: the session's settings are reset, the command is DISCARD ALL, and both kinds of
    // prepared statement still run on the same backend connection.
    assert!(
        messages
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_))),
        "{messages:?}"
    );
    assert_ne!(
        rows(&client, "SHOW TimeZone").await,
        vec![vec![Some("Asia/Tokyo".into())]]
    );
    assert_eq!(
        rows(&client, "SELECT name FROM customers WHERE id = 3").await,
        vec![vec![Some("bob".into())]]
    );
    assert_eq!(by_id(2).await, "it's");
}
