//! ShardSplitJob on a real API server with real PostgreSQL 18 shards and the split controller
//! running in-process: pre-flight refusals with clear reasons, rollbacks when a job is deleted
//! before its cut-over (one that provisioned its target shard deletes it, an existing target
//! stays; a target whose CA does not verify the source gets no subscription: verify-full), and
//! a split under a steady write load with the operator killed in each of the seven
//! steps, which finishes and leaves every acknowledged row exactly once, on the shard its
//! range names.

mod common;
mod split_bed;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use api::postgres_cluster::PostgresCluster;
use api::sharding::{ShardRange, ShardRangeState, ShardSplitJob, SplitStep};
use common::Env;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use split_bed::{Operator, PASSWORD, SCHEMA, primary_pod, ranges_in, shard_of};
use testbed::Postgres;

fn job(name: &str, source: &str, target: &str, split: Option<i64>) -> ShardSplitJob {
    split_bed::job(name, source, target, split, 5000)
}

async fn create_job(env: &Env, job: ShardSplitJob) -> ShardSplitJob {
    env.api::<ShardSplitJob>()
        .create(&PostParams::default(), &job)
        .await
        .expect("creating the ShardSplitJob")
}

/// Holds the job's barrier table on `shard` locked, so that the job's CopySnapshot step stops
/// where it first writes it (before the slot): the place the tests kill the operator.
async fn block_copy(shard: &Postgres, job: &ShardSplitJob) -> tokio_postgres::Client {
    let barrier = controllers::shard_split::plan::barrier_table(&job.uid().unwrap());
    let client = shard.client().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {barrier} (id int PRIMARY KEY, seq bigint NOT NULL);
             INSERT INTO {barrier} VALUES (1, 0)"
        ))
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {barrier} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    client
}

/// Holds the job's barrier row on `shard` locked, so that the target never confirms a catch-up:
/// the job stays in CatchUp (its copy done) until the returned session ends its transaction.
async fn block_catch_up(shard: &Postgres, job: &ShardSplitJob) -> tokio_postgres::Client {
    let barrier = controllers::shard_split::plan::barrier_table(&job.uid().unwrap());
    let client = shard.client().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {barrier} (id int PRIMARY KEY, seq bigint NOT NULL);
             INSERT INTO {barrier} VALUES (1, 0)"
        ))
        .await
        .unwrap();
    client
        .batch_execute(&format!("BEGIN; SELECT * FROM {barrier} FOR UPDATE"))
        .await
        .unwrap();
    client
}

/// A session on `shard` inside a transaction that ran `sql` (a lock it keeps until ROLLBACK).
async fn lock(shard: &Postgres, sql: &str) -> tokio_postgres::Client {
    let client = shard.client().await.unwrap();
    client
        .batch_execute(&format!("BEGIN; {sql}"))
        .await
        .unwrap();
    client
}

