//! `cargo xtask bench reshard`: a ShardSplitJob moves half of a range holding
//! `BENCH_RESHARD_MIB` MiB (1024 by default) from one TLS-only PostgreSQL 18 shard to a new one,
//! reconciled by the split controller on a real API server, while pgbench-style writers keep
//! inserting into the range through a real pg-router process (Kubernetes mode, following the
//! ShardRanges live, holding writes to the paused range).
//!
//! Prints `name=value` lines:
//! - `reshard_write_pause_ms_max`: the longest a writer waited for one insert into the moving
//!   half (the router's hold during the cut-over, plus any retry), in milliseconds;
//! - `reshard_copy_mib_per_s` and `reshard_copy_vs_copy_ratio`: the job's snapshot copy against a
//!   plain `COPY (SELECT ...) TO STDOUT | COPY ... FROM STDIN` of the same rows between the same
//!   two servers (psql over TLS, one table after the other), measured in the same run under the
//!   same writes;
//! - `reshard_total_seconds`: job created to Succeeded;
//! - `reshard_rows_lost`: acknowledged rows missing afterwards, and `reshard_rows_misplaced`:
//!   rows found twice or on a shard their range does not name (both must be 0).
//!
//! The pg-router binary is `$PG_ROUTER_BIN` or the one beside this bench in the target folder
//! (`cargo xtask bench reshard` builds it first).

#[path = "../tests/split_bed/mod.rs"]
mod split_bed;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use api::postgres_cluster::{PostgresCluster, ShardKeyType};
use api::sharding::{ShardRange, ShardSplitJob, VindexKind};
use controllers::shard_split::plan;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, PostParams};
use split_bed::routers::{self, RouterProcess};
use split_bed::{Operator, PASSWORD, SCHEMA, hash_of, primary_pod, ranges_in, shard_of};
use testbed::process::die_with_parent;
use testbed::{ApiServer, Postgres, paths};

const NAMESPACE: &str = "bench";
/// Ids of the writers' rows start here (the fill's ids are its keys, far below).
const WRITER_IDS: i64 = 1 << 40;
/// A write that waits longer is listed with the step the job was in when it started.
const SLOW: Duration = Duration::from_millis(200);
/// Shard keys the fill generates per batch (about half land in the range).
const FILL_BATCH: i64 = 500_000;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?
        .block_on(run())
}

fn env_number(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{name}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

fn predicate(start: Option<i64>, end: Option<i64>) -> String {
    plan::range_predicate(
        "customer_id",
        ShardKeyType::Bigint,
        VindexKind::Hash,
        start,
        end,
    )
}

async fn scalar(shard: &Postgres, sql: &str) -> anyhow::Result<i64> {
    Ok(shard.client().await?.query_one(sql, &[]).await?.get(0))
}

/// Fills the range `db-customers-0` (hashes below 0) on `shard` with orders and payments until
/// both tables (with their indexes) hold `bytes`; returns the largest key generated.
async fn fill(shard: &Postgres, bytes: i64) -> anyhow::Result<i64> {
    let in_range = predicate(None, Some(0));
    let orders = shard.client().await?;
    let payments = shard.client().await?;
    let size =
        "SELECT (pg_total_relation_size('orders') + pg_total_relation_size('payments'))::bigint";
    let mut next = 1i64;
    while scalar(shard, size).await? < bytes {
        let (from, to) = (next, next + FILL_BATCH - 1);
        let generated = |table: &str, value: &str| {
            format!(
                "INSERT INTO {table} SELECT * FROM (SELECT g AS customer_id, g AS id, {value}
                   FROM generate_series({from}::bigint, {to}::bigint) g) s WHERE {in_range}"
            )
        };
        let (orders_sql, payments_sql) = (
            generated("orders", "repeat(md5(g::text), 6) AS note"),
            generated("payments", "(g % 100000) / 100.0 AS amount"),
        );
        let (a, b) = tokio::join!(
            orders.batch_execute(&orders_sql),
            payments.batch_execute(&payments_sql),
        );
        a?;
        b?;
        next = to + 1;
    }
    // Hint bits set and statistics there, so that neither copy writes to the source.
    orders
        .batch_execute("VACUUM (ANALYZE) orders, payments")
        .await?;
    orders.batch_execute("CHECKPOINT").await?;
    Ok(next - 1)
}

