//! Switchover and failover under load through a real PgBouncer configured by the Pooler
//! reconciler's pgbouncer.ini: the instance managers PAUSE the cluster's Poolers before the
//! primary stops and RESUME them once the rw Service reaches the new writable primary, so a loop
//! of short transactions sees no error at a switchover; after a kill -9 of the primary the
//! clients' errors are counted and the pooler ends on the new primary.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::contract;
use support::TestCluster;
use support::pooler::{APP_PASSWORD, AUTH_PASSWORD, Load, PoolerBed, pooled_server, set_phase};
use testbed::ApiServer;

const CLUSTER: &str = "pw";

fn logs(cluster: &TestCluster, bed: &PoolerBed) -> String {
    format!("{}\n===== pgbouncer =====\n{}", cluster.logs(), bed.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_through_the_pooler_has_no_client_errors_and_failover_ends_on_the_new_primary() {
    let api = Arc::new(ApiServer::start().await.unwrap());
    let (mut bed, env) = PoolerBed::prepare(&api, CLUSTER, 15).await.unwrap();
    let mut cluster = TestCluster::start_with(api.clone(), CLUSTER, 2, 0, env)
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, Duration::from_secs(90))
        .await
        .unwrap();
    bed.start(&cluster, primary).await.unwrap();

    // Switchover under load.
    let load = Load::start(bed.port());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = cluster.instances[primary].name.clone();
    let replica = 1 - primary;
    cluster
        .annotate_lease(
            contract::ANNOTATION_SWITCHOVER_TO,
            &cluster.instances[replica].name,
        )
        .await
        .unwrap();
    let new_primary = cluster
        .wait_for_new_primary(&old, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(new_primary, replica);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let switchover = load.finish().await.unwrap();
    println!(
        "switchover_client_errors={} switchover_client_max_wait_ms={} committed={}",
        switchover.errors,
        switchover.max_wait.as_millis(),
        switchover.committed
    );
    assert_eq!(
        switchover.errors,
        0,
        "first error: {:?}\n{}",
        switchover.first_error,
        logs(&cluster, &bed)
    );
    assert!(
        cluster.instances[primary].log().contains("pooler paused"),
        "{}",
        logs(&cluster, &bed)
    );
    assert_eq!(
        pooled_server(bed.port()).await.unwrap(),
        (cluster.instances[new_primary].pg_port, true)
    );
    cluster
        .wait_for_role(primary, contract::role::REPLICA, Duration::from_secs(60))
        .await
        .unwrap();

    // Failover: kill -9 of the primary (PostgreSQL and its instance manager); the kubelet would
    // mark the pod not ready, which takes it out of the rw Service.
    let load = Load::start(bed.port());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = cluster.instances[new_primary].name.clone();
    let killed_at = Instant::now();
    cluster.kill_instance(new_primary);
    set_phase(&cluster, new_primary, "Failed").await.unwrap();
    let survivor = cluster
        .wait_for_new_primary(&killed, Duration::from_secs(60))
        .await
        .unwrap();
    let promoted_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failover = load.finish().await.unwrap();
    println!(
        "failover_client_errors={} failover_client_max_wait_ms={} failover_promoted_after_ms={} first_error={:?}",
        failover.errors,
        failover.max_wait.as_millis(),
        promoted_after.as_millis(),
        failover.first_error
    );
    assert_eq!(
        pooled_server(bed.port()).await.unwrap(),
        (cluster.instances[survivor].pg_port, true),
        "{}",
        logs(&cluster, &bed)
    );
    assert!(failover.committed > 0);
    // No password in any log (instance managers, PostgreSQL, PgBouncer).
    let all = logs(&cluster, &bed);
    for secret in [AUTH_PASSWORD, APP_PASSWORD, support::SUPERUSER_PASSWORD] {
        assert!(!all.contains(secret), "a password reached a log");
    }
}
