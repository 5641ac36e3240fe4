//! Partitions on real PostgreSQL 18 and a real kube-apiserver: the API server out of reach of
//! every instance, a primary cut off from it, a primary whose instance manager hangs (SIGSTOP;
//! its fence process is killed first, so the one started again does the work), a replica cut off
//! from the primary. Each instance is a `pg-instance` process behind its own cuttable proxy (see
//! `support`).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use api::contract;
use instance::watchdog::FenceReport;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::ha::{FAILOVER, STARTUP, count_present, started};
use support::{TestCluster, connect_port, eventually};

/// Writes to every instance each round and records which accepted the write in `rounds` (one
/// entry per instance, true when the write was acknowledged).
async fn check_single_writer(
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    rounds: Arc<std::sync::Mutex<Vec<Vec<bool>>>>,
) {
    let mut clients: Vec<Option<tokio_postgres::Client>> = ports.iter().map(|_| None).collect();
    let mut id: i64 = 10_000_000;
    while !stop.load(Ordering::SeqCst) {
        let mut round = Vec::new();
        for (slot, port) in clients.iter_mut().zip(&ports) {
            if slot.as_ref().is_none_or(|client| client.is_closed()) {
                *slot = tokio::time::timeout(Duration::from_secs(2), connect_port(*port))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            let accepted = match slot {
                Some(client) => {
                    id += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let insert = client.execute("INSERT INTO checker (id) VALUES ($1)", &params);
                    matches!(
                        tokio::time::timeout(Duration::from_millis(1500), insert).await,
                        Ok(Ok(1))
                    )
                }
                None => false,
            };
            if !accepted {
                *slot = None;
            }
            round.push(accepted);
        }
        rounds.lock().unwrap().push(round);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`check_single_writer`] running on `ports`, once it wrote to the primary `primary`.
struct Checker {
    stop: Arc<AtomicBool>,
    rounds: Arc<std::sync::Mutex<Vec<Vec<bool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Checker {
    async fn start(cluster: &TestCluster, primary: usize) -> Self {
        let ports: Vec<u16> = cluster.instances.iter().map(|i| i.pg_port).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn(check_single_writer(ports, stop.clone(), rounds.clone()));
        eventually("the checker wrote to the primary", FAILOVER, || {
            let rounds = rounds.clone();
            async move { rounds.lock().unwrap().iter().any(|round| round[primary]) }
        })
        .await
        .unwrap();
        Self { stop, rounds, task }
    }

    /// Stops it; its rounds.
    async fn finish(self) -> Vec<Vec<bool>> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.rounds.lock().unwrap().clone()
    }
}

/// How long the API server stays out of reach in the outage test (issue #16: "a minute").
const API_OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_out_of_reach_for_a_minute_changes_nothing_while_postgres_is_healthy() {
    let (cluster, primary, old_primary) =
        started("outage", 3, 1, "CREATE TABLE acked (id bigint PRIMARY KEY)").await;
    let client = cluster.connect(primary).await.unwrap();
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let transitions = |lease: k8s_openapi::api::coordination::v1::Lease| {
        lease.spec.and_then(|spec| spec.lease_transitions)
    };
    let lease_name = contract::lease_name(&cluster.name);
    let transitions_before = transitions(leases.get(&lease_name).await.unwrap());
    let mut before = Vec::new();
    for index in 0..cluster.instances.len() {
        before.push(cluster.status(index).await.unwrap());
    }

    // Every instance manager loses the API server; a writer commits through the primary
    // (synchronous quorum: each acknowledgement also waits for a replica) all along.
    for instance in &cluster.instances {
        instance.proxy.cut();
    }
    let started = std::time::Instant::now();
    let mut acknowledged = 0_i64;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < API_OUTAGE {
        let at = std::time::Instant::now();
        let id = acknowledged;
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            client.execute("INSERT INTO acked (id) VALUES ($1)", &[&id]),
        )
        .await;
        match result {
            Ok(Ok(1)) => acknowledged += 1,
            other => panic!(
                "write {acknowledged} not acknowledged {:?} into the outage: {other:?}\n{}",
                started.elapsed(),
                cluster.logs()
            ),
        }
        slowest = slowest.max(at.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (index, before) in before.iter().enumerate() {
        let status = cluster.status(index).await.unwrap();
        assert!(!status.api_reachable, "{status:?}");
        assert_eq!(
            (status.role.as_str(), status.fenced),
            (before.role.as_str(), false),
            "instance {index} at the end of the outage: {status:?}"
        );
    }
    println!(
        "api_outage_seconds={} api_outage_acked_writes={acknowledged} api_outage_slowest_commit_ms={}",
        API_OUTAGE.as_secs(),
        slowest.as_millis()
    );

    // The API server comes back: same holder, no Lease transition, same roles, no restart.
    for instance in &cluster.instances {
        instance.proxy.restore();
    }
    tokio::time::sleep(Duration::from_secs(support::LEASE_DURATION_SECONDS * 2)).await;
    let lease = leases.get(&lease_name).await.unwrap();
    assert_eq!(
        lease
            .spec
            .as_ref()
            .and_then(|spec| spec.holder_identity.as_deref()),
        Some(old_primary.as_str())
    );
    assert_eq!(
        transitions(lease),
        transitions_before,
        "no Lease transition"
    );
    for (index, before) in before.iter().enumerate() {
        let status = cluster.status(index).await.unwrap();
        assert!(status.api_reachable, "{status:?}");
        assert_eq!(status.role, before.role, "{status:?}");
        assert_eq!(status.timeline, before.timeline, "{status:?}");
        assert_eq!(
            status.postgres_restarts, before.postgres_restarts,
            "{status:?}"
        );
        if index != primary {
            assert!(
                status.streaming,
                "replica {index} streams again: {status:?}"
            );
        }
    }
    let count: i64 = client
        .query_one("SELECT count(*) FROM acked", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, acknowledged, "the same connection, every write kept");
}

/// Waits for the former primary `index` to be a replica again, by rewind or a new clone.
async fn rejoins_as_replica(cluster: &TestCluster, index: usize) {
    let status = cluster
        .wait_for_role(index, contract::role::REPLICA, FAILOVER)
        .await
        .unwrap();
    assert!(matches!(
        status.last_join.as_deref(),
        Some("rewind" | "reclone")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_the_api_server_fences_itself_before_another_is_promoted() {
    let (cluster, primary, old_primary) =
        started("part", 3, 1, "CREATE TABLE checker (id bigint PRIMARY KEY)").await;

    // Partition the primary alone from the API server, with a checker writing to every instance.
    let checker = Checker::start(&cluster, primary).await;
    cluster.instances[primary].proxy.cut();
    let new_primary = cluster
        .wait_for_new_primary(&old_primary, FAILOVER)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rounds = checker.finish().await;
    single_writer_handover(&rounds, primary, new_primary);
    let status = cluster.status(primary).await.unwrap();
    assert!(
        status.fenced,
        "the partitioned primary fenced itself: {status:?}"
    );

    // The partition heals: the old primary rejoins as a replica.
    cluster.instances[primary].proxy.restore();
    rejoins_as_replica(&cluster, primary).await;
}

/// Which instances accepted writes in `rounds`, checked: never two in one round, `old` before
/// `new` only; the old primary's last round and the new one's first.
fn single_writer_handover(rounds: &[Vec<bool>], old: usize, new: usize) -> (usize, usize) {
    for (number, round) in rounds.iter().enumerate() {
        assert!(
            round.iter().filter(|accepted| **accepted).count() <= 1,
            "round {number}: two instances accepted writes: {round:?}"
        );
    }
    let last_old = rounds.iter().rposition(|round| round[old]);
    let first_new = rounds.iter().position(|round| round[new]);
    let (Some(last_old), Some(first_new)) = (last_old, first_new) else {
        panic!("both primaries accepted writes in turn: old {last_old:?}, new {first_new:?}");
    };
    assert!(
        last_old < first_new,
        "the old primary stopped accepting writes (round {last_old}) before the new one started (round {first_new})"
    );
    (last_old, first_new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_instance_manager_hangs_is_stopped_by_its_fence_before_another_is_promoted()
{
    // Asynchronous replication: nothing but the fence stops the old primary's commits.
    let (cluster, primary, old_primary) =
        started("hung", 2, 0, "CREATE TABLE checker (id bigint PRIMARY KEY)").await;
    let postmaster = cluster.instances[primary]
        .postmaster_pid()
        .expect("the primary's postmaster runs");
    // The fence process, killed, is started again (and counted); the new one does the work.
    let fence = cluster
        .fence_pid(primary)
        .expect("the primary's fence process");
    kill(Pid::from_raw(fence), Signal::SIGKILL).unwrap();
    let restarted = eventually(
        "the fence process started again and counted",
        Duration::from_secs(10),
        || async {
            cluster
                .status(primary)
                .await
                .and_then(|status| status.fence)
                == Some(FenceReport {
                    running: true,
                    restarts: 1,
                })
                && cluster
                    .fence_pid(primary)
                    .is_some_and(|again| again != fence)
        },
    )
    .await;
    if let Err(error) = restarted {
        panic!("{error}: {:?}", cluster.status(primary).await);
    }
    let checker = Checker::start(&cluster, primary).await;
    // The whole manager stops: its run loop and its watchdog task with it.
    cluster.signal_manager(primary, Signal::SIGSTOP);
    let new_primary = cluster.wait_for_new_primary(&old_primary, FAILOVER).await;
    // Written once the new primary is known, before anything can fail: a hung manager must
    // not be left stopped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rounds = checker.finish().await;
    // Exited is enough: a zombie until the stopped manager reaps it.
    let postmaster_alive =
        std::fs::read_to_string(format!("/proc/{postmaster}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or_default()
                .trim_start()
                .starts_with('Z')
        });
    cluster.signal_manager(primary, Signal::SIGCONT);
    let new_primary = new_primary.unwrap();
    single_writer_handover(&rounds, primary, new_primary);
    assert!(
        !postmaster_alive,
        "the fence process stopped the old primary's PostgreSQL while its manager was stopped"
    );

    // Resumed, the manager finds its PostgreSQL stopped and the Lease gone: it rejoins.
    rejoins_as_replica(&cluster, primary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_the_primary_is_not_elected() {
    let mut cluster = TestCluster::start("cutrep", 3, 1).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(2, STARTUP)
        .await
        .unwrap();
    let old_primary = cluster.instances[primary].name.clone();
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
    let cut = (0..3).find(|index| *index != primary).unwrap();
    let healthy = (0..3)
        .find(|index| *index != primary && *index != cut)
        .unwrap();

    // The cut replica receives nothing more from the primary (its WAL receiver is frozen, as
    // behind a partition); the other one acknowledges every commit (ANY 1).
    let receiver: i32 = cluster
        .connect(cut)
        .await
        .unwrap()
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .await
        .unwrap()
        .get(0);
    let receiver = nix::unistd::Pid::from_raw(receiver);
    kill(receiver, Signal::SIGSTOP).unwrap();
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let ids: Vec<i64> = (1..=50).collect();
    for id in &ids {
        client
            .execute("INSERT INTO acked (id) VALUES ($1)", &[id])
            .await
            .unwrap();
    }

    cluster.kill_instance(primary);
    let new_primary = cluster.wait_for_new_primary(&old_primary, FAILOVER).await;
    let _ = kill(receiver, Signal::SIGCONT);
    let new_primary = new_primary.unwrap();
    assert_eq!(
        new_primary, healthy,
        "the replica that missed acknowledged commits is not elected"
    );
    assert_eq!(
        count_present(&cluster, new_primary, &ids).await.unwrap(),
        ids.len() as i64
    );
    // Healed, the cut replica catches up from the new primary.
    eventually("the cut replica catches up", FAILOVER, || {
        let cluster = &cluster;
        let ids = &ids;
        async move {
            count_present(cluster, cut, ids)
                .await
                .is_ok_and(|n| n == ids.len() as i64)
        }
    })
    .await
    .unwrap();
}
