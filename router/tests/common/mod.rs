//! Shared fixtures of the router's integration tests: real PostgreSQL 18 shards from the test
//! bed and a router in front of them.

#![allow(dead_code)]

pub mod cluster;
pub mod process;

use std::time::Duration;

use router::{Router, RouterConfig};
use testbed::{Postgres, PostgresOptions};

/// Sharding used by most tests: customers/orders co-located by customer, countries copied.
pub const SCHEMA_TOML: &str = r#"
reference_tables = ["countries"]
[[table_groups]]
name = "customers"
[[table_groups]]
name = "by_name"
key_type = "text"
[[sharded_tables]]
name = "customers"
table_group = "customers"
shard_key = "id"
[[sharded_tables]]
name = "orders"
table_group = "customers"
shard_key = "customer_id"
[[sharded_tables]]
name = "accounts"
table_group = "by_name"
shard_key = "owner"
"#;

/// Shards plus a router.
pub struct Cluster {
    /// The shards.
    pub shards: Vec<Postgres>,
    /// The router.
    pub router: Router,
    /// Its config.
    pub config: RouterConfig,
}

/// Options every test shard gets: 2PC enabled.
pub fn shard_options() -> PostgresOptions {
    PostgresOptions::default()
        .setting("max_prepared_transactions", 20)
        .setting("max_connections", 60)
}

/// Starts `count` shards. On the calling thread: the servers die with the thread that spawned
/// them (parent-death signal), so no helper threads.
pub fn start_shards(count: usize, options: PostgresOptions) -> Vec<Postgres> {
    (0..count)
        .map(|_| Postgres::start_with(options.clone()).expect("starting a shard"))
        .collect()
}

/// The TOML of a router in front of `shards` with `extra` appended.
pub fn config_toml(shards: &[Postgres], extra: &str) -> String {
    let mut toml = String::from("listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n");
    // `extra` may start with top-level keys: it goes before any table.
    toml.push_str(extra);
    toml.push_str("\n[backend]\npool_size = 16\n");
    for (i, shard) in shards.iter().enumerate() {
        toml.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\nport = {}\n",
            shard.port()
        ));
    }
    toml
}

impl Cluster {
    /// The answer of a `SELECT count(*) ...` on each shard directly, by shard index.
    pub async fn count_on_each_shard(&self, sql: &str) -> Vec<i64> {
        let mut counts = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let count: i64 = shard
                .client()
                .await
                .unwrap()
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql} on a shard: {e}"))
                .get(0);
            counts.push(count);
        }
        counts
    }

    /// `count` shards with the standard schema config.
    pub async fn start(count: usize) -> Self {
        Self::start_with(count, shard_options(), SCHEMA_TOML).await
    }

    /// `count` shards started with `options`, router config `extra`.
    pub async fn start_with(count: usize, options: PostgresOptions, extra: &str) -> Self {
        let shards = tokio::task::block_in_place(|| start_shards(count, options));
        let config = RouterConfig::from_toml(&config_toml(&shards, extra)).expect("router config");
        let router = Router::start(config.clone(), None)
            .await
            .expect("starting the router");
        Self {
            shards,
            router,
            config,
        }
    }

    /// libpq connection string to the router.
    pub fn router_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.router.address().port()
        )
    }

    /// A tokio-postgres client connected through the router.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.router_url()).await
    }

    /// The router's Prometheus metrics, as text.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self.router.metrics_address().expect("metrics enabled");
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    }

    /// Creates the standard tables through the router (DDL is broadcast).
    pub async fn create_schema(&self) {
        let client = self.client().await;
        client
            .batch_execute(
                "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, region text, score int);
                 CREATE TABLE orders (id bigint, customer_id bigint NOT NULL, total numeric(12,2), qty int, note text, PRIMARY KEY (customer_id, id));
                 CREATE TABLE countries (code text PRIMARY KEY, name text);
                 CREATE TABLE accounts (owner text PRIMARY KEY, balance bigint NOT NULL)",
            )
            .await
            .expect("creating the schema through the router");
    }
}

/// Connects tokio-postgres to `url`.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let mut last = None;
    for _ in 0..20 {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                return client;
            }
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("connecting to {url}: {last:?}");
}

/// Raw bytes of any column (binary format as tokio-postgres receives it).
#[derive(Debug, PartialEq, Eq, Clone, PartialOrd, Ord)]
pub struct Raw(pub Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_ty: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// All rows of `sql` in binary format, as raw bytes.
pub async fn binary_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<Raw>>>, tokio_postgres::Error> {
    let rows = client.query(sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|i| row.get::<_, Option<Raw>>(i))
                .collect()
        })
        .collect())
}

/// All rows of `sql` in text format (simple query protocol).
pub async fn text_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// psql (`-X`, no psqlrc) connected as `postgres` to the `postgres` database through 127.0.0.1:`port`;
/// callers add their own options and commands.
pub fn psql(port: &str) -> std::process::Command {
    let mut command = std::process::Command::new(testbed::paths::pg_bin().join("psql"));
    command.args([
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-U",
        "postgres",
        "-d",
        "postgres",
    ]);
    command
}

/// Runs `command`, fails the test (with its output) unless it succeeds, and returns its stdout.
pub fn run_ok(command: &mut std::process::Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
