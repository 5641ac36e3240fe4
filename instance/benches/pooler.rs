//! `cargo xtask bench router`, Pooler stage: pgbench through a real PgBouncer running the
//! configuration the Pooler reconciler renders (`controllers::pooler::builders::pgbouncer_ini`:
//! transaction pooling, SCRAM with `auth_query` as `pgbouncer_auth` through the lookup function
//! the primary's instance manager applies) against the same PostgreSQL 18 primary directly, in
//! one run, with the same clients, duration and login (the application role, SCRAM).
//!
//! The router bench (`router/benches/router.rs`) measures PgBouncer too, with a hand-written
//! trust configuration, as the reference for pg-router's CPU per query; this stage measures what
//! a user of a `Pooler` gets.
//!
//! Prints, for select-only (`-S`) in the simple and extended protocols (PgBouncer 1.18 cannot
//! pool named prepared statements, so no `-M prepared`): `pooler_config_tps_ratio_<protocol>`
//! (pooler TPS / direct TPS), both TPS, and `pooler_config_cpu_us_per_query_<protocol>`
//! (PgBouncer's user + system CPU from /proc over its run, per transaction).
//! Settings: `BENCH_CLIENTS` (8), `BENCH_SECONDS` (10), `BENCH_ROUNDS` (3, the best round of
//! each target counts, so a neighbour's burst on the shared machine does not decide).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use support::TestCluster;
use support::pooler::{APP_PASSWORD, APP_USER, PoolerBed};

const TIMEOUT: Duration = Duration::from_secs(120);

fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// One pgbench run as the application role: transactions per second and transactions done. On
/// a blocking thread: the runtime's workers carry the test bed's API-server proxies, and an
/// instance manager whose Lease renewals stall behind a blocked worker fences its primary.
async fn pgbench(
    port: u16,
    protocol: &'static str,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<(f64, u64)> {
    tokio::task::spawn_blocking(move || pgbench_blocking(port, protocol, clients, seconds)).await?
}

fn pgbench_blocking(
    port: u16,
    protocol: &str,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<(f64, u64)> {
    let output = Command::new(testbed::paths::pg_bin().join("pgbench"))
        .args([
            "-n",
            "-S",
            "-h",
            "127.0.0.1",
            "-U",
            APP_USER,
            "-M",
            protocol,
        ])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.min(4).to_string())
        .arg("-T")
        .arg(seconds.to_string())
        .arg(APP_USER)
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench on port {port} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let number_after = |prefix: &str| {
        stdout.lines().find_map(|line| {
            line.trim()
                .strip_prefix(prefix)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse::<f64>().ok())
        })
    };
    let tps = number_after("tps = ").with_context(|| format!("no tps in: {stdout}"))?;
    let done = number_after("number of transactions actually processed: ")
        .with_context(|| format!("no transaction count in: {stdout}"))?;
    Ok((tps, done as u64))
}

/// User plus system CPU time of a process, in microseconds (from /proc, at 100 ticks a second).
fn process_cpu_us(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'; utime and
    // stime are the 12th and 13th of them.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    (fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)) * 10_000
}

async fn run() -> anyhow::Result<()> {
    let clients = setting("BENCH_CLIENTS", 8);
    let seconds = setting("BENCH_SECONDS", 10);
    let rounds = setting("BENCH_ROUNDS", 3).max(1);
    let api = Arc::new(testbed::ApiServer::start().await?);
    let (mut bed, env) = PoolerBed::prepare(&api, "bench", 30).await?;
    let cluster = TestCluster::start_with(api, "bench", 1, 0, env).await?;
    let primary = cluster.wait_for_primary_with_replicas(0, TIMEOUT).await?;
    let direct = cluster.instances[primary].pg_port;
    // The application database is created right after the bootstrap.
    support::eventually("the application database exists", TIMEOUT, || async move {
        support::connect_port_database(direct, APP_USER)
            .await
            .is_ok()
    })
    .await?;
    bed.start_towards(&cluster, primary, direct).await?;

    let init = tokio::task::spawn_blocking(move || {
        Command::new(testbed::paths::pg_bin().join("pgbench"))
            .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(direct.to_string())
            .arg(APP_USER)
            .env("PGPASSWORD", support::SUPERUSER_PASSWORD)
            .output()
    })
    .await?
    .context("pgbench -i")?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    support::connect_port_database(direct, APP_USER)
        .await?
        .batch_execute(&format!(
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {APP_USER}"
        ))
        .await?;
    let pid = bed.pid().context("PgBouncer's process id")?;
    println!(
        "pooler_config_clients={clients} pooler_config_seconds={seconds} pooler_config_rounds={rounds}"
    );

    for protocol in ["simple", "extended"] {
        stage(protocol, direct, &bed, pid, clients, seconds, rounds)
            .await
            .with_context(|| format!("the {protocol} stage\n{}", cluster.logs()))?;
    }
    let log = bed.log();
    if log.contains("password authentication failed") {
        bail!("PgBouncer refused a login during the bench:\n{log}");
    }
    Ok(())
}

/// pgbench select-only in `protocol` against the primary and through the pooler, alternately.
async fn stage(
    protocol: &'static str,
    direct: u16,
    bed: &PoolerBed,
    pid: u32,
    clients: u32,
    seconds: u32,
    rounds: u32,
) -> anyhow::Result<()> {
    // Warm both paths once (PgBouncer's server connections, the role's auth lookup).
    pgbench(direct, protocol, clients, 1).await?;
    pgbench(bed.port(), protocol, clients, 1).await?;
    let (mut best_direct, mut best_pooler, mut cpu_us, mut transactions) = (0.0_f64, 0.0_f64, 0, 0);
    for _ in 0..rounds {
        // Alternate the targets, so that a slow moment of the machine falls on both.
        best_direct = best_direct.max(pgbench(direct, protocol, clients, seconds).await?.0);
        let before = process_cpu_us(pid);
        let (tps, done) = pgbench(bed.port(), protocol, clients, seconds).await?;
        cpu_us += process_cpu_us(pid).saturating_sub(before);
        transactions += done;
        best_pooler = best_pooler.max(tps);
    }
    println!(
        "pooler_config_tps_ratio_{protocol}={:.3} pooler_config_tps_{protocol}={best_pooler:.1} \
         direct_tps_{protocol}={best_direct:.1}",
        best_pooler / best_direct
    );
    println!(
        "pooler_config_cpu_us_per_query_{protocol}={:.1}",
        cpu_us as f64 / transactions.max(1) as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
