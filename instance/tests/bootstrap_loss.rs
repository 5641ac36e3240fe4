//! A bootstrap cut short starts over instead of stalling (real PostgreSQL 18 and kube-apiserver):
//! the first primary killed in the middle of initdb, and the first primary's volume lost before
//! any replica had a copy. After bootstrap the Lease says so, and an empty instance only clones.

mod support;

use std::time::{Duration, Instant};

use api::contract;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use support::{TestCluster, eventually};

const STARTUP: Duration = Duration::from_secs(120);

/// `kill -9` of every process whose command line names `path` (initdb and the `postgres
/// --boot`/`--single` it runs outlive a killed `pg-instance`, as they would not in a pod).
fn kill_processes_naming(path: &std::path::Path) {
    let needle = path.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The `BootstrapRestarted` event's note on `pod`, once there is one.
async fn restart_event(cluster: &TestCluster, pod: &str) -> anyhow::Result<String> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|event| {
                event.reason.as_deref() == Some("BootstrapRestarted")
                    && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
            });
        if let Some(event) = found {
            return Ok(event.note.unwrap_or_default());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no BootstrapRestarted event on {pod}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn bootstrapped_mark(cluster: &TestCluster) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    leases
        .get_opt(&contract::lease_name(&cluster.name))
        .await
        .ok()??
        .metadata
        .annotations?
        .get(contract::ANNOTATION_BOOTSTRAPPED)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_primary_killed_during_initdb_runs_initdb_again() {
    let mut cluster = TestCluster::start("initkill", 2, 0).await.unwrap();
    // Whichever instance took the Lease runs initdb: catch it between PG_VERSION (written first)
    // and the end (pg-instance then adds its include line to postgresql.conf).
    let unfinished = |pgdata: &std::path::Path| {
        pgdata.join("PG_VERSION").exists()
            && !std::fs::read_to_string(pgdata.join("postgresql.conf"))
                .unwrap_or_default()
                .contains("managed by pg-instance")
    };
    let deadline = Instant::now() + STARTUP;
    let killed = loop {
        let found = (0..2).find(|&index| unfinished(&cluster.instances[index].pgdata()));
        if let Some(index) = found {
            cluster.kill_instance(index);
            kill_processes_naming(&cluster.instances[index].pgdata());
            break index;
        }
        assert!(
            Instant::now() < deadline,
            "no initdb seen in progress\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let instance = &cluster.instances[killed];
    assert!(
        unfinished(&instance.pgdata()),
        "the kill came after initdb finished: the test did not test anything"
    );
    let name = instance.name.clone();
    cluster.start_instance(killed).unwrap();

    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    assert_eq!(primary, killed, "the same instance finishes the bootstrap");
    let status = cluster.status(primary).await.unwrap();
    assert_eq!(status.last_join.as_deref(), Some("reinitdb"), "{status:?}");
    let note = restart_event(&cluster, &name).await.unwrap();
    assert!(note.contains("initdb"), "{note}");
    cluster
        .connect(primary)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // A replica streams: the cluster is bootstrapped, and says so on the Lease.
    eventually("the Lease marked bootstrapped", STARTUP, || async {
        bootstrapped_mark(&cluster).await.as_deref() == Some("true")
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_primary_that_lost_its_volume_before_any_replica_bootstraps_again() {
    let mut cluster = TestCluster::start("lostvol", 1, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    cluster
        .connect(primary)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE before_the_loss (id int)")
        .await
        .unwrap();
    assert_eq!(
        bootstrapped_mark(&cluster).await,
        None,
        "a lone primary is not bootstrapped within its first minutes"
    );
    // The pod goes with its volume (a node lost with local storage): an empty data folder.
    let name = cluster.instances[primary].name.clone();
    cluster.kill_instance(primary);
    let dir = cluster.instances[primary].dir.clone();
    for folder in ["data", "run"] {
        let _ = std::fs::remove_dir_all(dir.join(folder));
    }
    cluster.start_instance(primary).unwrap();
    cluster
        .wait_for_role(primary, contract::role::PRIMARY, STARTUP)
        .await
        .unwrap();
    let status = cluster.status(primary).await.unwrap();
    assert_eq!(status.last_join.as_deref(), Some("reinitdb"), "{status:?}");
    let note = restart_event(&cluster, &name).await.unwrap();
    assert!(note.contains("no replica had a copy"), "{note}");
    let client = cluster.connect(primary).await.unwrap();
    let found: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'before_the_loss'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 0, "a new cluster, not the lost one");
}

/// `DataLost` events on `pod`, with each one's series count (an event repeated by the recorder
/// counts in its series rather than as a new object).
async fn data_lost_events(cluster: &TestCluster, pod: &str) -> anyhow::Result<Vec<(String, i32)>> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    Ok(events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|event| {
            event.reason.as_deref() == Some("DataLost")
                && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
        })
        .map(|event| {
            let count = event.series.as_ref().map_or(1, |series| series.count);
            (event.note.unwrap_or_default(), count)
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_primary_that_lost_its_volume_after_bootstrap_says_so_until_told_to_start_over() {
    let mut cluster = TestCluster::start("stranded", 1, 0).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    // What ten minutes of serving alone would write (bootstrap::SINGLE_INSTANCE_GRACE).
    cluster
        .annotate_lease(contract::ANNOTATION_BOOTSTRAPPED, "true")
        .await
        .unwrap();
    let name = cluster.instances[primary].name.clone();
    cluster.kill_instance(primary);
    let dir = cluster.instances[primary].dir.clone();
    for folder in ["data", "run"] {
        let _ = std::fs::remove_dir_all(dir.join(folder));
    }
    cluster.start_instance(primary).unwrap();

    // It says why it waits, in its status (the operator's DataLost condition) and one event.
    let deadline = Instant::now() + STARTUP;
    let reported = loop {
        if let Some(lost) = cluster.status(primary).await.and_then(|s| s.data_lost) {
            break lost;
        }
        assert!(
            Instant::now() < deadline,
            "the instance never reported the lost data\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reported.contains("spec.bootstrap.recovery"), "{reported}");
    assert!(
        reported.contains(contract::ANNOTATION_BOOTSTRAPPED),
        "{reported}"
    );
    // Several more ticks (250 ms each): the report stays, and it is still one event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = cluster.status(primary).await.unwrap();
    assert_eq!(status.data_lost.as_deref(), Some(reported.as_str()));
    assert!(!status.postgres_ready, "{status:?}");
    assert_ne!(status.role, contract::role::PRIMARY, "{status:?}");
    let events = data_lost_events(&cluster, &name).await.unwrap();
    assert_eq!(events, vec![(reported.clone(), 1)], "one event per change");
    let (_, annotations) = cluster.pod_metadata(primary).await.unwrap();
    let published = annotations
        .get(contract::ANNOTATION_INSTANCE_STATUS)
        .expect("a pending instance that lost the data publishes its status");
    assert!(published.contains("dataLost"), "{published}");

    // The documented way to start over when the data is expendable: remove the annotation.
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let patch = serde_json::json!({
        "metadata": {"annotations": {contract::ANNOTATION_BOOTSTRAPPED: null}}
    });
    leases
        .patch(
            &contract::lease_name(&cluster.name),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    cluster
        .wait_for_role(primary, contract::role::PRIMARY, STARTUP)
        .await
        .unwrap();
    let status = cluster.status(primary).await.unwrap();
    assert_eq!(status.last_join.as_deref(), Some("reinitdb"), "{status:?}");
    assert_eq!(status.data_lost, None, "{status:?}");
}
