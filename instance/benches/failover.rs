//! `cargo xtask bench failover`: failover and switchover timings on real PostgreSQL 18 and a real
//! kube-apiserver, with the default Lease settings (4 s duration, 2 s renew deadline).
//!
//! Each run starts a three-instance cluster with one synchronous standby (`ANY 1` of the two
//! replicas). A writer follows the Lease holder (as a client of the `-rw` Service would), commits
//! one row every 10 ms and records every acknowledged commit. Then, in turn:
//! - pod loss: `kill -9` of the primary's postgres and instance manager; the Lease must expire.
//!   Time from the kill to the first successful write on the new primary
//!   (`failover_pod_loss_seconds`, also printed as `failover_seconds` as before);
//! - switchover to the remaining replica: the longest gap between two acknowledged writes
//!   (`switchover_write_pause_seconds`);
//! - PostgreSQL crash: the primary's configuration is broken (PostgreSQL keeps running, a reload
//!   only logs the error) and its postmaster is killed with `kill -9`, so it cannot restart; the
//!   instance manager fences and releases the Lease. Time from the kill to the first successful
//!   write on the new primary (`failover_postgres_crash_seconds`).
//!
//! During the switchover, [`support::pooler::Load`] also runs short transactions through a real
//! PgBouncer with the Pooler's configuration (paused and resumed by the instance managers):
//! `switchover_client_errors` (total over the runs) and `switchover_client_max_wait_ms` (the
//! longest wait of one transaction, worst run).
//!
//! After each phase every acknowledged row is looked up on the primary: `acked_writes_lost` is the
//! total over all phases and runs.
//!
//! Prints the medians as `<name>_median=<x>` and `acked_writes_lost=<n>`.
//! Runs: `FAILOVER_BENCH_RUNS` (default 5).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use support::TestCluster;
use support::writer::{Writer, wait_for_full_quorum};

const TIMEOUT: Duration = Duration::from_secs(120);

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// Figures of one run.
struct Figures {
    pod_loss: f64,
    pause: f64,
    postgres_crash: f64,
    lost: u64,
    /// Failed transactions through the pooler during the switchover.
    client_errors: u64,
    /// Longest transaction through the pooler during the switchover.
    client_max_wait_ms: u64,
}

async fn one_run(run: usize) -> anyhow::Result<Figures> {
    let name = format!("bench{run}");
    let api = Arc::new(testbed::ApiServer::start().await?);
    let (mut pooler, env) = support::pooler::PoolerBed::prepare(&api, &name, 15).await?;
    let mut cluster = TestCluster::start_with(api, &name, 3, 1, env).await?;
    let primary = wait_for_full_quorum(&cluster).await?;
    pooler.start(&cluster, primary).await?;
    let old_primary = cluster.instances[primary].name.clone();
    cluster
        .connect(primary)
        .await?
        .batch_execute("CREATE TABLE bench (id bigint PRIMARY KEY)")
        .await?;
    let ids = Arc::new(AtomicI64::new(1));
    let mut lost = 0;

    // Pod loss: the whole instance dies; its Lease expires.
    let writer = Writer::start(&cluster, &ids);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    cluster.kill_instance(primary);
    // The kubelet would report the dead container: the rw Service stops routing to it.
    support::pooler::set_phase(&cluster, primary, "Failed").await?;
    let new_primary = cluster.wait_for_new_primary(&old_primary, TIMEOUT).await?;
    let pod_loss = killed_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost += writer.finish(&cluster, new_primary).await?.1;

    // Switchover to the remaining replica (once it streams from the new primary).
    let target = (0..3)
        .find(|index| *index != primary && *index != new_primary)
        .expect("three instances");
    cluster
        .wait_for_role(target, api::contract::role::REPLICA, TIMEOUT)
        .await?;
    let writer = Writer::start(&cluster, &ids);
    let pooled = support::pooler::Load::start(pooler.port());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requested_at = Instant::now();
    cluster
        .annotate_lease(
            api::contract::ANNOTATION_SWITCHOVER_TO,
            &cluster.instances[target].name,
        )
        .await?;
    let new_name = cluster.instances[new_primary].name.clone();
    let switched = cluster.wait_for_new_primary(&new_name, TIMEOUT).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (writes, missing) = writer.finish(&cluster, switched).await?;
    let pooled = pooled.finish().await?;
    if let Some(error) = &pooled.first_error {
        eprintln!("run {run}: first client error through the pooler: {error}");
    }
    lost += missing;
    let pause = writes
        .windows(2)
        .filter(|pair| pair[1].1 > requested_at)
        .map(|pair| (pair[1].1 - pair[0].1).as_secs_f64())
        .fold(0.0, f64::max);

    // PostgreSQL crash: the pod killed first comes back; then the primary's postgres dies and
    // cannot restart (a configuration it refuses), while its instance manager lives on.
    cluster.start_instance(primary)?;
    support::pooler::set_phase(&cluster, primary, "Running").await?;
    let crashed = wait_for_full_quorum(&cluster).await?;
    let crashed_name = cluster.instances[crashed].name.clone();
    let writer = Writer::start(&cluster, &ids);
    std::fs::write(
        cluster.instances[crashed].included_config(),
        "shared_buffers = 'not a size'\n",
    )?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let postmaster = cluster.instances[crashed]
        .postmaster_pid()
        .ok_or_else(|| anyhow::anyhow!("no postmaster.pid"))?;
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let taken_over = cluster.wait_for_new_primary(&crashed_name, TIMEOUT).await?;
    let postgres_crash = killed_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost += writer.finish(&cluster, taken_over).await?.1;
    drop(cluster);
    Ok(Figures {
        pod_loss,
        pause,
        postgres_crash,
        lost,
        client_errors: pooled.errors,
        client_max_wait_ms: pooled.max_wait.as_millis() as u64,
    })
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("FAILOVER_BENCH_RUNS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut pod_losses = Vec::new();
    let mut pauses = Vec::new();
    let mut crashes = Vec::new();
    let mut lost = 0;
    let mut client_errors = 0;
    let mut client_max_wait_ms = 0;
    for run in 0..runs {
        let figures = runtime.block_on(one_run(run))?;
        println!(
            "run {run}: failover_pod_loss_seconds={:.3} switchover_write_pause_seconds={:.3} \
             failover_postgres_crash_seconds={:.3} acked_writes_lost={} \
             switchover_client_errors={} switchover_client_max_wait_ms={}",
            figures.pod_loss,
            figures.pause,
            figures.postgres_crash,
            figures.lost,
            figures.client_errors,
            figures.client_max_wait_ms
        );
        client_errors += figures.client_errors;
        client_max_wait_ms = client_max_wait_ms.max(figures.client_max_wait_ms);
        pod_losses.push(figures.pod_loss);
        pauses.push(figures.pause);
        crashes.push(figures.postgres_crash);
        lost += figures.lost;
    }
    let pod_loss = median(&mut pod_losses);
    println!("failover_seconds_median={pod_loss:.3}");
    println!("failover_pod_loss_seconds_median={pod_loss:.3}");
    println!(
        "failover_postgres_crash_seconds_median={:.3}",
        median(&mut crashes)
    );
    println!(
        "switchover_write_pause_seconds_median={:.3}",
        median(&mut pauses)
    );
    println!("acked_writes_lost={lost}");
    println!("switchover_client_errors={client_errors}");
    println!("switchover_client_max_wait_ms={client_max_wait_ms}");
    Ok(())
}
