//! A replica cluster (`REPLICA_CLUSTER`, from `spec.replica.enabled`) on real PostgreSQL 18, a
//! real S3 server (moto) and a real kube-apiserver: restored from another cluster's backup, its
//! designated primary keeps replaying that cluster's WAL archive (read-only) and its replica
//! streams from it; when the designated primary dies, the replica takes the role over without
//! promoting PostgreSQL, and goes on following the source. The designated primary says how far
//! behind the source's archive it is (caught up, or paused with segments waiting).

mod support;

use std::sync::Arc;
use std::time::Duration;

use instance::backup::source_lag::SourceArchiveLag;
use support::backup::*;
use support::{TestCluster, eventually};
use testbed::ApiServer;
use testbed::object_store::S3Server;

/// Whether instance `index` of `cluster` has exactly the rows `1..=last` and is in recovery.
async fn follows_to(cluster: &TestCluster, index: usize, last: i32) -> bool {
    let Ok(client) = cluster.connect(index).await else {
        return false;
    };
    let Ok(row) = client
        .query_one(
            "SELECT pg_is_in_recovery(), count(*), max(id) FROM items",
            &[],
        )
        .await
    else {
        return false;
    };
    row.get::<_, bool>(0)
        && row.get::<_, i64>(1) == i64::from(last)
        && row.get::<_, Option<i32>>(2) == Some(last)
}