/// A plain `COPY ... TO STDOUT | COPY ... FROM STDIN` of the moving rows of `tables`, one after
/// the other, from `source` into database `baseline` on `target` (psql over TCP with TLS, as
/// the job's sessions are); returns the time and the bytes the rows take on the target.
async fn plain_copy(
    source: &Postgres,
    target: &Postgres,
    tables: &[&str],
    moving: &str,
) -> anyhow::Result<(Duration, i64)> {
    target
        .client()
        .await?
        .batch_execute("CREATE DATABASE baseline")
        .await?;
    let baseline = target.client_for("baseline").await?;
    baseline.batch_execute(SCHEMA).await?;
    let psql = |port: u16, database: &str, sql: &str| {
        let mut command = Command::new(paths::pg_bin_tls().join("psql"));
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={port} user=postgres dbname={database} sslmode=require"
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", PASSWORD);
        die_with_parent(&mut command);
        command
    };
    let started = Instant::now();
    for table in tables {
        let mut out = psql(
            source.port(),
            "postgres",
            &format!("COPY (SELECT * FROM {table} WHERE {moving}) TO STDOUT"),
        );
        let mut reader = out.stdout(Stdio::piped()).spawn().context("psql COPY TO")?;
        let pipe = reader.stdout.take().context("psql's stdout")?;
        let mut into = psql(
            target.port(),
            "baseline",
            &format!("COPY {table} FROM STDIN"),
        );
        let writer = into
            .stdin(Stdio::from(pipe))
            .stdout(Stdio::null())
            .spawn()
            .context("psql COPY FROM")?;
        let (read, written) = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let mut writer = writer;
            (reader.wait(), writer.wait())
        })
        .await?;
        if !read?.success() || !written?.success() {
            bail!("the plain COPY of {table} failed");
        }
    }
    let elapsed = started.elapsed();
    let bytes: i64 = baseline
        .query_one(
            "SELECT (pg_total_relation_size('orders') + pg_total_relation_size('payments'))::bigint",
            &[],
        )
        .await?
        .get(0);
    drop(baseline);
    target
        .client()
        .await?
        .batch_execute("DROP DATABASE baseline WITH (FORCE)")
        .await?;
    Ok((elapsed, bytes))
}

