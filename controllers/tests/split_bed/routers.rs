//! Real pg-router processes in Kubernetes mode for cluster `db` of the split bed, and the
//! pgbench-style writers that insert through them (shared by the two-router split test and
//! `cargo xtask bench reshard`).
//!
//! The pg-router binary is `$PG_ROUTER_BIN` or the one beside the test's (or bench's) `deps/`
//! folder in the target folder: `cargo test --workspace` and `cargo xtask test` build it (the
//! router package's tests need it), `cargo xtask bench reshard` builds it first; a lone
//! `cargo test -p controllers --test ...` needs `cargo build -p router --bin pg-router` before.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testbed::process::die_with_parent;

use super::PASSWORD;

/// The path of the pg-router binary.
pub fn router_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PG_ROUTER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("pg-router"))
        .context("the test's folder")?;
    if !beside.exists() {
        bail!(
            "{} is missing: build it (cargo build -p router --bin pg-router) or set PG_ROUTER_BIN",
            beside.display()
        );
    }
    Ok(beside)
}

/// A pg-router process for cluster `db` (killed on drop).
pub struct RouterProcess {
    child: Child,
    /// Port of its PostgreSQL frontend on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
}

impl RouterProcess {
    /// Starts pg-router in Kubernetes mode for cluster `db` of `namespace` (the API server of
    /// `kubeconfig`), holding writes to a paused range up to `hold_ms`, logging to `log`; returns
    /// once it accepts logins.
    pub async fn start(
        kubeconfig: &Path,
        namespace: &str,
        hold_ms: u64,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start_with_fault(kubeconfig, namespace, hold_ms, log, None).await
    }

    /// [`Self::start`] with a fault injected (`PG_ROUTER_FAULT`), for example
    /// `ignore_topology_watch`: a router whose watch lags behind, routing by the topology it
    /// started with until a shard's fence makes it read the objects again.
    pub async fn start_with_fault(
        kubeconfig: &Path,
        namespace: &str,
        hold_ms: u64,
        log: PathBuf,
        fault: Option<&str>,
    ) -> anyhow::Result<Self> {
        let port = testbed::free_port();
        let mut command = Command::new(router_binary()?);
        command
            .args(["--kubernetes-cluster", "db", "--namespace", namespace])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--write-pause-hold-ms", &hold_ms.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .env("PG_ROUTER_BACKEND_PASSWORD", PASSWORD)
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(fault) = fault {
            command.env("PG_ROUTER_FAULT", fault);
        }
        die_with_parent(&mut command);
        let router = Self {
            child: command.spawn().context("starting pg-router")?,
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while connect(port).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "pg-router did not accept connections: {}",
                    std::fs::read_to_string(&router.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(router)
    }

    /// Freezes the process (SIGSTOP): it sees no topology change until [`Self::resume`], as a
    /// router that is slow, partitioned or descheduled.
    pub fn stop(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGSTOP).expect("SIGSTOP");
    }

    /// Lets a stopped process go on (SIGCONT).
    pub fn resume(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT).expect("SIGCONT");
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection through the router on `port` as the shards' superuser.
pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// One insert a writer made.
#[derive(Clone, Copy, Debug)]
pub struct Write {
    /// When the client sent it (the first time).
    pub started: Instant,
    /// Until it was acknowledged or failed, retries included.
    pub waited: Duration,
    /// The row: shard key and id.
    pub key: i64,
    /// Its id.
    pub id: i64,
    /// Whether it committed (an acknowledged row must exist afterwards).
    pub acknowledged: bool,
}

/// What one writer saw.
#[derive(Default)]
pub struct Writes {
    /// Every insert, in order.
    pub writes: Vec<Write>,
    /// Inserts answered with SQLSTATE 40001 (retryable), each retried with the same row.
    pub retried: u64,
    /// When each 40001 came.
    pub retried_at: Vec<Instant>,
    /// Inserts that failed with anything else: key and PostgreSQL's message.
    pub failed: Vec<String>,
}

impl Writes {
    /// Adds another writer's.
    pub fn merge(&mut self, other: Writes) {
        self.writes.extend(other.writes);
        self.retried += other.retried;
        self.retried_at.extend(other.retried_at);
        self.failed.extend(other.failed);
    }

    /// The rows acknowledged.
    pub fn acknowledged(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.writes
            .iter()
            .filter(|w| w.acknowledged)
            .map(|w| (w.key, w.id))
    }
}

/// One pgbench-style writer through the router on `port`: autocommit inserts of fresh rows into
/// `orders` at keys drawn from `keys`, ids from `first_id` on, retrying (the same row) only what
/// the router calls retryable (40001), until `stop`.
pub async fn writer(
    port: u16,
    number: i64,
    keys: Arc<Vec<i64>>,
    first_id: i64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Writes> {
    let client = connect(port).await.context("connecting to pg-router")?;
    let insert = client
        .prepare("INSERT INTO orders (customer_id, id, note) VALUES ($1, $2, 'written')")
        .await?;
    let mut writes = Writes::default();
    let mut id = first_id;
    let mut state = (number as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while !stop.load(Ordering::Relaxed) {
        // xorshift: keys spread over the whole set.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let key = keys[(state % keys.len() as u64) as usize];
        id += 1;
        let started = Instant::now();
        let acknowledged = loop {
            match client.execute(&insert, &[&key, &id]).await {
                Ok(_) => break true,
                Err(error)
                    if error.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) =>
                {
                    writes.retried += 1;
                    writes.retried_at.push(Instant::now());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(error) => {
                    let text = match error.as_db_error() {
                        Some(db) => format!("{} ({})", db.message(), db.code().code()),
                        None => error.to_string(),
                    };
                    writes.failed.push(format!("key {key}: {text}"));
                    break false;
                }
            }
        };
        writes.writes.push(Write {
            started,
            waited: started.elapsed(),
            key,
            id,
            acknowledged,
        });
    }
    Ok(writes)
}