/// Kills the operator once one of its sessions on `shard` waits for a lock (the test holds
/// it: the step is at work and stuck there), checking the job is in `expected` (`None`: no
/// step recorded yet, the Plan); returns the step it was killed in.
async fn kill_when_waiting(
    env: &Env,
    operator: &mut Operator,
    shard: &Postgres,
    expected: Option<SplitStep>,
) -> SplitStep {
    let watcher = shard.client().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        // The cut-over is held on an advisory lock: a short wait of the verification's own
        // fence for the load's writes (a relation lock) must not pass for it.
        let advisory_only = expected == Some(SplitStep::CutOver);
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'postgres-operator-split' AND backend_type = 'client backend' AND wait_event_type = 'Lock'
                    AND (NOT $1 OR wait_event = 'advisory')",
                &[&advisory_only],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the operator never waited for the lock in {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    operator.kill().await;
    let job = env.api::<ShardSplitJob>().get("split").await.unwrap();
    assert_eq!(step(&job), expected, "{:?}", job.status);
    // The killed operator's sessions go, as a dead process's would: its sockets close and the
    // shards notice within 100 ms (`client_connection_check_interval`), also while a statement
    // waits. In-process, a connection whose statement is still waiting stays open after the
    // abort, so the test ends those sessions itself.
    watcher
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'postgres-operator-split' AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap();
    loop {
        let left: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'postgres-operator-split' AND backend_type = 'client backend'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the killed operator's sessions stay"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    expected.unwrap_or(SplitStep::Plan)
}

/// State of the moving range of job `split`.
async fn moving_state(env: &Env) -> ShardRangeState {
    env.api::<ShardRange>()
        .get("split-moving")
        .await
        .unwrap()
        .spec
        .state
}

/// The job once `check` holds for it.
async fn job_where(
    env: &Env,
    name: &str,
    what: &str,
    check: impl Fn(&ShardSplitJob) -> bool,
) -> ShardSplitJob {
    let api = env.api::<ShardSplitJob>();
    env.eventually(what, || {
        let api = api.clone();
        let check = &check;
        async move {
            let job = api.get_opt(name).await.ok()??;
            let found = check(&job).then_some(job.clone());
            if found.is_none() && std::env::var_os("SPLIT_TEST_TRACE").is_some() {
                eprintln!("{name}: {:?}", job.status);
            }
            found
        }
    })
    .await
}

fn phase(job: &ShardSplitJob) -> Option<&str> {
    job.status.as_ref()?.phase.as_deref()
}

fn step(job: &ShardSplitJob) -> Option<SplitStep> {
    job.status.as_ref()?.step
}

fn condition_message(job: &ShardSplitJob) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

async fn ranges(env: &Env) -> Vec<ShardRange> {
    ranges_in(&env.api()).await
}

async fn rows(shard: &Postgres, table: &str) -> Vec<(i64, i64)> {
    shard
        .client()
        .await
        .unwrap()
        .query(&format!("SELECT customer_id, id FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn scalar(shard: &Postgres, sql: &str) -> i64 {
    shard
        .client()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// Writes rows to the shard the current ShardRanges name, re-reading them before each write
/// and retrying a write the fence refuses (40001); returns the acknowledged keys.
async fn write_load(
    ranges: Api<ShardRange>,
    urls: BTreeMap<String, String>,
    stop: Arc<AtomicBool>,
    first_id: i64,
) -> (Vec<(i64, i64)>, usize) {
    let mut clients = BTreeMap::new();
    for (shard, url) in &urls {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        clients.insert(shard.clone(), client);
    }
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let mut id = first_id;
    while !stop.load(Ordering::Relaxed) {
        id += 1;
        let key = id % 97;
        loop {
            let layout = ranges_in(&ranges).await;
            let shard = shard_of(&layout, key);
            let client = &clients[&shard];
            let result = client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO orders VALUES ({key}, {id}, 'n');
                     INSERT INTO payments VALUES ({key}, {id}, 1.5); COMMIT"
                ))
                .await;
            match result {
                Ok(()) => break,
                Err(error)
                    if error.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) =>
                {
                    let _ = client.batch_execute("ROLLBACK").await;
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => panic!("write of key {key} to {shard} failed: {error:?}"),
            }
        }
        acknowledged.push((key, id));
    }
    (acknowledged, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_splits_online_refuses_bad_jobs_and_rolls_back_when_deleted() {
    let env = Env::without_controller("split").await;
    // The shards speak TLS only, as the operator's clusters do, issued from the one CA of the
    // sharded cluster (the test plays the operator's TLS stage: the certificates, the CA file
    // each server keeps and the `<child>-ca` Secrets); the split controller verifies each like
    // pg-router does, and so does the subscription of a split.
    let (ca, shards) = split_bed::start_shards(
        &env.namespace,
        3,
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
    // What the operator writes for a two-shard cluster, and the shards' primaries.
    split_bed::two_shard_cluster(&env.client, &env.namespace, &ca, &shards).await;
    // The load's own connections use the shards' Unix sockets (TCP takes TLS clients only).
    let urls: BTreeMap<String, String> = (0..3)
        .map(|i| {
            (
                format!("shard-{i}"),
                format!(
                    "{} password={PASSWORD}",
                    shards[i].connection_string("postgres")
                ),
            )
        })
        .collect();
    // Initial rows, each on the shard its range names.
    {
        let layout = ranges(&env).await;
        for key in 0..97i64 {
            let shard = shard_of(&layout, key);
            let index: usize = shard.trim_start_matches("shard-").parse().unwrap();
            shards[index]
                .client()
                .await
                .unwrap()
                .batch_execute(&format!(
                    "INSERT INTO orders VALUES ({key}, 0, 'seed'); INSERT INTO payments VALUES ({key}, 0, 2)"
                ))
                .await
                .unwrap();
        }
    }
    let mut operator = Operator::start(&env.client, &env.namespace);

    // (b) Pre-flight refusals, each with a condition that names the problem.
    create_job(&env, job("unknown", "db-customers-9", "shard-2", None)).await;
    create_job(&env, job("outside", "db-customers-0", "shard-2", Some(5))).await;
    create_job(&env, job("nokey", "db-logs-0", "shard-1", None)).await;
    for (name, expected) in [
        ("unknown", "ShardRange db-customers-9 does not exist"),
        ("outside", "spec.splitPoint 5 is not strictly inside"),
        ("nokey", "table logs has no primary key"),
    ] {
        let refused = job_where(&env, name, &format!("{name} refused"), |j| {
            phase(j) == Some("Failed")
        })
        .await;
        let message = condition_message(&refused);
        assert!(message.contains(expected), "{name}: {message}");
    }
    assert_eq!(
        ranges(&env).await.len(),
        4,
        "a refused job changes no range"
    );

    // (e) A job that provisioned its target shard (step 2: a new child PostgresCluster and
    // its superuser Secret), deleted before its cut-over, deletes them again.
    create_job(&env, job("fresh", "db-customers-1", "shard-3", None)).await;
    let provisioned: PostgresCluster = env.object("db-shard-3").await;
    assert!(
        provisioned
            .annotations()
            .contains_key(controllers::shard_split::ANNOTATION_PROVISIONED_BY)
    );
    job_where(&env, "fresh", "fresh waiting for its new shard", |j| {
        step(j) == Some(SplitStep::ProvisionTarget)
            && condition_message(j).contains("no primary yet")
    })
    .await;
    env.api::<ShardSplitJob>()
        .delete("fresh", &DeleteParams::default())
        .await
        .unwrap();
    env.eventually("the fresh job is gone", || async {
        env.api::<ShardSplitJob>()
            .get_opt("fresh")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        env.api::<PostgresCluster>()
            .get_opt("db-shard-3")
            .await
            .unwrap()
            .is_none(),
        "the shard the job provisioned is deleted by its rollback"
    );
    assert!(
        env.api::<Secret>()
            .get_opt("db-shard-3-superuser")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        ranges(&env)
            .await
            .iter()
            .all(|r| r.name_any() != "fresh-moving")
    );

    // An existing target shard has its child PostgresCluster, which a rollback leaves alone.
    let parent: PostgresCluster = env.object("db").await;
    env.api::<PostgresCluster>()
        .create(
            &PostParams::default(),
            &controllers::sharded_cluster::builders::child_cluster(&parent, 0),
        )
        .await
        .unwrap();

    // (d) Rollback: a split of db-customers-1 onto shard-0, held in CatchUp (the target never
    // confirms a barrier) after its copy, then deleted before cut-over.
    let before_0 = rows(&shards[0], "orders").await.len();
    let undo = create_job(&env, job("undo", "db-customers-1", "shard-0", None)).await;
    let hold = block_catch_up(&shards[0], &undo).await;
    job_where(&env, "undo", "undo catching up", |j| {
        step(j) == Some(SplitStep::CatchUp) && condition_message(j).contains("behind")
    })
    .await;
    assert!(
        env.api::<ShardRange>()
            .get_opt("undo-moving")
            .await
            .unwrap()
            .is_some(),
        "the Plan step split the range"
    );
    assert!(
        rows(&shards[0], "orders").await.len() > before_0,
        "rows were copied to the target"
    );
    assert_eq!(
        scalar(&shards[1], "SELECT count(*) FROM pg_replication_slots").await,
        1
    );
    env.api::<ShardSplitJob>()
        .delete("undo", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    hold.batch_execute("ROLLBACK").await.unwrap();
    env.eventually("the undone job is gone", || async {
        env.api::<ShardSplitJob>()
            .get_opt("undo")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let after = ranges(&env).await;
    let customers_1 = after
        .iter()
        .find(|r| r.name_any() == "db-customers-1")
        .unwrap();
    assert_eq!(
        (
            customers_1.spec.start,
            customers_1.spec.end,
            customers_1.spec.shard.as_str()
        ),
        (Some(0), None, "shard-1"),
        "merged back"
    );
    assert!(after.iter().all(|r| r.name_any() != "undo-moving"));
    assert_eq!(
        rows(&shards[0], "orders").await.len(),
        before_0,
        "copied rows removed"
    );
    assert_eq!(
        scalar(&shards[1], "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(
        scalar(&shards[1], "SELECT count(*) FROM pg_publication").await,
        0
    );
    assert_eq!(
        scalar(&shards[0], "SELECT count(*) FROM pg_subscription").await,
        0
    );
    assert!(
        env.api::<PostgresCluster>()
            .get_opt("db-shard-0")
            .await
            .unwrap()
            .is_some(),
        "a target shard that existed before the job stays"
    );

    // A target whose CA is not the sharded cluster's (a shard cluster of another sharded
    // cluster, say) cannot verify the source: its subscription is refused by verify-full, the
    // job retries in CatchUp saying why, and deleting it rolls everything back.
    let foreign_ca = testbed::pg_tls::TestCa::new("another CA").unwrap();
    let foreign = split_bed::start_shard(
        &env.namespace,
        3,
        &foreign_ca,
        &[("client_connection_check_interval", "100ms")],
    );
    env.api::<PostgresCluster>()
        .create(
            &PostParams::default(),
            &controllers::sharded_cluster::builders::child_cluster(&parent, 3),
        )
        .await
        .unwrap();
    split_bed::superuser_secret(&env.client, &env.namespace, "db-shard-3-superuser").await;
    split_bed::ca_secret(&env.client, &env.namespace, "db-shard-3", &foreign_ca).await;
    primary_pod(&env.client, &env.namespace, "db-shard-3", foreign.port()).await;
    create_job(&env, job("foreign", "db-customers-1", "shard-3", None)).await;
    let refused = job_where(&env, "foreign", "foreign's subscription refused", |j| {
        step(j) == Some(SplitStep::CatchUp)
            && condition_message(j).contains("certificate verify failed")
    })
    .await;
    println!("foreign CA: {}", condition_message(&refused));
    assert_eq!(
        scalar(&foreign, "SELECT count(*) FROM pg_subscription").await,
        0,
        "no subscription that does not verify its source"
    );
    env.api::<ShardSplitJob>()
        .delete("foreign", &DeleteParams::default())
        .await
        .unwrap();
    env.eventually("the foreign job is gone", || async {
        env.api::<ShardSplitJob>()
            .get_opt("foreign")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        rows(&foreign, "orders").await.len(),
        0,
        "copied rows removed"
    );
    assert_eq!(
        scalar(&shards[1], "SELECT count(*) FROM pg_replication_slots").await,
        0
    );

    // (a) + (c): split db-customers-0 onto a new shard-2 under a steady write load, with the
    // operator killed in each of the seven steps (while the step is at work, held there by a
    // lock the step needs) and a fresh one started each time.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let api = env.api::<ShardRange>();
        let stop = stop.clone();
        let urls = urls.clone();
        tokio::spawn(async move { write_load(api, urls, stop, 1000).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (source, target) = (&shards[0], &shards[2]);
    let mut killed_in = Vec::new();

    // 1. Plan: the source's orders locked, so measuring the tables waits.
    let hold = lock(source, "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").await;
    let split = create_job(&env, job("split", "db-customers-0", "shard-2", None)).await;
    killed_in.push(kill_when_waiting(&env, &mut operator, source, None).await);
    hold.batch_execute("ROLLBACK").await.unwrap();
    operator = Operator::start(&env.client, &env.namespace);

    // 2. ProvisionTarget: the new shard's cluster appears with a copy of the superuser Secret;
    // the operator waits for its primary, which the test plays after the kill.
    let hold = block_copy(target, &split).await;
    env.object::<PostgresCluster>("db-shard-2").await;
    let target_secret: Secret = env.object("db-shard-2-superuser").await;
    assert_eq!(
        target_secret.data.unwrap()["password"].0,
        PASSWORD.as_bytes()
    );
    job_where(&env, "split", "split waiting for its new shard", |j| {
        step(j) == Some(SplitStep::ProvisionTarget)
            && condition_message(j).contains("no primary yet")
    })
    .await;
    operator.kill().await;
    killed_in.push(SplitStep::ProvisionTarget);
    primary_pod(&env.client, &env.namespace, "db-shard-2", shards[2].port()).await;
    operator = Operator::start(&env.client, &env.namespace);

    // 3. CopySnapshot: the target's barrier table locked where the copy first writes it.
    killed_in
        .push(kill_when_waiting(&env, &mut operator, target, Some(SplitStep::CopySnapshot)).await);
    hold.batch_execute("ROLLBACK").await.unwrap();
    let barrier = controllers::shard_split::plan::barrier_table(&split.uid().unwrap());
    let hold = lock(target, &format!("SELECT * FROM {barrier} FOR UPDATE")).await;
    operator = Operator::start(&env.client, &env.namespace);

    // 4. CatchUp: the target's barrier row locked, so the apply never confirms a barrier.
    job_where(&env, "split", "split catching up", |j| {
        step(j) == Some(SplitStep::CatchUp) && condition_message(j).contains("behind")
    })
    .await;
    operator.kill().await;
    killed_in.push(SplitStep::CatchUp);
    // The subscription verifies the source as libpq's verify-full does: the source's `-rw`
    // name, the target's own CA file (the sharded cluster's CA), the pod IP as `hostaddr`; and
    // its walsender on the source runs over TLS.
    let conninfo: String = target
        .client()
        .await
        .unwrap()
        .query_one("SELECT subconninfo FROM pg_subscription", &[])
        .await
        .unwrap()
        .get(0);
    let ca_file: String = target
        .client()
        .await
        .unwrap()
        .query_one("SELECT current_setting('ssl_ca_file')", &[])
        .await
        .unwrap()
        .get(0);
    for expected in [
        "sslmode=verify-full".to_string(),
        format!("host='db-shard-0-rw.{}.svc'", env.namespace),
        "hostaddr='127.0.0.1'".to_string(),
        format!("sslrootcert='{ca_file}'"),
    ] {
        assert!(
            conninfo.contains(&expected),
            "{expected} in the subscription's conninfo"
        );
    }
    env.eventually("the subscription's walsender on TLS", || async {
        let ssl: bool = source
            .client()
            .await
            .ok()?
            .query_one(
                "SELECT coalesce(bool_and(s.ssl), false) AND count(*) > 0
                   FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                  WHERE a.backend_type = 'walsender'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        ssl.then_some(())
    })
    .await;
    // Held for the clean-up: dropping the target's barrier waits for this reader.
    let clean_up_hold = lock(target, &format!("SELECT count(*) FROM {barrier}")).await;
    // 5. Verify: the source's orders locked, so the fence of its freeze waits (the range
    // paused meanwhile).
    let verify_hold = lock(source, "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").await;
    hold.batch_execute("ROLLBACK").await.unwrap();
    operator = Operator::start(&env.client, &env.namespace);
    killed_in.push(kill_when_waiting(&env, &mut operator, source, Some(SplitStep::Verify)).await);
    assert_eq!(moving_state(&env).await, ShardRangeState::WritePaused);

    // 6. CutOver: an event trigger on the source makes the cut-over's fence (its message
    // names the target, the verification's does not) wait for an advisory lock the test holds.
    let cut_over_hold = shards[0].client().await.unwrap();
    cut_over_hold
        .batch_execute(
            "SELECT pg_advisory_lock(4242);
             CREATE FUNCTION hold_cut_over() RETURNS event_trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF current_query() LIKE '%moved to shard-2%' THEN
                 PERFORM pg_advisory_xact_lock(4242);
               END IF;
             END $$;
             CREATE EVENT TRIGGER hold_cut_over ON ddl_command_start
               WHEN TAG IN ('CREATE FUNCTION') EXECUTE FUNCTION hold_cut_over()",
        )
        .await
        .unwrap();
    verify_hold.batch_execute("ROLLBACK").await.unwrap();
    operator = Operator::start(&env.client, &env.namespace);
    killed_in.push(kill_when_waiting(&env, &mut operator, source, Some(SplitStep::CutOver)).await);
    assert_eq!(
        moving_state(&env).await,
        ShardRangeState::WritePaused,
        "killed during the cut-over's pause"
    );
    cut_over_hold
        .batch_execute(
            "DROP EVENT TRIGGER hold_cut_over; DROP FUNCTION hold_cut_over();
             SELECT pg_advisory_unlock(4242)",
        )
        .await
        .unwrap();
    operator = Operator::start(&env.client, &env.namespace);

    // 7. CleanUp: waits for the reader of the target's barrier.
    killed_in.push(kill_when_waiting(&env, &mut operator, target, Some(SplitStep::CleanUp)).await);
    clean_up_hold.batch_execute("ROLLBACK").await.unwrap();
    operator = Operator::start(&env.client, &env.namespace);
    assert_eq!(
        killed_in,
        vec![
            SplitStep::Plan,
            SplitStep::ProvisionTarget,
            SplitStep::CopySnapshot,
            SplitStep::CatchUp,
            SplitStep::Verify,
            SplitStep::CutOver,
            SplitStep::CleanUp
        ]
    );
    let done = job_where(&env, "split", "split succeeded", |j| {
        matches!(phase(j), Some("Succeeded" | "RolledBack" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(&done),
        Some("Succeeded"),
        "{}",
        condition_message(&done)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, refused) = load.await.unwrap();
    let status = done.status.clone().unwrap();
    let pause = status.write_pause_millis.expect("writePauseMillis");
    println!(
        "split: rowsCopied={:?} writePauseMillis={pause} acknowledged={} refused_by_fence={refused}",
        status.rows_copied,
        acknowledged.len()
    );
    assert!(status.rows_copied.unwrap_or(0) > 0, "{status:?}");
    assert!(
        acknowledged.len() > 20,
        "the load ran: {}",
        acknowledged.len()
    );

    // Every acknowledged row (and every seed row) exists exactly once, on the shard its
    // range names now.
    let layout = ranges(&env).await;
    let moving = layout
        .iter()
        .find(|r| r.name_any() == "split-moving")
        .unwrap();
    assert_eq!(
        (
            moving.spec.shard.as_str(),
            moving.spec.state,
            moving.spec.epoch
        ),
        ("shard-2", ShardRangeState::Active, 1)
    );
    let source = layout
        .iter()
        .find(|r| r.name_any() == "db-customers-0")
        .unwrap();
    assert_eq!(source.spec.end, moving.spec.start);
    let mut expected: BTreeSet<(i64, i64)> = acknowledged.iter().copied().collect();
    expected.extend((0..97).map(|key| (key, 0)));
    for table in ["orders", "payments"] {
        let mut seen: BTreeMap<(i64, i64), Vec<String>> = BTreeMap::new();
        for (index, shard) in shards.iter().enumerate() {
            for row in rows(shard, table).await {
                seen.entry(row).or_default().push(format!("shard-{index}"));
            }
        }
        assert_eq!(
            seen.keys().copied().collect::<BTreeSet<_>>(),
            expected,
            "{table}: rows lost or invented"
        );
        for ((key, id), places) in &seen {
            assert_eq!(
                places,
                &vec![shard_of(&layout, *key)],
                "{table} row ({key}, {id}) is not once on its range's shard"
            );
        }
    }
    // The source keeps the fence: a stale write to the moved range is refused with 40001.
    let moved_key = (0..97)
        .find(|k| shard_of(&layout, *k) == "shard-2")
        .unwrap();
    let stale = shards[0]
        .client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO orders VALUES ({moved_key}, -1, 'stale')"
        ))
        .await
        .unwrap_err();
    assert_eq!(
        stale.code(),
        Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
    );
    assert!(
        format!("{stale:?}").contains("moved to shard-2 (routing epoch 1)"),
        "{stale:?}"
    );
    assert_eq!(
        scalar(&shards[0], "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(
        scalar(&shards[2], "SELECT count(*) FROM pg_subscription").await,
        0
    );
    operator.kill().await;
}
