//! Two ShardSplitJobs under a steady write load through two real pg-router processes
//! (Kubernetes mode, real API server, TLS-only PostgreSQL 18 shards, the split controller
//! in-process): the first with both routers following the split, the second with one router
//! stopped (SIGSTOP) from the catch-up until the job has finished, so that it comes back
//! stale. Afterwards every acknowledged row exists exactly once, on the shard its range names;
//! no write failed, and the only errors the writers saw were retryable ones (40001) during a
//! split; the measured pauses are printed as `name=value`. Then two routers whose watch lags
//! (`PG_ROUTER_FAULT=ignore_topology_watch`), still routing the second split's moved range to
//! its old shard, write to it: the source's fence refuses the write with a retryable 40001 that
//! names the move (in a transaction the client gets it and nothing is written; retried, the
//! transaction commits on the new shard), and an autocommit write is retried by the router on
//! the new shard by itself; each row exists once, on the shard its range names.

mod common;
mod split_bed;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::postgres_cluster::PostgresCluster;
use api::sharding::{ShardRange, ShardSplitJob, SplitStep};
use common::Env;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::PostParams;
use split_bed::routers::{RouterProcess, Writes, writer};
use split_bed::{Operator, SCHEMA, hash_of, primary_pod, ranges_in, shard_of};
use testbed::Postgres;

/// Writers per router.
const WRITERS: i64 = 2;
/// Writers' ids start at `(number + 1) * IDS`, so that rows never collide.
const IDS: i64 = 1_000_000_000;
/// How long after a split a retryable error still counts as the split's (a router that has
/// not seen the flip yet meets the fence).
const SLACK: Duration = Duration::from_secs(3);

/// A job's run: when it was created and when it succeeded.
struct Run {
    created: Instant,
    succeeded: Instant,
}

