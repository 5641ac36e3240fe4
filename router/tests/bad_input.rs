//! Bad input: malformed protocol messages, unsupported SQL, a shard down, wrong passwords. Each
//! gets a clear error with a SQLSTATE; the router (and, where the protocol allows, the
//! connection) stays up.

mod common;

use std::time::Duration;

use common::{Cluster, SCHEMA_TOML, config_toml, shard_options};
use router::{Router, RouterConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn assert_router_alive(cluster: &Cluster) {
    let client = cluster.client().await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_sql_is_an_error_and_the_connection_stays_usable() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    for (sql, code) in [
        // A window function over a join's `*` cannot pull named columns: refused, not run
        // per shard.
        (
            "SELECT *, rank() OVER (ORDER BY o.total) FROM customers c JOIN orders o ON o.customer_id = c.id",
            "0A000",
        ),
        (
            "SELECT * FROM customers c RIGHT JOIN orders o ON o.total = c.id",
            "0A000",
        ),
        (
            "SELECT * FROM customers c WHERE c.score > (SELECT count(*) FROM customers x WHERE x.region <> c.region)",
            "0A000",
        ),
        ("COPY customers TO STDOUT (FORMAT binary)", "0A000"),
        (
            "COPY customers (id, name) FROM STDIN WITH (FORMAT csv, ENCODING 'LATIN1')",
            "0A000",
        ),
        ("SELEC 1", "42601"),
        (
            "SELECT * FROM orders o WHERE o.total > (SELECT count(*) FROM orders x WHERE x.qty < o.qty)",
            "0A000",
        ),
        (
            "INSERT INTO customers SELECT * FROM customers ON CONFLICT DO NOTHING",
            "0A000",
        ),
        (
            "INSERT INTO customers VALUES (1, 'no column list')",
            "0A000",
        ),
    ] {
        let error = client.simple_query(sql).await.unwrap_err();
        assert_eq!(
            error.code().map(|c| c.code()),
            Some(code),
            "{sql}: {error:?}"
        );
        // The same through the extended protocol (error at Parse).
        let error = client.prepare(sql).await.unwrap_err();
        assert_eq!(
            error.code().map(|c| c.code()),
            Some(code),
            "{sql} (extended): {error:?}"
        );
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1, "connection unusable after {sql}");
    }
    // A shard's own error passes through with its SQLSTATE.
    let error = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(error.code().unwrap().code(), "22012");
    let error = client
        .query("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(error.code().unwrap().code(), "42P01");
    // A NULL shard key parameter.
    let error = client
        .query("SELECT * FROM customers WHERE id = $1", &[&None::<i64>])
        .await
        .unwrap_err();
    assert_eq!(error.code().unwrap().code(), "22004");
    assert_router_alive(&cluster).await;
}

/// Sends a startup message on a raw socket and reads up to ReadyForQuery.
async fn raw_session(cluster: &Cluster) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(cluster.router.address())
        .await
        .unwrap();
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608i32.to_be_bytes());
    for part in ["user", "postgres", "database", "postgres"] {
        startup.extend_from_slice(part.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let mut message = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    message.extend_from_slice(&startup);
    stream.write_all(&message).await.unwrap();
    read_until(&mut stream, b'Z').await;
    stream
}

/// Reads messages until one of type `kind`; returns all message types seen.
async fn read_until(stream: &mut tokio::net::TcpStream, kind: u8) -> Vec<u8> {
    let mut seen = Vec::new();
    loop {
        let mut header = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut header))
            .await
            .expect("router answered in time")
            .expect("router kept the connection");
        let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.unwrap();
        seen.push(header[0]);
        if header[0] == kind {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_errors_and_the_router_stays_up() {
    let cluster = Cluster::start(1).await;
    // Bind to a statement that does not exist, then Sync: ErrorResponse, then ReadyForQuery.
    let mut stream = raw_session(&cluster).await;
    let mut bind = vec![b'B'];
    let body: Vec<u8> = [
        b"\0nope\0".as_slice(),
        &0i16.to_be_bytes(),
        &0i16.to_be_bytes(),
        &0i16.to_be_bytes(),
    ]
    .concat();
    bind.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    bind.extend_from_slice(&body);
    stream.write_all(&bind).await.unwrap();
    stream.write_all(&[b'S', 0, 0, 0, 4]).await.unwrap();
    let seen = read_until(&mut stream, b'Z').await;
    assert!(seen.contains(&b'E'), "no ErrorResponse: {seen:?}");
    // The connection still runs queries.
    let query = b"SELECT 1\0";
    let mut message = vec![b'Q'];
    message.extend_from_slice(&((query.len() + 4) as i32).to_be_bytes());
    message.extend_from_slice(query);
    stream.write_all(&message).await.unwrap();
    let seen = read_until(&mut stream, b'Z').await;
    assert!(seen.contains(&b'D'), "no row after the error: {seen:?}");

    // A Parse that fails, then Flush (asyncpg waits there, without Sync): the error arrives.
    let sql = b"\0SELECT * FROM customers c WHERE c.score > (SELECT count(*) FROM customers x WHERE x.region <> c.region)\0";
    let mut parse = vec![b'P'];
    parse.extend_from_slice(&((sql.len() + 2 + 4) as i32).to_be_bytes());
    parse.extend_from_slice(sql);
    parse.extend_from_slice(&0i16.to_be_bytes());
    stream.write_all(&parse).await.unwrap();
    stream.write_all(&[b'H', 0, 0, 0, 4]).await.unwrap();
    let seen = read_until(&mut stream, b'E').await;
    assert_eq!(seen, vec![b'E']);
    stream.write_all(&[b'S', 0, 0, 0, 4]).await.unwrap();
    assert_eq!(read_until(&mut stream, b'Z').await, vec![b'Z']);

    // Garbage: an unknown message type and a truncated message. The router may close that
    // connection, but it stays up for others.
    let mut stream = raw_session(&cluster).await;
    stream
        .write_all(&[b'?', 0, 0, 0, 8, 1, 2, 3, 4])
        .await
        .unwrap();
    stream
        .write_all(&[b'Q', 0, 0, 0xff, 0xff, b'S'])
        .await
        .unwrap();
    drop(stream);
    let mut stream = tokio::net::TcpStream::connect(cluster.router.address())
        .await
        .unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(stream);
    assert_router_alive(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_down_is_a_clear_error_and_the_router_stays_up() {
    let mut cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    client
        .execute(
            "INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')",
            &[],
        )
        .await
        .unwrap();
    cluster.shards[1].kill_hard();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let error = client
        .query("SELECT count(*) FROM customers", &[])
        .await
        .unwrap_err();
    assert_eq!(error.code().unwrap().code(), "08006", "{error:?}");
    // Keys on the healthy shard still work.
    let topology = cluster.router.state().runtime().topology.clone();
    let healthy = (1..=4i64)
        .find(|id| {
            topology.groups[0]
                .vindex
                .shard_for(&router::vindex::KeyValue::Int(*id))
                .unwrap()
                == 0
        })
        .expect("a key on shard 0");
    let row = client
        .query_one("SELECT name FROM customers WHERE id = $1", &[&healthy])
        .await
        .unwrap();
    assert!(!row.get::<_, String>(0).is_empty());
    assert_router_alive(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_authentication_accepts_the_right_password_only() {
    let shards = tokio::task::block_in_place(|| common::start_shards(1, shard_options()));
    let extra = format!(
        "{SCHEMA_TOML}\n[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"app\"\npassword = \"s3cret\"\n"
    );
    let config = RouterConfig::from_toml(&config_toml(&shards, &extra)).unwrap();
    let router = Router::start(config, None).await.unwrap();
    let port = router.address().port();
    let good = format!("host=127.0.0.1 port={port} user=app password=s3cret dbname=postgres");
    let (client, connection) = tokio_postgres::connect(&good, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let bad = format!("host=127.0.0.1 port={port} user=app password=wrong dbname=postgres");
    let error = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .err()
        .expect("wrong password rejected");
    assert_eq!(error.code().map(|c| c.code()), Some("28P01"), "{error:?}");
    let unknown = format!("host=127.0.0.1 port={port} user=nobody password=x dbname=postgres");
    assert!(
        tokio_postgres::connect(&unknown, tokio_postgres::NoTls)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_can_negotiate_tls() {
    let shards = tokio::task::block_in_place(|| common::start_shards(1, shard_options()));
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let extra = format!(
        "{SCHEMA_TOML}\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"app\"\npassword = \"s3cret\"\n",
        cert.display(),
        key.display()
    );
    let config = RouterConfig::from_toml(&config_toml(&shards, &extra)).unwrap();
    let router = Router::start(config, None).await.unwrap();
    let port = router.address().port();
    // The wheel's psql has no SSL support; psycopg's bundled libpq does.
    let pythonpath = testbed::clients::python_clients().expect("installing psycopg");
    let script = format!(
        r#"
import psycopg
base = "host=127.0.0.1 port={port} user=app dbname=postgres sslmode=require"
with psycopg.connect(base + " password=s3cret") as conn:
    assert conn.pgconn.ssl_in_use, "not encrypted"
    print(conn.execute("SELECT 'over tls'").fetchone()[0])
# SCRAM-SHA-256-PLUS: the login is bound to the router's certificate.
with psycopg.connect(base + " password=s3cret channel_binding=require") as conn:
    print(conn.execute("SELECT 'bound to the certificate'").fetchone()[0])
with psycopg.connect(base + " password=s3cret channel_binding=disable") as conn:
    print(conn.execute("SELECT 'plain scram over tls'").fetchone()[0])
try:
    psycopg.connect(base + " password=wrong channel_binding=require")
    raise SystemExit("a wrong password logged in")
except psycopg.OperationalError as error:
    assert "password authentication failed" in str(error), error
# Without TLS there is no certificate to bind to: libpq refuses to go on.
try:
    psycopg.connect("host=127.0.0.1 port={port} user=app dbname=postgres sslmode=disable password=s3cret channel_binding=require")
    raise SystemExit("channel binding without TLS")
except psycopg.OperationalError as error:
    assert "channel binding" in str(error), error
print("channel binding ok")
"#
    );
    let stdout = common::run_ok(
        std::process::Command::new("python3")
            .env("PYTHONPATH", &pythonpath)
            .arg("-c")
            .arg(&script),
        "psycopg over TLS",
    );
    assert!(stdout.contains("over tls"), "{stdout}");
    assert!(stdout.contains("bound to the certificate"), "{stdout}");
    assert!(stdout.contains("channel binding ok"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_shards() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    client
        .execute(
            "INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
            &[],
        )
        .await
        .unwrap();
    for sql in [
        // One shard (extended protocol).
        "SELECT pg_sleep(60)",
        // Every shard (scatter-gather).
        "SELECT pg_sleep(60) FROM customers",
    ] {
        let token = client.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(tokio_postgres::NoTls).await
        });
        let error = client.query(sql, &[]).await.unwrap_err();
        assert_eq!(
            error.code().map(|c| c.code()),
            Some("57014"),
            "{sql}: {error:?}"
        );
        canceller.await.unwrap().unwrap();
        // The connection stays usable.
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
}

/// The code, message and position (ErrorResponse field P) of a statement's error.
fn error_fields(error: &tokio_postgres::Error) -> (String, String, Option<u32>) {
    let db = error.as_db_error().expect("an ErrorResponse");
    let position = match db.position() {
        Some(tokio_postgres::error::ErrorPosition::Original(position)) => Some(*position),
        _ => None,
    };
    (
        db.code().code().to_string(),
        db.message().to_string(),
        position,
    )
}

/// An unknown or ambiguous column is answered by the router's binder, before any shard is
/// asked, with PostgreSQL's own code, message and position; the connection goes on. Columns
/// the router's catalog does not know yet (added in the open transaction, or on the shards
/// directly) still reach the shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_ambiguous_columns_are_postgresqls_errors() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    let direct = cluster.shards[0].client().await.expect("shard client");
    for (sql, code) in [
        ("SELECT nope FROM customers", "42703"),
        (
            "SELECT id,\n  score,\n  Bogus FROM customers WHERE id = 3",
            "42703",
        ),
        (
            "SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id WHERE id > 1",
            "42702",
        ),
        ("SELECT c.nope FROM customers c", "42703"),
        (
            "SELECT count(*) FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id AND o.colour = 'red')",
            "42703",
        ),
    ] {
        let expected = error_fields(&direct.simple_query(sql).await.unwrap_err());
        assert_eq!(expected.0, code, "{sql}: PostgreSQL says {expected:?}");
        let got = error_fields(&client.simple_query(sql).await.unwrap_err());
        assert_eq!(got, expected, "{sql}");
        // The extended protocol: the error comes at Parse.
        let got = error_fields(&client.prepare(sql).await.unwrap_err());
        assert_eq!(got, expected, "{sql} (extended)");
        assert_router_alive(&cluster).await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1, "the connection stays usable after {sql}");
    }

    // A column added in the open transaction: the catalog cannot see it yet, the shard can.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("ALTER TABLE customers ADD COLUMN nickname text")
        .await
        .unwrap();
    let rows = client
        .simple_query("SELECT nickname FROM customers WHERE id = 3")
        .await
        .unwrap();
    assert!(!rows.is_empty());
    client.batch_execute("ROLLBACK").await.unwrap();
    // A column added on the shards directly: the router reads the catalog again first.
    for shard in &cluster.shards {
        let shard = shard.client().await.unwrap();
        shard
            .batch_execute("ALTER TABLE countries ADD COLUMN continent text")
            .await
            .unwrap();
    }
    let count: i64 = client
        .query_one("SELECT count(continent) FROM countries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
}
