//! High availability on real PostgreSQL 18 and a real kube-apiserver: each instance is a
//! `pg-instance` process on loopback (see `support`).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use api::contract;
use support::ha::{FAILOVER, STARTUP, count_present, replicated, started};
use support::{TestCluster, eventually};

/// Inserts ids from `first` through `client` with synchronous commit until an insert fails or
/// `stop` is set; counts acknowledgements in `progress`; returns the acknowledged ids.
async fn write_until_failure(
    client: tokio_postgres::Client,
    first: i64,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> Vec<i64> {
    let mut acknowledged = Vec::new();
    let mut id = first;
    while !stop.load(Ordering::SeqCst) {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let insert = client.execute("INSERT INTO acked (id) VALUES ($1)", &params);
        let outcome = tokio::time::timeout(Duration::from_secs(10), insert).await;
        match outcome {
            Ok(Ok(_)) => {
                acknowledged.push(id);
                progress.fetch_add(1, Ordering::SeqCst);
            }
            _ => break,
        }
        id += 1;
    }
    acknowledged
}

/// Waits until `progress` reached `count`.
async fn wait_for_progress(progress: &Arc<AtomicUsize>, count: usize) {
    eventually("the writer got acknowledgements", FAILOVER, || {
        let progress = progress.clone();
        async move { progress.load(Ordering::SeqCst) >= count }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_bootstrap_fail_over_without_losing_commits_and_rejoin_with_rewind() {
    let mut cluster = TestCluster::start("ha", 3, 1).await.unwrap();

    // Bootstrap: one primary (initdb) and two replicas (pg_basebackup) streaming from it.
    let primary = cluster
        .wait_for_primary_with_replicas(2, STARTUP)
        .await
        .unwrap();
    let old_primary = cluster.instances[primary].name.clone();
    for index in 0..3 {
        let role = if index == primary {
            contract::role::PRIMARY
        } else {
            contract::role::REPLICA
        };
        let status = cluster.wait_for_role(index, role, STARTUP).await.unwrap();
        let expected_join = if index == primary {
            "initdb"
        } else {
            "basebackup"
        };
        assert_eq!(status.last_join.as_deref(), Some(expected_join));
        eventually(
            "role label and status annotation on the pod",
            STARTUP,
            || {
                let cluster = &cluster;
                async move {
                    cluster
                        .pod_metadata(index)
                        .await
                        .is_ok_and(|(labels, annotations)| {
                            labels.get(contract::LABEL_ROLE).map(String::as_str) == Some(role)
                                && annotations.contains_key(contract::ANNOTATION_INSTANCE_STATUS)
                        })
                }
            },
        )
        .await
        .unwrap();
    }
    let primary_client = cluster.connect(primary).await.unwrap();
    let slots: i64 = primary_client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE active",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 2, "each replica streams through its physical slot");
    let app: i64 = primary_client
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('app', 'streaming_replica')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, 2, "roles from the Secrets exist");
    eventually("synchronous replication is on", STARTUP, || {
        let client = &primary_client;
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'",
                    &[],
                )
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 2)
        }
    })
    .await
    .unwrap();
    primary_client
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();

    // HTTP endpoints of the primary and of a replica.
    let replica = (0..3).find(|index| *index != primary).unwrap();
    assert_eq!(cluster.http_get(primary, "/healthz").await.unwrap().0, 200);
    assert_eq!(cluster.http_get(primary, "/readyz").await.unwrap().0, 200);
    let (code, metrics) = cluster.http_get(replica, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("pg_instance_up 1"), "{metrics}");
    assert!(
        metrics.contains("pg_instance_role{role=\"replica\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pg_instance_replication_lag_bytes"),
        "{metrics}"
    );
    let status = cluster.status(replica).await.unwrap();
    assert_eq!(status.in_recovery, Some(true));
    assert!(status.received_lsn.is_some() && status.timeline == Some(1));

    // A writer runs synchronous commits; kill -9 of the primary's postgres and pg-instance.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_until_failure(
        cluster.connect(primary).await.unwrap(),
        1,
        stop.clone(),
        progress.clone(),
    ));
    wait_for_progress(&progress, 20).await;
    cluster.kill_instance(primary);
    let acknowledged = writer.await.unwrap();
    assert!(acknowledged.len() >= 20);

    // A replica becomes a writable primary that holds every acknowledged row.
    let new_primary = cluster
        .wait_for_new_primary(&old_primary, FAILOVER)
        .await
        .unwrap();
    assert_ne!(new_primary, primary);
    assert_eq!(
        count_present(&cluster, new_primary, &acknowledged)
            .await
            .unwrap(),
        acknowledged.len() as i64,
        "every acknowledged synchronous commit survives the failover"
    );
    let status = cluster
        .wait_for_role(new_primary, contract::role::PRIMARY, FAILOVER)
        .await
        .unwrap();
    assert_eq!(status.timeline, Some(2));

    // The old primary comes back, rewinds, and replicates new writes.
    cluster.start_instance(primary).unwrap();
    let status = cluster
        .wait_for_role(primary, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
    assert_eq!(
        status.last_join.as_deref(),
        Some("rewind"),
        "{}",
        cluster.logs()
    );
    assert!(cluster.instances[primary].log().contains("pg_rewind done"));
    let client = cluster.connect(new_primary).await.unwrap();
    replicated(
        &cluster,
        &client,
        primary,
        -1,
        "the rejoined instance replicates new writes",
    )
    .await;
    assert_eq!(
        count_present(&cluster, primary, &acknowledged)
            .await
            .unwrap(),
        acknowledged.len() as i64
    );
    // A replica promoted behind the instance manager's back (split brain in the making) is
    // stopped at once, rewound and made a replica again.
    let rogue = (0..3)
        .find(|index| *index != primary && *index != new_primary)
        .unwrap();
    let rogue_client = cluster.connect(rogue).await.unwrap();
    // The instance manager may stop the server before pg_promote even returns.
    let _ = rogue_client
        .query_one("SELECT pg_promote(true, 30)", &[])
        .await;
    eventually(
        "the rogue primary is rewound into a replica",
        FAILOVER,
        || {
            let cluster = &cluster;
            async move {
                cluster.status(rogue).await.is_some_and(|status| {
                    status.role == contract::role::REPLICA
                        && status.in_recovery == Some(true)
                        && status.streaming
                        && status.last_join.as_deref() == Some("rewind")
                })
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        cluster.lease_holder().await.unwrap().as_deref(),
        Some(cluster.instances[new_primary].name.as_str())
    );
    replicated(
        &cluster,
        &client,
        rogue,
        -2,
        "the rewound replica replicates new writes",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_to_a_named_replica_keeps_every_write_and_fencing_stops_an_instance() {
    let (cluster, primary, old_primary) =
        started("so", 3, 1, "CREATE TABLE acked (id bigint PRIMARY KEY)").await;
    let target = (0..3).find(|index| *index != primary).unwrap();
    let target_name = cluster.instances[target].name.clone();

    // Supervision: a crashed postgres is restarted by its instance manager, still primary.
    let postmaster = cluster.instances[primary].postmaster_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("postgres restarted after a crash", FAILOVER, || {
        let cluster = &cluster;
        async move {
            cluster.status(primary).await.is_some_and(|status| {
                status.postgres_restarts >= 1
                    && status.postgres_ready
                    && status.role == contract::role::PRIMARY
            })
        }
    })
    .await
    .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(2, FAILOVER)
        .await
        .unwrap();
    assert_eq!(cluster.instances[primary].name, old_primary);

    // Writes before the switchover, then the operator's request on the Lease.
    let stop_first = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let first_writer = tokio::spawn(write_until_failure(
        cluster.connect(primary).await.unwrap(),
        1,
        stop_first.clone(),
        progress.clone(),
    ));
    wait_for_progress(&progress, 20).await;
    stop_first.store(true, Ordering::SeqCst);
    let acknowledged = first_writer.await.unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_until_failure(
        cluster.connect(primary).await.unwrap(),
        1_000_000,
        Arc::new(AtomicBool::new(false)),
        progress.clone(),
    ));
    wait_for_progress(&progress, 5).await;
    cluster
        .annotate_lease(contract::ANNOTATION_SWITCHOVER_TO, &target_name)
        .await
        .unwrap();
    let new_primary = cluster
        .wait_for_new_primary(&old_primary, FAILOVER)
        .await
        .unwrap();
    assert_eq!(new_primary, target, "the named replica is promoted");
    let during = writer.await.unwrap();
    let all: Vec<i64> = acknowledged.iter().chain(during.iter()).copied().collect();
    assert_eq!(
        count_present(&cluster, target, &all).await.unwrap(),
        all.len() as i64,
        "every acknowledged write survives the switchover"
    );
    let status = cluster
        .wait_for_role(primary, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
    assert_eq!(status.last_join.as_deref(), Some("switchover"));
    cluster
        .connect(target)
        .await
        .unwrap()
        .execute("INSERT INTO acked (id) VALUES (-1)", &[])
        .await
        .unwrap();
    eventually(
        "the old primary replicates from the new one",
        FAILOVER,
        || {
            let cluster = &cluster;
            async move {
                count_present(cluster, primary, &[-1])
                    .await
                    .is_ok_and(|n| n == 1)
            }
        },
    )
    .await
    .unwrap();

    // Fencing by annotation: the fenced replica stops and stays stopped until the annotation goes.
    let fenced = (0..3).find(|index| *index != target).unwrap();
    cluster
        .annotate_pod(fenced, contract::ANNOTATION_FENCED, Some("true"))
        .await
        .unwrap();
    cluster
        .wait_for_role(fenced, contract::role::FENCED, FAILOVER)
        .await
        .unwrap();
    eventually("the fenced instance refuses connections", FAILOVER, || {
        let cluster = &cluster;
        async move { cluster.connect(fenced).await.is_err() }
    })
    .await
    .unwrap();
    // Longer than a Lease duration: still down, and the label says so.
    tokio::time::sleep(Duration::from_secs(support::LEASE_DURATION_SECONDS * 2)).await;
    assert!(
        cluster.connect(fenced).await.is_err(),
        "a fenced instance stays down"
    );
    let status = cluster.status(fenced).await.unwrap();
    assert!(status.fenced && !status.postgres_ready);
    let (labels, _) = cluster.pod_metadata(fenced).await.unwrap();
    assert_eq!(
        labels.get(contract::LABEL_ROLE).map(String::as_str),
        Some(contract::role::FENCED)
    );
    assert_eq!(cluster.http_get(fenced, "/readyz").await.unwrap().0, 503);
    assert_eq!(
        cluster.lease_holder().await.unwrap().as_deref(),
        Some(target_name.as_str())
    );

    cluster
        .annotate_pod(fenced, contract::ANNOTATION_FENCED, None)
        .await
        .unwrap();
    cluster
        .wait_for_role(fenced, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
    assert_eq!(count_present(&cluster, fenced, &[-1]).await.unwrap(), 1);

    // A restart request (rolling update): PostgreSQL restarts and the token is echoed.
    let before = cluster.instances[fenced].postmaster_pid();
    cluster
        .annotate_pod(fenced, contract::ANNOTATION_RESTART, Some("token-1"))
        .await
        .unwrap();
    eventually(
        "the restart token is echoed in the status",
        FAILOVER,
        || {
            let cluster = &cluster;
            async move {
                cluster.status(fenced).await.is_some_and(|status| {
                    status.restart_token.as_deref() == Some("token-1") && status.postgres_ready
                })
            }
        },
    )
    .await
    .unwrap();
    assert_ne!(
        cluster.instances[fenced].postmaster_pid(),
        before,
        "PostgreSQL restarted"
    );
    cluster
        .wait_for_role(fenced, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
}

/// A switchover whose Lease write the API server applies but whose answer never arrives (a
/// reset connection): the old primary must not start again as a primary while the target
/// promotes; it reads the Lease back and follows the target, as after any switchover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_whose_lease_answer_is_lost_never_restarts_the_old_primary_as_primary() {
    let api = Arc::new(testbed::ApiServer::start().await.unwrap());
    let fault = vec![(
        "PG_INSTANCE_FAULT".to_string(),
        "lose_handover_answer".to_string(),
    )];
    let cluster = TestCluster::start_with(api, "lost", 2, 1, fault)
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    let old_primary = cluster.instances[primary].name.clone();
    let target = 1 - primary;
    let before = cluster.status(primary).await.unwrap();
    cluster
        .annotate_lease(
            contract::ANNOTATION_SWITCHOVER_TO,
            &cluster.instances[target].name,
        )
        .await
        .unwrap();
    let new_primary = cluster
        .wait_for_new_primary(&old_primary, FAILOVER)
        .await
        .unwrap();
    assert_eq!(new_primary, target);
    let status = cluster
        .wait_for_role(primary, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
    // Restarted as primary first, it would have been stopped hard and rewound.
    assert_eq!(
        status.last_join.as_deref(),
        Some("switchover"),
        "{status:?}\n{}",
        cluster.logs()
    );
    assert_eq!(
        status.postgres_restarts, before.postgres_restarts,
        "{status:?}"
    );
    assert!(
        cluster.instances[primary]
            .log()
            .contains("the Lease hand-over was applied although its answer was lost"),
        "the fault was injected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_pair_fails_over_to_its_replica() {
    let mut cluster = TestCluster::start("async", 2, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    let old_primary = cluster.instances[primary].name.clone();
    let client = cluster.connect(primary).await.unwrap();
    let names: String = client
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "", "asynchronous replication");
    client
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY); INSERT INTO acked VALUES (1)")
        .await
        .unwrap();
    let replica = 1 - primary;
    eventually("the row reached the replica", FAILOVER, || {
        let cluster = &cluster;
        async move {
            count_present(cluster, replica, &[1])
                .await
                .is_ok_and(|n| n == 1)
        }
    })
    .await
    .unwrap();

    cluster.kill_instance(primary);
    let new_primary = cluster
        .wait_for_new_primary(&old_primary, FAILOVER)
        .await
        .unwrap();
    assert_eq!(new_primary, replica);
    assert_eq!(count_present(&cluster, replica, &[1]).await.unwrap(), 1);

    cluster.start_instance(primary).unwrap();
    cluster
        .wait_for_role(primary, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();

    // A graceful stop (SIGTERM, as a pod deletion) of the primary: its replica takes over and
    // holds every row written before.
    let client = cluster.connect(replica).await.unwrap();
    client
        .execute("INSERT INTO acked (id) VALUES (2)", &[])
        .await
        .unwrap();
    let stopped = cluster.instances[replica].name.clone();
    cluster.stop_instance(replica);
    let newest = cluster
        .wait_for_new_primary(&stopped, FAILOVER)
        .await
        .unwrap();
    assert_eq!(newest, primary);
    assert_eq!(count_present(&cluster, primary, &[1, 2]).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_included_configuration_is_reloaded_without_a_restart() {
    let cluster = TestCluster::start_with_args("reload", 1, 0, &["--app-database=shop"])
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    let client = cluster.connect(primary).await.unwrap();
    // bootstrap.initdb.database names the application database, owned by the app Secret's user.
    eventually("the application database exists", STARTUP, || {
        let client = &client;
        async move {
            client
                .query_opt(
                    "SELECT 1 FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = 'shop' AND r.rolname = 'app'",
                    &[],
                )
                .await
                .is_ok_and(|row| row.is_some())
        }
    })
    .await
    .unwrap();
    let started: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);

    // The operator rewrites its ConfigMap; the kubelet swaps the mounted file.
    std::fs::write(
        cluster.instances[primary].included_config(),
        "work_mem = '7MB'\n",
    )
    .unwrap();
    eventually("work_mem reloaded to 7MB", FAILOVER, || {
        let client = &client;
        async move {
            client
                .query_one("SHOW work_mem", &[])
                .await
                .is_ok_and(|row| row.get::<_, String>(0) == "7MB")
        }
    })
    .await
    .unwrap();
    let still: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(started, still, "a reload, not a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_postgres_cannot_restart_releases_its_lease_at_once() {
    let (cluster, primary, old_primary) =
        started("crash", 3, 1, "CREATE TABLE acked (id bigint PRIMARY KEY)").await;
    eventually("both replicas are synchronous standbys", STARTUP, || {
        let cluster = &cluster;
        async move {
            cluster.status(primary).await.is_some_and(|status| {
                status.synchronous_standbys.len() == 2 && status.streaming_replicas.len() == 2
            })
        }
    })
    .await
    .unwrap();

    // A configuration PostgreSQL cannot start with (a reload only logs it), then kill -9 of the
    // postmaster while a writer commits: PostgreSQL dies and cannot come back.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_until_failure(
        cluster.connect(primary).await.unwrap(),
        1,
        stop.clone(),
        progress.clone(),
    ));
    wait_for_progress(&progress, 20).await;
    std::fs::write(
        cluster.instances[primary].included_config(),
        "shared_buffers = 'not a size'\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let postmaster = cluster.instances[primary].postmaster_pid().unwrap();
    let killed_at = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let acknowledged = writer.await.unwrap();

    // Without the release the instance manager would keep renewing the Lease of a dead server.
    let new_primary = cluster
        .wait_for_new_primary(&old_primary, FAILOVER)
        .await
        .unwrap();
    let failover = killed_at.elapsed();
    assert!(
        failover < Duration::from_secs(support::LEASE_DURATION_SECONDS),
        "the Lease was released, not left to expire: {failover:?}\n{}",
        cluster.logs()
    );
    assert_eq!(
        count_present(&cluster, new_primary, &acknowledged)
            .await
            .unwrap(),
        acknowledged.len() as i64,
        "every acknowledged synchronous commit survives"
    );
    let status = cluster.status(primary).await.unwrap();
    assert!(status.fenced, "{status:?}");
    // Why: the restarts that failed, or (once a new primary exists and this one already tries
    // to rejoin it) the start-up that fails again.
    assert!(
        status.last_error.as_deref().is_some_and(|error| {
            error.contains("failed to restart") || error.contains("exited during start-up")
        }),
        "the status says why: {status:?}"
    );

    // Once PostgreSQL can start again the old primary rejoins as a replica.
    std::fs::write(cluster.instances[primary].included_config(), "").unwrap();
    let status = cluster
        .wait_for_role(primary, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
    assert!(
        matches!(status.last_join.as_deref(), Some("rewind" | "reclone")),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_a_primary_whose_pod_comes_back_with_another_ip() {
    let cluster = TestCluster::start("moved", 2, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    let replica = 1 - primary;
    let sender_host = || async {
        let client = cluster.connect(replica).await.ok()?;
        client
            .query_opt(
                "SELECT sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                &[],
            )
            .await
            .ok()?
            .map(|row| row.get::<_, String>(0))
    };
    assert_eq!(sender_host().await.as_deref(), Some("127.0.0.1"));

    // The primary's pod now answers on another address (both are served by the same PostgreSQL
    // here; the replica must re-point primary_conninfo to the one the pod advertises).
    cluster.set_pod_ip(primary, "127.0.0.2").await.unwrap();
    eventually(
        "the replica streams from the new address",
        FAILOVER,
        || async { sender_host().await.as_deref() == Some("127.0.0.2") },
    )
    .await
    .unwrap();
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY); INSERT INTO acked VALUES (1)")
        .await
        .unwrap();
    eventually("the row reached the replica", FAILOVER, || {
        let cluster = &cluster;
        async move {
            count_present(cluster, replica, &[1])
                .await
                .is_ok_and(|n| n == 1)
        }
    })
    .await
    .unwrap();
    assert_eq!(
        cluster.lease_holder().await.unwrap().as_deref(),
        Some(cluster.instances[primary].name.as_str()),
        "no failover: only the address changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_primary_whose_wal_is_gone_reclones_and_says_so() {
    let (mut cluster, primary, old_primary) = started(
        "reclone",
        2,
        0,
        "CREATE TABLE acked (id bigint PRIMARY KEY); INSERT INTO acked VALUES (1)",
    )
    .await;
    let replica = 1 - primary;
    eventually("the row reached the replica", FAILOVER, || {
        let cluster = &cluster;
        async move {
            count_present(cluster, replica, &[1])
                .await
                .is_ok_and(|n| n == 1)
        }
    })
    .await
    .unwrap();
    cluster.kill_instance(primary);
    cluster
        .wait_for_new_primary(&old_primary, FAILOVER)
        .await
        .unwrap();

    // The former primary's WAL is gone: pg_rewind cannot even finish its crash recovery.
    let wal = cluster.instances[primary].pgdata().join("pg_wal");
    for entry in std::fs::read_dir(&wal).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit()) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    cluster.start_instance(primary).unwrap();
    let status = cluster
        .wait_for_role(primary, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
    assert_eq!(status.last_join.as_deref(), Some("reclone"), "{status:?}");
    assert_eq!(count_present(&cluster, primary, &[1]).await.unwrap(), 1);
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let recloned = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|event| {
            event.reason.as_deref() == Some("Recloned")
                && event.regarding.as_ref().and_then(|r| r.name.as_deref())
                    == Some(old_primary.as_str())
        })
        .expect("a Recloned event on the pod");
    assert!(
        recloned
            .note
            .as_deref()
            .is_some_and(|note| note.contains("pg_rewind failed")),
        "{recloned:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_durability_keeps_writing_when_the_standbys_are_gone() {
    let mut cluster = TestCluster::start_with_args(
        "pref",
        2,
        1,
        &[
            "--synchronous-method=first",
            "--synchronous-durability=preferred",
        ],
    )
    .await
    .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    let replica = 1 - primary;
    let client = cluster.connect(primary).await.unwrap();
    let replica_name = cluster.instances[replica].name.replace('-', "_");
    eventually("FIRST 1 over the streaming replica", STARTUP, || {
        let client = &client;
        let expected = format!("FIRST 1 (\"{replica_name}\")");
        async move {
            client
                .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                .await
                .is_ok_and(|row| row.get::<_, String>(0) == expected)
        }
    })
    .await
    .unwrap();
    client
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();

    // The only standby goes away: with durability required commits would wait for it forever.
    cluster.stop_instance(replica);
    let insert = client.execute("INSERT INTO acked (id) VALUES (1)", &[]);
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_secs(20), insert).await,
            Ok(Ok(1))
        ),
        "a commit goes through once the standby is gone\n{}",
        cluster.logs()
    );
    let names: String = client
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "", "asynchronous while no standby streams");
}

/// The run loop keeps one connection to its PostgreSQL across ticks (four a second): a new
/// backend per tick costs a fork and a login each, which on a saturated node took seconds out of
/// ticks whose Lease renewal cannot wait (the watchdog then fenced a healthy primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_loop_keeps_one_connection_to_its_postgres() {
    let cluster = TestCluster::start("keep", 1, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    let client = cluster.connect(primary).await.unwrap();
    let run_loop_backends = || {
        let client = &client;
        async move {
            let rows = client
                .query(
                    "SELECT pid, backend_start::text FROM pg_stat_activity \
                     WHERE application_name = 'pg-instance'",
                    &[],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|row| (row.get::<_, i32>(0), row.get::<_, String>(1)))
                .collect::<Vec<_>>()
        }
    };
    eventually("the run loop's connection is there", STARTUP, || async {
        run_loop_backends().await.len() == 1
    })
    .await
    .unwrap();
    let first = run_loop_backends().await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            run_loop_backends().await,
            first,
            "the run loop opened another backend"
        );
    }
}

/// A bootstrap role statement that waits (ALTER ROLE behind a prepared transaction that holds the
/// role's row, across the restart that makes the roles again) runs beside the run loop: the
/// primary keeps its Lease and its PostgreSQL, its status says what waits, and the roles are made
/// once the lock is gone. Held in the run loop, the statement kept the Lease from being renewed
/// and the status from being published for 10 s (and the watchdog could fence the primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_statement_that_waits_does_not_hold_the_run_loop() {
    let cluster = TestCluster::start("rolewait", 1, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    std::fs::write(
        cluster.instances[primary].included_config(),
        "max_prepared_transactions = 2\n",
    )
    .unwrap();
    cluster
        .annotate_pod(primary, contract::ANNOTATION_RESTART, Some("prepared"))
        .await
        .unwrap();
    eventually("PostgreSQL restarted on request", STARTUP, || async {
        cluster.status(primary).await.is_some_and(|status| {
            status.restart_token.as_deref() == Some("prepared") && status.postgres_ready
        })
    })
    .await
    .unwrap();
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute(
            "BEGIN; ALTER ROLE app CONNECTION LIMIT 50; PREPARE TRANSACTION 'hold-app-role'",
        )
        .await
        .unwrap();
    drop(client);

    let before = cluster.instances[primary].postmaster_pid();
    cluster
        .annotate_pod(primary, contract::ANNOTATION_RESTART, Some("held"))
        .await
        .unwrap();
    eventually("PostgreSQL restarted on request", STARTUP, || async {
        cluster.instances[primary].postmaster_pid() != before
            && cluster.connect(primary).await.is_ok()
    })
    .await
    .unwrap();
    // The manager's ALTER ROLE app waits 10 s (its statement timeout) on the prepared
    // transaction, more than three times the watchdog's window.
    let watcher = cluster.connect(primary).await.unwrap();
    let restarted_at = std::time::Instant::now();
    let mut published_after = None;
    while restarted_at.elapsed() < Duration::from_secs(12) {
        if let Err(error) = watcher.simple_query("SELECT 1").await {
            panic!(
                "PostgreSQL was stopped after {:?}: {error}\n{}",
                restarted_at.elapsed(),
                cluster.logs()
            );
        }
        if published_after.is_none()
            && cluster
                .status(primary)
                .await
                .is_some_and(|status| status.restart_token.as_deref() == Some("held"))
        {
            published_after = Some(restarted_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        published_after.is_some_and(|after| after < Duration::from_secs(3)),
        "the run loop published its status while the statement waited: {published_after:?}"
    );
    eventually(
        "the status says which role statement failed",
        Duration::from_secs(10),
        || async {
            cluster.status(primary).await.is_some_and(|status| {
                status
                    .last_error
                    .as_deref()
                    // query_canceled: the statement timeout, with PostgreSQL's words.
                    .is_some_and(|error| {
                        error.contains("ALTER ROLE app") && error.contains("57014")
                    })
            })
        },
    )
    .await
    .unwrap();
    let status = cluster.status(primary).await.unwrap();
    assert_eq!(status.role, contract::role::PRIMARY, "{status:?}");
    assert!(!status.fenced, "{status:?}");
    assert_eq!(
        cluster.lease_holder().await.unwrap().as_deref(),
        Some(status.pod.as_str())
    );

    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("ROLLBACK PREPARED 'hold-app-role'")
        .await
        .unwrap();
    eventually(
        "the roles are made once the lock is gone",
        STARTUP,
        || async {
            cluster
                .status(primary)
                .await
                .is_some_and(|status| status.last_error.is_none())
        },
    )
    .await
    .unwrap();
}

/// A `pg-instance` whose HTTP port is taken exits at once, non-zero, and says why: it does not run
/// PostgreSQL without the probes the kubelet reads and the `/status` its peers read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_http_port_is_taken_exits_and_says_why() {
    let mut cluster = TestCluster::start("httpport", 1, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    cluster.stop_instance(primary);
    let http_port = cluster.instances[primary].http_port;
    let _taken = std::net::TcpListener::bind(("127.0.0.1", http_port)).unwrap();
    cluster.start_instance(primary).unwrap();
    let started = std::time::Instant::now();
    let exited = loop {
        if let Some(status) = cluster.exit_status(primary) {
            break status;
        }
        assert!(
            started.elapsed() < STARTUP,
            "pg-instance still runs with its HTTP port taken\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!exited.success(), "{exited:?}");
    let log = cluster.instances[primary].log();
    assert!(
        log.contains(&format!(
            "binding the HTTP endpoints on 127.0.0.1:{http_port}"
        )),
        "{log}"
    );
    assert_eq!(
        cluster.instances[primary].postmaster_pid(),
        None,
        "PostgreSQL was not started"
    );
}

/// A new cluster's primary whose application role and database cannot be made yet (here every
/// transaction is read-only) is not ready, so that no client is sent to it, and says why; it is
/// ready once they are made, and the application logs in to its database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_primary_is_ready_once_its_application_role_and_database_exist() {
    let cluster = TestCluster::start_with_args(
        "notyet",
        1,
        0,
        &["--postgres-setting=default_transaction_read_only=on"],
    )
    .await
    .unwrap();
    eventually(
        "the new primary says why it is not ready",
        STARTUP,
        || async {
            cluster.status(0).await.is_some_and(|status| {
                status.role == contract::role::PRIMARY
                && status.bootstrapping
                // read_only_sql_transaction
                && status
                    .last_error
                    .as_deref()
                    .is_some_and(|error| error.contains("25006"))
            })
        },
    )
    .await
    .unwrap();
    let (code, _) = cluster.http_get(0, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{:?}", cluster.status(0).await);

    let client = cluster.connect(0).await.unwrap();
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    client
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = off")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    eventually(
        "the primary is ready once the roles are made",
        STARTUP,
        || async {
            cluster
                .status(0)
                .await
                .is_some_and(|status| !status.bootstrapping && status.last_error.is_none())
                && cluster
                    .http_get(0, "/readyz")
                    .await
                    .is_ok_and(|(code, _)| code == 200)
        },
    )
    .await
    .unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(cluster.instances[0].pg_port)
        .user("app")
        .password("app-pass")
        .dbname("app");
    let (app, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = app
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("app".to_string(), "app".to_string())
    );
}

/// Data of another major version than the image's (an image of the next major put in the
/// catalog, or in `spec.image`) is not started: the instance says which version each is and
/// what to run, in its status (the operator repeats it in the cluster's conditions), and leaves
/// the data alone; back on a server of the data's version, it serves the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_of_another_major_version_is_not_started_and_the_status_says_why() {
    let mut cluster = TestCluster::start("major", 1, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    cluster
        .connect(primary)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE kept AS SELECT 1 AS id")
        .await
        .unwrap();
    cluster.stop_instance(primary);
    let version_file = cluster.instances[primary].pgdata().join("PG_VERSION");
    let version = std::fs::read_to_string(&version_file).unwrap();
    // As if this data were written by PostgreSQL 17 and the image now ran 18.
    std::fs::write(&version_file, "17\n").unwrap();
    cluster.start_instance(primary).unwrap();
    let wanted = "the data directory holds PostgreSQL 17 data and this image runs PostgreSQL 18";
    eventually("the version mismatch in the status", STARTUP, || async {
        cluster.status(primary).await.is_some_and(|status| {
            !status.postgres_ready
                && status
                    .last_error
                    .is_some_and(|error| error.contains(wanted))
        })
    })
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", cluster.logs()));
    assert_eq!(cluster.instances[primary].postmaster_pid(), None);

    std::fs::write(&version_file, version).unwrap();
    eventually("the data served again", STARTUP, || async {
        match cluster.connect(primary).await {
            Ok(client) => client
                .query_one("SELECT id FROM kept", &[])
                .await
                .is_ok_and(|row| row.get::<_, i32>(0) == 1),
            Err(_) => false,
        }
    })
    .await
    .unwrap();
}