/// Creates a split of `source` onto the new shard `target` (index `index`), plays the new
/// shard's primary once the job has provisioned its cluster, calls `on_catch_up` once the job
/// is in CatchUp, and waits for it to succeed.
async fn split(
    env: &Env,
    shards: &[Postgres],
    name: &str,
    source: &str,
    index: usize,
    on_catch_up: impl FnOnce(),
) -> Run {
    let jobs = env.api::<ShardSplitJob>();
    let target = format!("shard-{index}");
    let child = format!("db-shard-{index}");
    let created = Instant::now();
    jobs.create(
        &PostParams::default(),
        &split_bed::job(name, source, &target, None, 2000),
    )
    .await
    .expect("creating the ShardSplitJob");
    env.object::<PostgresCluster>(&child).await;
    env.object::<Secret>(&format!("{child}-superuser")).await;
    primary_pod(&env.client, &env.namespace, &child, shards[index].port()).await;
    let mut on_catch_up = Some(on_catch_up);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let job = jobs.get(name).await.expect("reading the job");
        let status = job.status.clone().unwrap_or_default();
        if status.step.is_some_and(|step| step >= SplitStep::CatchUp)
            && let Some(call) = on_catch_up.take()
        {
            call();
        }
        match status.phase.as_deref() {
            Some("Succeeded") => {
                return Run {
                    created,
                    succeeded: Instant::now(),
                };
            }
            Some("Failed" | "RolledBack") => panic!("split {name} ended: {status:?}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "split {name} did not end: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The longest a write into `[start, end)` (hashes) that started during `run` waited.
fn longest_pause(writes: &Writes, run: &Run, (start, end): (Option<i64>, Option<i64>)) -> u128 {
    writes
        .writes
        .iter()
        .filter(|w| w.started >= run.created && w.started <= run.succeeded)
        .filter(|w| {
            let hash = hash_of(w.key);
            start.is_none_or(|s| i128::from(s) <= hash) && end.is_none_or(|e| hash < i128::from(e))
        })
        .map(|w| w.waited.as_millis())
        .max()
        .unwrap_or_default()
}

/// The pause the job itself measured (`status.writePauseMillis`).
async fn job_pause(env: &Env, name: &str) -> i64 {
    env.api::<ShardSplitJob>()
        .get(name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.write_pause_millis)
        .unwrap_or_default()
}

fn bounds(range: &ShardRange) -> (Option<i64>, Option<i64>) {
    (range.spec.start, range.spec.end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_through_two_routers_lose_no_write_even_with_a_stale_router() {
    let env = Env::without_controller("routers").await;
    let (ca, shards) = split_bed::start_shards(
        &env.namespace,
        4,
        &[("client_connection_check_interval", "100ms")],
    );
    for shard in &shards[..2] {
        shard
            .client()
            .await
            .unwrap()
            .batch_execute(SCHEMA)
            .await
            .unwrap();
    }
    split_bed::two_shard_cluster(&env.client, &env.namespace, &ca, &shards).await;
    let kubeconfig = env.server.kubeconfig_path();
    let log = |name: &str| env.server.dir().join(format!("{name}.log"));
    // Held writes wait up to 65 s, as the operator's router Deployment sets it.
    let router_a = RouterProcess::start(&kubeconfig, &env.namespace, 65_000, log("router-a"))
        .await
        .unwrap();
    let router_b = RouterProcess::start(&kubeconfig, &env.namespace, 65_000, log("router-b"))
        .await
        .unwrap();

    // Writers through both routers, at keys all over the space (both ranges, both halves).
    let keys: Arc<Vec<i64>> = Arc::new((1..=500).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let load = |router: &RouterProcess, first: i64| -> Vec<_> {
        (first..first + WRITERS)
            .map(|number| {
                tokio::spawn(writer(
                    router.port,
                    number,
                    keys.clone(),
                    (number + 1) * IDS,
                    stop.clone(),
                ))
            })
            .collect()
    };
    let load_a = load(&router_a, 0);
    let load_b = load(&router_b, WRITERS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let operator = Operator::start(&env.client, &env.namespace);

    // 1. Both routers follow: db-customers-0 splits onto a new shard-2.
    let first = split(&env, &shards, "first", "db-customers-0", 2, || {}).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Two routers whose watch lags behind (fault injection): they route by the layout after
    // the first split until a shard's fence makes them read the objects again.
    let stale_transaction = RouterProcess::start_with_fault(
        &kubeconfig,
        &env.namespace,
        65_000,
        log("router-stale-transaction"),
        Some("ignore_topology_watch"),
    )
    .await
    .unwrap();
    let stale_autocommit = RouterProcess::start_with_fault(
        &kubeconfig,
        &env.namespace,
        65_000,
        log("router-stale-autocommit"),
        Some("ignore_topology_watch"),
    )
    .await
    .unwrap();

    // 2. Router B stopped from the catch-up of db-customers-1's split onto a new shard-3 until
    // the job has finished (pause, flip, clean-up all happen without it): it comes back with
    // the old topology and its writers' inserts in flight.
    let stopped = std::cell::Cell::new(None);
    let second = split(&env, &shards, "second", "db-customers-1", 3, || {
        router_b.stop();
        stopped.set(Some(Instant::now()));
    })
    .await;
    router_b.resume();
    let stopped_for = stopped.get().expect("router B was stopped").elapsed();
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut through_a = Writes::default();
    for task in load_a {
        through_a.merge(task.await.unwrap().unwrap());
    }
    let mut through_b = Writes::default();
    for task in load_b {
        through_b.merge(task.await.unwrap().unwrap());
    }
    drop(operator);

    // Every acknowledged row exactly once, on the shard its range names now; nothing else.
    let layout = ranges_in(&env.api()).await;
    let mut places: BTreeMap<(i64, i64), Vec<String>> = BTreeMap::new();
    for (index, shard) in shards.iter().enumerate() {
        for row in shard
            .client()
            .await
            .unwrap()
            .query("SELECT customer_id, id FROM orders", &[])
            .await
            .unwrap()
        {
            places
                .entry((row.get(0), row.get(1)))
                .or_default()
                .push(format!("shard-{index}"));
        }
    }
    let acknowledged: Vec<(i64, i64)> = through_a
        .acknowledged()
        .chain(through_b.acknowledged())
        .collect();
    let lost = acknowledged
        .iter()
        .filter(|row| !places.contains_key(row))
        .count();
    let misplaced = places
        .iter()
        .filter(|((key, _), found)| **found != vec![shard_of(&layout, *key)])
        .count();
    let unacknowledged = places.len() as i64 - acknowledged.len() as i64;
    let range = |name: &str| {
        layout
            .iter()
            .find(|r| r.name_any() == name)
            .unwrap_or_else(|| panic!("range {name}"))
    };
    let (first_moving, second_moving) = (range("first-moving"), range("second-moving"));
    assert_eq!(first_moving.spec.shard, "shard-2");
    assert_eq!(second_moving.spec.shard, "shard-3");
    let pause_first = longest_pause(&through_a, &first, bounds(first_moving)).max(longest_pause(
        &through_b,
        &first,
        bounds(first_moving),
    ));
    let pause_second = longest_pause(&through_a, &second, bounds(second_moving));
    // A retryable error counts when it came during a split (or just after it, from a router
    // that had not seen the flip yet).
    let during = |at: &Instant| {
        (*at >= first.created && *at <= first.succeeded + SLACK)
            || (*at >= second.created && *at <= resumed + SLACK)
    };
    let retried_outside = through_a
        .retried_at
        .iter()
        .chain(&through_b.retried_at)
        .filter(|at| !during(at))
        .count();
    println!("split_routers_rows_acknowledged={}", acknowledged.len());
    println!("split_routers_rows_lost={lost}");
    println!("split_routers_rows_misplaced={misplaced}");
    println!(
        "split_routers_writes_failed={}",
        through_a.failed.len() + through_b.failed.len()
    );
    println!(
        "split_routers_writes_retried={}",
        through_a.retried + through_b.retried
    );
    println!("split_routers_write_pause_ms_max={pause_first}");
    println!(
        "split_routers_cut_over_pause_ms={}",
        job_pause(&env, "first").await
    );
    println!("split_routers_stale_write_pause_ms_max={pause_second}");
    println!(
        "split_routers_stale_cut_over_pause_ms={}",
        job_pause(&env, "second").await
    );
    println!(
        "split_routers_stale_router_stopped_ms={}",
        stopped_for.as_millis()
    );
    assert!(
        through_a.failed.is_empty() && through_b.failed.is_empty(),
        "writes failed: {:?} {:?}",
        through_a.failed.first(),
        through_b.failed.first()
    );
    assert_eq!(
        (lost, misplaced, unacknowledged),
        (0, 0, 0),
        "rows lost, misplaced (or twice), or never acknowledged"
    );
    assert_eq!(retried_outside, 0, "retryable errors outside a split");
    // Both routers wrote into both moving ranges, router B also after it came back.
    for (name, range) in [("first", first_moving), ("second", second_moving)] {
        for (router, writes) in [("A", &through_a), ("B", &through_b)] {
            assert!(
                writes.writes.iter().any(|w| {
                    let hash = hash_of(w.key);
                    w.acknowledged
                        && range.spec.start.is_none_or(|s| i128::from(s) <= hash)
                        && range.spec.end.is_none_or(|e| hash < i128::from(e))
                }),
                "router {router} wrote into the moving range of {name}"
            );
        }
    }
    assert!(
        through_b
            .writes
            .iter()
            .any(|w| w.acknowledged && w.started > resumed),
        "router B wrote after it came back"
    );

    // 3. The stale routers still place second-moving's keys on shard-1, the source, which the
    // job has fenced: their writes there are refused, never written to the old place.
    let key = (1..)
        .find(|key| shard_of(&layout, *key) == "shard-3")
        .expect("a key of the moved range");
    let on_shards = |id: i64| {
        let shards = &shards;
        async move {
            let mut found = Vec::new();
            for (index, shard) in shards.iter().enumerate() {
                let rows: i64 = shard
                    .client()
                    .await
                    .unwrap()
                    .query_one(
                        "SELECT count(*) FROM orders WHERE customer_id = $1 AND id = $2",
                        &[&key, &id],
                    )
                    .await
                    .unwrap()
                    .get(0);
                found.extend(std::iter::repeat_n(format!("shard-{index}"), rows as usize));
            }
            found
        }
    };
    let insert = "INSERT INTO orders (customer_id, id, note) VALUES ($1, $2, 'stale router')";
    // In a transaction: the fence's retryable error reaches the client, and nothing is written.
    let client = split_bed::routers::connect(stale_transaction.port)
        .await
        .unwrap();
    let fenced_id = 9 * IDS;
    client.batch_execute("BEGIN").await.unwrap();
    let error = client
        .execute(insert, &[&key, &fenced_id])
        .await
        .expect_err("the source's fence refuses a stale router's write to the moved range");
    let error = error.as_db_error().expect("an error from the server");
    assert_eq!(
        error.code(),
        &tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
    );
    assert!(
        error.message().contains("moved to shard-3") && error.message().contains("retry"),
        "a clear retryable error: {}",
        error.message()
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        on_shards(fenced_id).await,
        Vec::<String>::new(),
        "nothing written"
    );
    // The fence made the router read its topology again: the transaction, retried as the
    // error says, commits on the range's new shard.
    let retried_at = Instant::now();
    loop {
        let attempt = async {
            client.batch_execute("BEGIN").await?;
            client.execute(insert, &[&key, &fenced_id]).await?;
            client.batch_execute("COMMIT").await
        };
        match attempt.await {
            Ok(()) => break,
            Err(error)
                if error.code()
                    == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) =>
            {
                client.batch_execute("ROLLBACK").await.unwrap();
                assert!(
                    retried_at.elapsed() < Duration::from_secs(10),
                    "the retry keeps failing: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("the retried transaction failed: {error}"),
        }
    }
    assert_eq!(
        on_shards(fenced_id).await,
        ["shard-3"],
        "once, on the range's shard"
    );
    // In autocommit: the router retries once on the new layout itself; the client sees success.
    let client = split_bed::routers::connect(stale_autocommit.port)
        .await
        .unwrap();
    let retried_id = 9 * IDS + 1;
    client
        .execute(insert, &[&key, &retried_id])
        .await
        .expect("a stale router's autocommit write is retried after the fence");
    assert_eq!(
        on_shards(retried_id).await,
        ["shard-3"],
        "once, on the range's shard"
    );
}