async fn run() -> anyhow::Result<()> {
    let mib = env_number("BENCH_RESHARD_MIB", 1024)? as i64;
    let writers = env_number("BENCH_RESHARD_WRITERS", 4)? as i64;
    let max_pause = env_number("BENCH_RESHARD_MAX_PAUSE_MS", 1000)? as i32;
    // Before the fill: a missing pg-router is known at once.
    routers::router_binary()?;

    let server = ApiServer::start().await?;
    server.install_crds(&api::all_crds()).await?;
    let client = server.client().await?;
    testbed::apiserver::create_namespace(&client, NAMESPACE).await?;
    let settings = [
        ("max_wal_size", "2GB"),
        ("checkpoint_timeout", "30min"),
        ("shared_buffers", "256MB"),
        ("maintenance_work_mem", "256MB"),
    ];
    let (ca, shards) = split_bed::start_shards(NAMESPACE, 3, &settings);
    for shard in &shards[..2] {
        shard.client().await?.batch_execute(SCHEMA).await?;
    }
    split_bed::two_shard_cluster(&client, NAMESPACE, &ca, &shards).await;

    let filling = Instant::now();
    let last_key = fill(&shards[0], mib * 1024 * 1024).await?;
    let range_bytes = scalar(
        &shards[0],
        "SELECT (pg_total_relation_size('orders') + pg_total_relation_size('payments'))::bigint",
    )
    .await?;
    eprintln!(
        "filled db-customers-0 with {} MiB in {:.0} s",
        range_bytes >> 20,
        filling.elapsed().as_secs_f64()
    );
    let split = plan::split_point(None, Some(0), None).map_err(anyhow::Error::msg)?;
    let keys: Arc<Vec<i64>> = Arc::new(
        (1..=last_key)
            .step_by(7)
            .filter(|key| hash_of(*key) < 0)
            .collect(),
    );

    // pg-router in Kubernetes mode, holding writes to a paused range longer than a cut-over.
    let router = RouterProcess::start(
        &server.kubeconfig_path(),
        NAMESPACE,
        30_000,
        server.dir().join("router.log"),
    )
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..writers)
        .map(|number| {
            tokio::spawn(routers::writer(
                router.port,
                number,
                keys.clone(),
                WRITER_IDS + number * 1_000_000_000,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The plain COPY of the same rows between the same servers, under the same writes.
    let moving = predicate(Some(split), Some(0));
    let (plain_time, moving_bytes) =
        plain_copy(&shards[0], &shards[2], &["orders", "payments"], &moving).await?;
    eprintln!(
        "plain COPY: {} MiB in {:.1} s",
        moving_bytes >> 20,
        plain_time.as_secs_f64()
    );

    // The split.
    let mut operator = Operator::start(&client, NAMESPACE);
    let jobs: Api<ShardSplitJob> = Api::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    jobs.create(
        &PostParams::default(),
        &split_bed::job("split", "db-customers-0", "shard-2", None, max_pause),
    )
    .await?;
    // The new shard's cluster appears; the bench plays its primary once asked for.
    let clusters: Api<PostgresCluster> = Api::namespaced(client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    while clusters.get_opt("db-shard-2").await?.is_none()
        || secrets.get_opt("db-shard-2-superuser").await?.is_none()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    primary_pod(&client, NAMESPACE, "db-shard-2", shards[2].port()).await;
    let mut steps: Vec<(Instant, String)> = vec![(started, "Plan".into())];
    let done = loop {
        let job = jobs.get("split").await?;
        if let Some(step) = job.status.as_ref().and_then(|s| s.step)
            && steps
                .last()
                .is_none_or(|(_, last)| *last != format!("{step:?}"))
        {
            steps.push((Instant::now(), format!("{step:?}")));
        }
        let phase = job.status.as_ref().and_then(|s| s.phase.clone());
        if matches!(
            phase.as_deref(),
            Some("Succeeded" | "Failed" | "RolledBack")
        ) {
            break job;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("the split did not end within an hour: {:?}", job.status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let total = started.elapsed();
    operator.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = routers::Writes::default();
    for task in load {
        writes.merge(task.await??);
    }
    // The longest wait for one insert into the moving half, and into the rest; the slow ones.
    let moving = |key: i64| hash_of(key) >= i128::from(split);
    let longest = |in_moving: bool| {
        writes
            .writes
            .iter()
            .filter(|w| moving(w.key) == in_moving)
            .map(|w| w.waited)
            .max()
            .unwrap_or_default()
    };
    let (moving_max, staying_max) = (longest(true), longest(false));
    let slow: Vec<(Instant, Duration, bool)> = writes
        .writes
        .iter()
        .filter(|w| w.waited > SLOW)
        .map(|w| (w.started, w.waited, moving(w.key)))
        .collect();
    let mut latencies: Vec<Duration> = writes.writes.iter().map(|w| w.waited).collect();
    let status = done.status.clone().unwrap_or_default();
    if status.phase.as_deref() != Some("Succeeded") {
        bail!("the split did not succeed: {status:?}");
    }

    // The job's copy time, from its SnapshotCopied event ("... copied in N ms").
    let events: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);
    let copy_ms: f64 = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SnapshotCopied"))
        .filter_map(|e| {
            e.note
                .as_deref()?
                .rsplit("copied in ")
                .next()?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .next_back()
        .context("no SnapshotCopied event")?;

    // Every acknowledged row exactly once, on the shard its range names now.
    let layout: Vec<ShardRange> = ranges_in(&Api::namespaced(client.clone(), NAMESPACE)).await;
    let mut places: BTreeMap<(i64, i64), Vec<String>> = BTreeMap::new();
    for (index, shard) in shards.iter().enumerate() {
        for row in shard
            .client()
            .await?
            .query(
                "SELECT customer_id, id FROM orders WHERE id >= $1",
                &[&WRITER_IDS],
            )
            .await?
        {
            places
                .entry((row.get(0), row.get(1)))
                .or_default()
                .push(format!("shard-{index}"));
        }
    }
    let acknowledged: HashSet<(i64, i64)> = writes.acknowledged().collect();
    let lost = acknowledged
        .iter()
        .filter(|row| !places.contains_key(row))
        .count();
    let misplaced = places
        .iter()
        .filter(|((key, _), found)| **found != vec![shard_of(&layout, *key)])
        .count();
    latencies.sort();
    let p50 = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();

    let moved_mib = moving_bytes as f64 / (1024.0 * 1024.0);
    let copy_seconds = copy_ms / 1000.0;
    println!("reshard_range_mib={}", range_bytes >> 20);
    println!("reshard_moved_mib={moved_mib:.0}");
    println!("reshard_write_pause_ms_max={}", moving_max.as_millis());
    println!(
        "reshard_cut_over_pause_ms={}",
        status.write_pause_millis.unwrap_or_default()
    );
    println!("reshard_write_ms_p50={:.2}", p50.as_secs_f64() * 1000.0);
    println!(
        "reshard_write_ms_max_other_range={}",
        staying_max.as_millis()
    );
    println!("reshard_copy_seconds={copy_seconds:.2}");
    println!("reshard_copy_mib_per_s={:.1}", moved_mib / copy_seconds);
    println!(
        "reshard_plain_copy_mib_per_s={:.1}",
        moved_mib / plain_time.as_secs_f64()
    );
    println!(
        "reshard_copy_vs_copy_ratio={:.2}",
        plain_time.as_secs_f64() / copy_seconds
    );
    println!("reshard_total_seconds={:.1}", total.as_secs_f64());
    println!("reshard_rows_acknowledged={}", acknowledged.len());
    println!("reshard_writes_retried={}", writes.retried);
    println!("reshard_writes_failed={}", writes.failed.len());
    println!(
        "reshard_aborted_cut_overs={}",
        status.aborted_cut_overs.unwrap_or(0)
    );
    println!("reshard_rows_lost={lost}");
    println!("reshard_rows_misplaced={misplaced}");
    // Where the slow writes happened: before the job, in which step, or after it.
    let mut slow_by_step: BTreeMap<String, (usize, u128, u128)> = BTreeMap::new();
    for (at, waited, moving) in &slow {
        let step = if *at < started {
            "before the job".to_string()
        } else if *at > started + total {
            "after the job".to_string()
        } else {
            steps
                .iter()
                .rev()
                .find(|(entered, _)| entered <= at)
                .map_or("Plan".to_string(), |(_, step)| step.clone())
        };
        let entry = slow_by_step.entry(step).or_default();
        entry.0 += 1;
        let slot = if *moving { &mut entry.1 } else { &mut entry.2 };
        *slot = (*slot).max(waited.as_millis());
    }
    for (step, (count, moving, other)) in &slow_by_step {
        eprintln!(
            "writes over {} ms while {step}: {count} (longest {moving} ms in the moving half, {other} ms in the other)",
            SLOW.as_millis()
        );
    }
    if let Some(failure) = writes.failed.first() {
        eprintln!("first failed write: {failure}");
    }
    if lost > 0 || misplaced > 0 {
        bail!("{lost} acknowledged rows lost, {misplaced} misplaced");
    }
    Ok(())
}
