//! `cargo xtask bench chaos`: faults at random under a steady writer, on real PostgreSQL 18 and a
//! real kube-apiserver; with a long `CHAOS_SECONDS` it is the soak test.
//!
//! A three-instance cluster with one synchronous standby (`ANY 1`) takes one committed row every
//! 10 ms from a writer that follows the Lease holder (as a client of the `-rw` Service would).
//! Every `CHAOS_INTERVAL_SECONDS` (default 20) one fault, drawn with a seeded generator
//! (`CHAOS_SEED`, printed), hits the cluster and is healed once the cluster has a primary with
//! both replicas streaming again:
//! - `primary_loss`: `kill -9` of the primary's postgres and instance manager (a lost pod); the
//!   pod comes back after the new primary took over (a kubelet restart) and rejoins;
//! - `replica_loss`: the same for a replica, back after 3 s;
//! - `switchover`: a switchover to a replica;
//! - `partition`: the primary's instance manager loses the API server for 8 s (its proxy is cut);
//!   it must fence itself and a replica takes over;
//! - `postgres_crash`: `kill -9` of the primary's postmaster only; its instance manager restarts it
//!   (or a replica takes over);
//! - `hung_manager`: the primary's instance manager is stopped (SIGSTOP) for 8 s, its PostgreSQL
//!   left running: its fence process must stop PostgreSQL before a replica takes over, and the
//!   resumed manager rejoins.
//!
//! Figures: `chaos_faults`, one `chaos_<fault>` count each, `chaos_write_gap_seconds_max` and
//! `_median` (the longest pause between two acknowledged commits around each fault),
//! `chaos_recovery_seconds_max` (fault to a full quorum again), `chaos_acked_writes_lost` (every
//! acknowledged row looked up on the final primary; must be 0), `chaos_replicas_converged` (1
//! when both replicas hold exactly the primary's rows at the end), and for the soak the instance
//! managers' resident memory at the start and the end (`chaos_manager_rss_kib_start` / `_end`,
//! the largest of the three).
//! Defaults: `CHAOS_SECONDS=300`; `CHAOS_FAULTS` (comma-separated names) draws from a subset.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::TestCluster;
use support::writer::{Writer, wait_for_full_quorum};