/// Waits until the designated primary `index` of `cluster` publishes a distance to its source's
/// archive that `check` accepts (for source `main`), and returns it.
async fn source_lag_is(
    cluster: &TestCluster,
    index: usize,
    what: &str,
    check: impl Fn(&SourceArchiveLag) -> bool,
) -> SourceArchiveLag {
    let found = eventually(what, Duration::from_secs(90), || async {
        cluster
            .status(index)
            .await
            .and_then(|status| status.source_archive)
            .is_some_and(|lag| lag.source == "main" && check(&lag))
    })
    .await;
    let last = cluster
        .status(index)
        .await
        .and_then(|status| status.source_archive);
    if let Err(error) = found {
        panic!("{error}: {last:?}\n{}", cluster.logs());
    }
    last.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cluster_follows_the_sources_archive_and_a_failover_inside_it_does_not_promote() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let main = TestCluster::start_with(
        api.clone(),
        "main",
        1,
        0,
        backup_env(&store, BUCKET, "main", None),
    )
    .await
    .unwrap();
    let source = main
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .expect("step 1: the source's primary");
    let client = main.connect(source).await.unwrap();
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY)")
        .await
        .unwrap();
    insert(&client, 1, 10).await;
    let run = base_backup(&main, source, "base").await.unwrap();
    assert_eq!(run["phase"], "Completed", "{run}\n{}", main.logs());
    insert(&client, 11, 20).await;
    switch_and_wait_archived(&main, source).await.unwrap();

    // The replica cluster: restored, then following main's archive, with its own repository.
    let mut env = backup_env(
        &store,
        BUCKET,
        "dr",
        Some(recovery_spec(&store, "main", "main", None)),
    );
    env.push(("REPLICA_CLUSTER".into(), "true".into()));
    env.push(("SOURCE_ARCHIVE_CHECK_SECONDS".into(), "1".into()));
    let mut dr = TestCluster::start_with(api.clone(), "dr", 2, 0, env)
        .await
        .unwrap();
    let designated = eventually(
        "step 2: dr's designated primary holds the Lease with main's rows, in recovery",
        STARTUP,
        || async {
            match dr.lease_holder().await {
                Ok(Some(holder)) => follows_to(&dr, dr.index_of(&holder), 20).await,
                _ => false,
            }
        },
    )
    .await;
    designated.unwrap_or_else(|error| panic!("{error}\n{}", dr.logs()));
    let primary = dr.index_of(&dr.lease_holder().await.unwrap().unwrap());
    let replica = 1 - primary;
    // Its status says primary, restored, in recovery (once its loop has read PostgreSQL).
    let reported = eventually(
        "step 2: the designated primary's status",
        Duration::from_secs(30),
        || async {
            dr.status(primary).await.is_some_and(|status| {
                status.role == api::contract::role::PRIMARY
                    && status.last_join.as_deref() == Some("restore")
                    && status.in_recovery == Some(true)
            })
        },
    )
    .await;
    if let Err(error) = reported {
        panic!("{error}: {:?}", dr.status(primary).await);
    }
    dr.wait_for_role(replica, api::contract::role::REPLICA, STARTUP)
        .await
        .unwrap_or_else(|error| panic!("step 2: the replica streams: {error}\n{}", dr.logs()));
    let refused = dr
        .connect(primary)
        .await
        .unwrap()
        .batch_execute("INSERT INTO items VALUES (1000)")
        .await
        .expect_err("step 2: the designated primary accepts no writes");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused}"
    );

    // What main archives reaches both of dr's instances.
    insert(&client, 21, 30).await;
    switch_and_wait_archived(&main, source).await.unwrap();
    eventually(
        "step 3: main's new rows on dr's designated primary and its replica",
        Duration::from_secs(90),
        || async { follows_to(&dr, primary, 30).await && follows_to(&dr, replica, 30).await },
    )
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", dr.logs()));

    // How far behind main's archive dr is: nothing once it replayed all, then, with replay
    // paused on the designated primary, the segments main archived since, ageing.
    source_lag_is(
        &dr,
        primary,
        "step 3: caught up with main's archive",
        |lag| lag.segments == 0 && lag.bytes == 0 && lag.seconds == 0.0,
    )
    .await;
    assert_eq!(
        dr.status(replica)
            .await
            .and_then(|status| status.source_archive),
        None,
        "only the designated primary measures"
    );
    let designated = dr.connect(primary).await.unwrap();
    designated
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    insert(&client, 31, 35).await;
    switch_and_wait_archived(&main, source).await.unwrap();
    insert(&client, 36, 40).await;
    switch_and_wait_archived(&main, source).await.unwrap();
    let behind = source_lag_is(
        &dr,
        primary,
        "step 3b: two of main's segments waiting, the oldest for a second or more",
        |lag| {
            lag.segments >= 2
                && lag.bytes > 16 * 1024 * 1024
                && lag.seconds >= 1.0
                && lag.error.is_none()
        },
    )
    .await;
    // The same figures on /metrics, labelled with the source (the replay is still paused).
    let (_, metrics) = dr.http_get(primary, "/metrics").await.unwrap();
    let segments = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("pg_instance_source_archive_lag_segments{source=\"main\"} ")
        })
        .and_then(|value| value.parse::<u64>().ok());
    assert!(
        segments.is_some_and(|segments| segments >= behind.segments.min(2)),
        "{behind:?}\n{metrics}"
    );
    assert!(
        metrics.contains("pg_instance_source_archive_check_failing{source=\"main\"} 0"),
        "{metrics}"
    );
    designated
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    source_lag_is(
        &dr,
        primary,
        "step 3c: caught up again once replay resumed",
        |lag| lag.segments == 0 && lag.bytes == 0,
    )
    .await;
    eventually(
        "step 3c: main's rows 31-40 on dr",
        Duration::from_secs(90),
        || async { follows_to(&dr, primary, 40).await },
    )
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", dr.logs()));

    // The designated primary dies: the replica takes the Lease, stays a standby, and follows
    // main's archive on its own.
    let old = dr.instances[primary].name.clone();
    dr.kill_instance(primary);
    eventually(
        "step 4: the replica holds the Lease as the new designated primary",
        Duration::from_secs(90),
        || async {
            matches!(dr.lease_holder().await, Ok(Some(holder)) if holder != old)
                && dr
                    .status(replica)
                    .await
                    .is_some_and(|status| status.role == api::contract::role::PRIMARY)
        },
    )
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", dr.logs()));
    insert(&client, 41, 50).await;
    switch_and_wait_archived(&main, source).await.unwrap();
    eventually(
        "step 5: the new designated primary replays main's archive, still in recovery",
        Duration::from_secs(90),
        || async { follows_to(&dr, replica, 50).await },
    )
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", dr.logs()));
}
