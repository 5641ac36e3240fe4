//! A replica cluster (`REPLICA_CLUSTER`, from `spec.replica.enabled`) on real PostgreSQL 18, a
//! real S3 server (moto) and a real kube-apiserver: restored from another cluster's backup, its
//! designated primary keeps replaying that cluster's WAL archive (read-only) and its replica
//! streams from it; when the designated primary dies, the replica takes the role over without
//! promoting PostgreSQL, and goes on following the source.

mod support;

use std::sync::Arc;
use std::time::Duration;

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
    insert(&client, 31, 40).await;
    switch_and_wait_archived(&main, source).await.unwrap();
    eventually(
        "step 5: the new designated primary replays main's archive, still in recovery",
        Duration::from_secs(90),
        || async { follows_to(&dr, replica, 40).await },
    )
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", dr.logs()));
}
