//! `cargo xtask bench failover`: failover and switchover timings on real PostgreSQL 18 and a real
//! kube-apiserver, with the default Lease settings (4 s duration, 2 s renew deadline).
//!
//! Each run starts a three-instance cluster with one synchronous standby, then
//! - kills (`kill -9`) the primary's postgres and instance manager and measures the time from the
//!   kill to the first successful write on the new primary (`failover_seconds`);
//! - asks for a switchover to the remaining replica while a writer writes every 10 ms to whichever
//!   instance holds the Lease, and measures the longest gap between two successful writes
//!   (`switchover_write_pause_seconds`).
//!
//! Prints the medians as `failover_seconds_median=<x>` and `switchover_write_pause_seconds_median=<x>`.
//! Runs: `FAILOVER_BENCH_RUNS` (default 5).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{TestCluster, connect_port};

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

/// Writes every 10 ms to the Lease holder until `stop`; returns the instants of acknowledged
/// writes.
async fn write_to_holder(cluster: Arc<TestCluster>, stop: Arc<AtomicBool>) -> Vec<Instant> {
    let mut acknowledged = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut id: i64 = 0;
    while !stop.load(Ordering::SeqCst) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            if let Ok(Some(holder)) = cluster.lease_holder().await {
                let port = cluster.instances[cluster.index_of(&holder)].pg_port;
                client = tokio::time::timeout(Duration::from_millis(500), connect_port(port))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
        }
        if let Some(connected) = &client {
            id += 1;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let insert = connected.execute("INSERT INTO bench (id) VALUES ($1)", &params);
            match tokio::time::timeout(Duration::from_millis(1000), insert).await {
                Ok(Ok(_)) => acknowledged.push(Instant::now()),
                _ => client = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acknowledged
}

async fn one_run(run: usize) -> anyhow::Result<(f64, f64)> {
    let mut cluster = TestCluster::start(&format!("bench{run}"), 3, 1).await?;
    let primary = cluster.wait_for_primary_with_replicas(2, TIMEOUT).await?;
    let old_primary = cluster.instances[primary].name.clone();
    cluster
        .connect(primary)
        .await?
        .batch_execute("CREATE TABLE bench (id bigint)")
        .await?;
    // Let a few renewals pass, as in steady state.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed_at = Instant::now();
    cluster.kill_instance(primary);
    let new_primary = cluster.wait_for_new_primary(&old_primary, TIMEOUT).await?;
    let failover = killed_at.elapsed().as_secs_f64();

    // Switchover to the remaining replica (once it streams from the new primary).
    let target = (0..3)
        .find(|index| *index != primary && *index != new_primary)
        .expect("three instances");
    cluster
        .wait_for_role(target, api::contract::role::REPLICA, TIMEOUT)
        .await?;
    let cluster = Arc::new(cluster);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_to_holder(cluster.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requested_at = Instant::now();
    cluster
        .annotate_lease(
            api::contract::ANNOTATION_SWITCHOVER_TO,
            &cluster.instances[target].name,
        )
        .await?;
    let new_name = cluster.instances[new_primary].name.clone();
    cluster.wait_for_new_primary(&new_name, TIMEOUT).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await?;
    let pause = writes
        .windows(2)
        .filter(|pair| pair[1] > requested_at)
        .map(|pair| (pair[1] - pair[0]).as_secs_f64())
        .fold(0.0, f64::max);
    let cluster = Arc::try_unwrap(cluster).map_err(|_| anyhow::anyhow!("cluster still shared"))?;
    drop(cluster);
    Ok((failover, pause))
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
    let mut failovers = Vec::new();
    let mut pauses = Vec::new();
    for run in 0..runs {
        let (failover, pause) = runtime.block_on(one_run(run))?;
        println!(
            "run {run}: failover_seconds={failover:.3} switchover_write_pause_seconds={pause:.3}"
        );
        failovers.push(failover);
        pauses.push(pause);
    }
    println!("failover_seconds_median={:.3}", median(&mut failovers));
    println!(
        "switchover_write_pause_seconds_median={:.3}",
        median(&mut pauses)
    );
    Ok(())
}
