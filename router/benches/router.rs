//! `cargo xtask bench router`: pgbench with the same clients and duration, in one run, against
//! (a) one shard directly, (b) pg-router (release build) in front of it, (c) PgBouncer
//! (transaction pooling) in front of it; select-only (`-S`) and TPC-B-like with `-M simple`, and
//! select-only with `-M prepared`, where the third target is PgBouncer in session mode (Debian's
//! PgBouncer 1.18 cannot pool prepared statements per transaction; pinned to a client, it is a
//! bare relay, so `relay_vs_direct_tps_ratio_select_prepared` is the ceiling of the hop). Prints
//! `name=value` lines: TPS ratios and p50/p99 latencies, and the Pooler path against direct
//! (`pooler_tps_ratio=` for select-only, with both TPS), and for the select-only stage each
//! proxy's CPU time per transaction (`router_cpu_us_per_query`, `pgbouncer_cpu_us_per_query`:
//! utime + stime of the proxy process from /proc over its runs, divided by their transactions).
//!
//! The three targets run interleaved for `BENCH_ROUNDS` rounds (noisy shared machines): TPS is
//! the median over rounds, latency percentiles are over every transaction of every round.
//!
//! Knobs: `BENCH_CLIENTS` (default 8), `BENCH_SECONDS` per run (default 6), `BENCH_ROUNDS`
//! (default 3), `BENCH_SCALE` (default 5); `PG_ROUTER_WORKER_THREADS` reaches the router.
//!
//! Then the TPC-H stage (`router/tpch.rs`): the 22 queries through the router over 2 shards
//! and directly, with their time ratios.

#[path = "router/tpch.rs"]
mod tpch;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testbed::Postgres;
use testbed::process::{chown_to_unprivileged, unprivileged_command};

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn pgbouncer_binary() -> anyhow::Result<PathBuf> {
    for candidate in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        if Path::new(candidate).exists() {
            return Ok(candidate.into());
        }
    }
    // The test bed's copy of Debian's package (`cargo xtask setup` extracts it), the same
    // PgBouncer 1.18 the Pooler image ships.
    testbed::pgbouncer::install()
}

fn start_router(shard_port: u16, dir: &Path) -> anyhow::Result<(Guard, u16)> {
    let port = testbed::free_port();
    let config = format!(
        r#"listen = "127.0.0.1:{port}"
[backend]
pool_size = 64
[[shards]]
name = "s0"
port = {shard_port}
[[table_groups]]
name = "accounts"
[[table_groups]]
name = "tellers"
[[table_groups]]
name = "branches"
[[sharded_tables]]
name = "pgbench_accounts"
table_group = "accounts"
shard_key = "aid"
[[sharded_tables]]
name = "pgbench_history"
table_group = "accounts"
shard_key = "aid"
[[sharded_tables]]
name = "pgbench_tellers"
table_group = "tellers"
shard_key = "tid"
[[sharded_tables]]
name = "pgbench_branches"
table_group = "branches"
shard_key = "bid"
"#
    );
    let path = dir.join("router.toml");
    std::fs::write(&path, config)?;
    let child = Command::new(env!("CARGO_BIN_EXE_pg-router"))
        .arg("--config")
        .arg(&path)
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting pg-router")?;
    let guard = Guard(child);
    wait_for_port(port)?;
    Ok((guard, port))
}