const TIMEOUT: Duration = Duration::from_secs(120);
const FAULTS: [&str; 6] = [
    "primary_loss",
    "replica_loss",
    "switchover",
    "partition",
    "postgres_crash",
    "hung_manager",
];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Largest resident set (KiB) of the instance managers: the processes whose command line is
/// `pg-instance` with this cluster's name.
fn manager_rss_kib(cluster: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !(cmdline.contains("pg-instance")
                && cmdline.contains(&format!("--cluster={cluster}")))
            {
                return None;
            }
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Injects `fault` and heals it; returns the time until a full quorum was back.
async fn inject(
    cluster: &mut TestCluster,
    fault: &str,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<f64> {
    let primary = wait_for_full_quorum(cluster).await?;
    let primary_name = cluster.instances[primary].name.clone();
    let replicas: Vec<usize> = (0..cluster.instances.len())
        .filter(|index| *index != primary)
        .collect();
    let replica = replicas[rng.random_range(0..replicas.len())];
    let started = Instant::now();
    match fault {
        "primary_loss" => {
            cluster.kill_instance(primary);
            cluster.wait_for_new_primary(&primary_name, TIMEOUT).await?;
            cluster.start_instance(primary)?;
        }
        "replica_loss" => {
            cluster.kill_instance(replica);
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.start_instance(replica)?;
        }
        "switchover" => {
            cluster
                .annotate_lease(
                    api::contract::ANNOTATION_SWITCHOVER_TO,
                    &cluster.instances[replica].name,
                )
                .await?;
            cluster.wait_for_new_primary(&primary_name, TIMEOUT).await?;
        }
        "partition" => {
            cluster.instances[primary].proxy.cut();
            tokio::time::sleep(Duration::from_secs(8)).await;
            cluster.instances[primary].proxy.restore();
        }
        "postgres_crash" => {
            if let Some(pid) = cluster.instances[primary].postmaster_pid() {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )?;
            }
        }
        "hung_manager" => {
            cluster.signal_manager(primary, nix::sys::signal::Signal::SIGSTOP);
            tokio::time::sleep(Duration::from_secs(8)).await;
            cluster.signal_manager(primary, nix::sys::signal::Signal::SIGCONT);
        }
        other => anyhow::bail!("unknown fault {other}"),
    }
    wait_for_full_quorum(cluster).await?;
    Ok(started.elapsed().as_secs_f64())
}

async fn chaos() -> anyhow::Result<()> {
    let seconds = env_number("CHAOS_SECONDS", 300);
    let interval = env_number("CHAOS_INTERVAL_SECONDS", 20);
    let seed = env_number("CHAOS_SEED", rand::rng().random());
    println!("chaos_seed={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A subset to draw from (`CHAOS_FAULTS=hung_manager,partition`); all of them by default.
    let faults: Vec<&str> = match std::env::var("CHAOS_FAULTS") {
        Ok(names) if !names.trim().is_empty() => names
            .split(',')
            .map(|name| {
                let name = name.trim();
                FAULTS
                    .iter()
                    .find(|fault| **fault == name)
                    .copied()
                    .ok_or_else(|| {
                        anyhow::anyhow!("unknown fault {name} in CHAOS_FAULTS: one of {FAULTS:?}")
                    })
            })
            .collect::<anyhow::Result<_>>()?,
        _ => FAULTS.to_vec(),
    };
    let name = "chaos";
    let mut cluster = TestCluster::start(name, 3, 1).await?;
    let primary = wait_for_full_quorum(&cluster).await?;
    cluster
        .connect(primary)
        .await?
        .batch_execute("CREATE TABLE bench (id bigint PRIMARY KEY)")
        .await?;
    let rss_start = manager_rss_kib(name);
    let ids = Arc::new(AtomicI64::new(1));
    let writer = Writer::start(&cluster, &ids);
    let began = Instant::now();
    let mut injected: Vec<(String, Instant, Instant)> = Vec::new();
    let mut recoveries = Vec::new();
    while began.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(interval)).await;
        let fault = faults[rng.random_range(0..faults.len())];
        let at = Instant::now();
        let recovery = inject(&mut cluster, fault, &mut rng).await?;
        println!(
            "fault {} at {:.0} s: {fault}, full quorum again after {recovery:.2} s",
            injected.len() + 1,
            began.elapsed().as_secs_f64()
        );
        recoveries.push(recovery);
        injected.push((fault.to_string(), at, Instant::now()));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let primary = wait_for_full_quorum(&cluster).await?;
    let (acknowledged, lost) = writer.finish(&cluster, primary).await?;
    // The longest pause between two acknowledged commits around each fault.
    let mut gaps: Vec<f64> = injected
        .iter()
        .map(|(_, from, to)| {
            acknowledged
                .windows(2)
                .filter(|pair| pair[1].1 >= *from && pair[0].1 <= *to + Duration::from_secs(5))
                .map(|pair| (pair[1].1 - pair[0].1).as_secs_f64())
                .fold(0.0, f64::max)
        })
        .collect();
    let expected: i64 = cluster
        .connect(primary)
        .await?
        .query_one("SELECT count(*) FROM bench", &[])
        .await?
        .get(0);
    let mut converged = true;
    for index in (0..cluster.instances.len()).filter(|index| *index != primary) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let count: i64 = cluster
                .connect(index)
                .await?
                .query_one("SELECT count(*) FROM bench", &[])
                .await?
                .get(0);
            if count == expected {
                break;
            }
            if Instant::now() > deadline {
                println!(
                    "{} holds {count} rows, the primary {expected}",
                    cluster.instances[index].name
                );
                converged = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let rss_end = manager_rss_kib(name);
    println!("chaos_seconds={:.0}", began.elapsed().as_secs_f64());
    println!("chaos_faults={}", injected.len());
    for fault in FAULTS {
        let count = injected.iter().filter(|(name, _, _)| name == fault).count();
        println!("chaos_{fault}={count}");
    }
    println!("chaos_acked_writes={}", acknowledged.len());
    println!("chaos_acked_writes_lost={lost}");
    println!("chaos_replicas_converged={}", u8::from(converged));
    println!(
        "chaos_write_gap_seconds_max={:.3}",
        gaps.iter().copied().fold(0.0, f64::max)
    );
    println!("chaos_write_gap_seconds_median={:.3}", median(&mut gaps));
    println!(
        "chaos_recovery_seconds_max={:.2}",
        recoveries.iter().copied().fold(0.0, f64::max)
    );
    println!("chaos_manager_rss_kib_start={rss_start}");
    println!("chaos_manager_rss_kib_end={rss_end}");
    if lost > 0 || !converged {
        anyhow::bail!("acknowledged writes were lost ({lost}) or the replicas diverged");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(chaos())
}