fn start_pgbouncer(
    shard_port: u16,
    dir: &Path,
    clients: u32,
    pool_mode: &str,
) -> anyhow::Result<(Guard, u16)> {
    let binary = pgbouncer_binary()?;
    let port = testbed::free_port();
    let bouncer_dir = dir.join(format!("pgbouncer-{pool_mode}"));
    std::fs::create_dir_all(&bouncer_dir)?;
    let ini = format!(
        "[databases]\npostgres = host=127.0.0.1 port={shard_port} dbname=postgres user=postgres\n\
         [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {}\n\
         auth_type = trust\nauth_file = {}\npool_mode = {pool_mode}\nmax_client_conn = 500\n\
         default_pool_size = {}\nlogfile = {}\npidfile = {}\n",
        bouncer_dir.display(),
        bouncer_dir.join("users.txt").display(),
        clients.max(8),
        bouncer_dir.join("pgbouncer.log").display(),
        bouncer_dir.join("pgbouncer.pid").display(),
    );
    std::fs::write(bouncer_dir.join("users.txt"), "\"postgres\" \"\"\n")?;
    std::fs::write(bouncer_dir.join("pgbouncer.ini"), ini)?;
    chown_to_unprivileged(&bouncer_dir)?;
    let child = unprivileged_command(&binary)?
        .arg(bouncer_dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting pgbouncer")?;
    let guard = Guard(child);
    wait_for_port(port)?;
    Ok((guard, port))
}

/// One pgbench run: TPS, transactions done and per-transaction latencies (microseconds).
struct Run {
    tps: f64,
    transactions: u64,
    latencies_us: Vec<u64>,
}

fn pgbench(
    port: u16,
    select_only: bool,
    protocol: &str,
    clients: u32,
    seconds: u32,
    dir: &Path,
    label: &str,
) -> anyhow::Result<Run> {
    let log_dir = dir.join(format!("log-{label}"));
    std::fs::create_dir_all(&log_dir)?;
    let mut command = Command::new(testbed::paths::pg_bin().join("pgbench"));
    command
        .args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-M", protocol])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.min(4).to_string())
        .arg("-T")
        .arg(seconds.to_string())
        .arg("-l")
        .arg(format!(
            "--log-prefix={}",
            log_dir.join("pgbench").display()
        ));
    if select_only {
        command.arg("-S");
    }
    command.arg("postgres");
    let output = command.output().context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench against {label} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench output: {stdout}"))?;
    let transactions = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(['/', ' ']).next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no transaction count in pgbench output: {stdout}"))?;
    // Per-transaction log lines: client_id transaction_no time_us script_no time_epoch time_us.
    let mut latencies_us: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(&log_dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        latencies_us.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
        std::fs::remove_file(path)?;
    }
    Ok(Run {
        tps,
        transactions,
        latencies_us,
    })
}

/// Median TPS and latency percentiles (ms) of several runs.
struct Summary {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn summarize(runs: &[Run]) -> Summary {
    let mut tps: Vec<f64> = runs.iter().map(|r| r.tps).collect();
    tps.sort_by(f64::total_cmp);
    let mut latencies: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index] as f64 / 1000.0
    };
    Summary {
        tps: tps[tps.len() / 2],
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
    }
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let clients = env_or("BENCH_CLIENTS", 8);
    let seconds = env_or("BENCH_SECONDS", 6);
    let rounds = env_or("BENCH_ROUNDS", 3).max(1);
    let scale = env_or("BENCH_SCALE", 5);
    let shard = Postgres::start_with(
        testbed::PostgresOptions::default()
            .setting("max_connections", 200)
            .setting("shared_buffers", "128MB"),
    )?;
    let init = Command::new(testbed::paths::pg_bin().join("pgbench"))
        .args(["-i", "-q", "-h", "127.0.0.1", "-U", "postgres", "-s"])
        .arg(scale.to_string())
        .arg("-p")
        .arg(shard.port().to_string())
        .arg("postgres")
        .output()
        .context("pgbench -i")?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let dir = tempfile::tempdir()?;
    let (router, router_port) = start_router(shard.port(), dir.path())?;
    let (bouncer, bouncer_port) =
        start_pgbouncer(shard.port(), dir.path(), clients, "transaction")?;
    // A bare relay: session pooling pins a server connection to each client, so PgBouncer only
    // copies bytes, and protocol-level prepared statements work through it.
    let (relay, relay_port) = start_pgbouncer(shard.port(), dir.path(), clients, "session")?;
    println!(
        "machine_cpus={}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "pgbench_clients={clients} pgbench_seconds={seconds} pgbench_rounds={rounds} pgbench_scale={scale}"
    );
    // PgBouncer before 1.21 (Debian's is 1.18) cannot pool protocol-level prepared statements
    // in transaction mode, so the prepared run's reference proxy is PgBouncer in session mode:
    // the cost of the extra hop alone, which bounds what any proxy on these cores can reach.
    let bouncer_target = ("pgbouncer", bouncer_port, bouncer.0.id());
    let relay_target = ("pgbouncer_session", relay_port, relay.0.id());
    let runs_to_make = [
        ("select", true, "simple", bouncer_target),
        ("tpcb", false, "simple", bouncer_target),
        ("select_prepared", true, "prepared", relay_target),
    ];
    for (name, select_only, protocol, (bouncer_name, bouncer_port, bouncer_pid)) in runs_to_make {
        // Each target with the proxy process whose CPU time the run is charged (none for direct).
        let targets = [
            ("direct", shard.port(), None),
            ("router", router_port, Some(router.0.id())),
            (bouncer_name, bouncer_port, Some(bouncer_pid)),
        ];
        let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
        let mut cpu_ticks: Vec<u64> = targets.iter().map(|_| 0).collect();
        for round in 0..rounds {
            for (i, (target, port, proxy)) in targets.iter().enumerate() {
                let cpu_before = proxy.map_or(0, process_cpu);
                runs[i].push(pgbench(
                    *port,
                    select_only,
                    protocol,
                    clients,
                    seconds,
                    dir.path(),
                    &format!("{target}-{name}-{round}"),
                )?);
                cpu_ticks[i] += proxy.map_or(0, process_cpu).saturating_sub(cpu_before);
            }
        }
        // On a machine where the proxy shares the cores with PostgreSQL and pgbench, CPU per
        // query is the fair comparison of two proxies (`router_cpu_us_per_query` is the
        // select-only one); for the prepared run it is what the proxy takes from the budget of
        // the two cores that direct runs fill.
        for (i, (target, _, proxy)) in targets.iter().enumerate() {
            if proxy.is_some() && name != "tpcb" {
                let transactions: u64 = runs[i].iter().map(|r| r.transactions).sum();
                let cpu_us = cpu_ticks[i] as f64 * 1e6 / clock_ticks() as f64;
                let suffix = if name == "select" {
                    String::new()
                } else {
                    format!("_{name}")
                };
                println!(
                    "{target}_cpu_us_per_query{suffix}={:.1}",
                    cpu_us / transactions.max(1) as f64
                );
            }
        }
        let summaries: Vec<Summary> = runs.iter().map(|r| summarize(r)).collect();
        for ((target, _, _), summary) in targets.iter().zip(&summaries) {
            println!("{target}_{name}_tps={:.1}", summary.tps);
            println!("{target}_{name}_latency_p50_ms={:.3}", summary.p50_ms);
            println!("{target}_{name}_latency_p99_ms={:.3}", summary.p99_ms);
        }
        println!(
            "router_vs_direct_tps_ratio_{name}={:.3}",
            summaries[1].tps / summaries[0].tps
        );
        println!(
            "router_vs_{bouncer_name}_tps_ratio_{name}={:.3}",
            summaries[1].tps / summaries[2].tps
        );
        if name == "select_prepared" {
            // Direct fills the cores (pgbench plus PostgreSQL): at 0.8 of its rate through a
            // proxy on the same cores, the proxy may take a quarter of direct's CPU per query.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            println!(
                "proxy_cpu_budget_us_per_query_for_0_8_prepared={:.1}",
                cpus * 1e6 / summaries[0].tps.max(1.0) * (1.0 / 0.8 - 1.0)
            );
            // What a proxy that only copies bytes reaches: the ceiling of the hop itself.
            println!(
                "relay_vs_direct_tps_ratio_{name}={:.3}",
                summaries[2].tps / summaries[0].tps
            );
        } else {
            // The Pooler path (PgBouncer, transaction pooling) against PostgreSQL directly.
            println!(
                "pooler_tps_ratio_{name}={:.3}",
                summaries[2].tps / summaries[0].tps
            );
            if name == "select" {
                println!(
                    "pooler_tps_ratio={:.3} pooler_tps={:.1} direct_tps={:.1}",
                    summaries[2].tps / summaries[0].tps,
                    summaries[2].tps,
                    summaries[0].tps
                );
            }
        }
    }
    drop(shard);
    tpch::run(dir.path())?;
    Ok(())
}

/// User plus system CPU time of a process, in clock ticks (from /proc).
fn process_cpu(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100)
}
