//! The BackupJob reconciler (the operator's `backup_job` controller) against a real kube-apiserver,
//! real `pg-instance` processes on PostgreSQL 18 and a real S3 server: it picks a streaming
//! replica when `preferReplica`, drives the base backup over the instance manager's HTTP API and
//! reports it; jobs of one cluster run one at a time, oldest first; a killed instance manager
//! fails its job cleanly and the next job succeeds; a cluster without `spec.backup` fails the job
//! with a reason; a ScheduledBackup creates jobs (immediate, then on its cron schedule), keeps
//! `keepJobs` finished ones, and stops on `suspend`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::postgres_cluster::PostgresCluster;
use api::{BackupJob, ScheduledBackup};
use kube::Api;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use support::TestCluster;
use testbed::ApiServer;
use testbed::object_store::{ACCESS_KEY_ID, S3Server, SECRET_ACCESS_KEY};

const STARTUP: Duration = Duration::from_secs(120);

fn cluster_object(name: &str, store: Option<&S3Server>) -> PostgresCluster {
    let mut spec = serde_json::json!({"image": "postgres:18", "instances": 2});
    if let Some(store) = store {
        spec["backup"] = serde_json::json!({"s3": {
            "endpoint": store.endpoint(), "bucket": "backups", "path": name,
            "credentialsSecret": {"name": "s3-credentials"}}});
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "PostgresCluster",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

async fn create_job(client: &kube::Client, name: &str, cluster: &str, prefer_replica: bool) {
    let jobs: Api<BackupJob> = Api::namespaced(client.clone(), "default");
    let job: BackupJob = serde_json::from_value(serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "BackupJob",
        "metadata": {"name": name},
        "spec": {"cluster": {"name": cluster}, "preferReplica": prefer_replica},
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
}

/// Waits until the job's phase is one of `phases`; returns its status.
async fn wait_phase(
    client: &kube::Client,
    name: &str,
    phases: &[&str],
    timeout: Duration,
) -> api::backup::BackupJobStatus {
    let jobs: Api<BackupJob> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + timeout;
    loop {
        let status = jobs
            .get(name)
            .await
            .ok()
            .and_then(|job| job.status)
            .unwrap_or_default();
        if status
            .phase
            .as_deref()
            .is_some_and(|phase| phases.contains(&phase))
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "BackupJob {name} not {phases:?} after {timeout:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_jobs_run_on_the_instances_and_a_killed_manager_fails_only_its_job() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket("backups").unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    api.install_crds(&api::all_crds()).await.unwrap();
    let client = api.client().await.unwrap();
    let clusters: Api<PostgresCluster> = Api::namespaced(client.clone(), "default");
    clusters
        .create(&PostParams::default(), &cluster_object("db", Some(&store)))
        .await
        .unwrap();
    clusters
        .create(&PostParams::default(), &cluster_object("plain", None))
        .await
        .unwrap();

    let env = vec![
        (
            "BARMAN_BIN".to_string(),
            testbed::object_store::barman_bin()
                .unwrap()
                .display()
                .to_string(),
        ),
        (
            "BACKUP_REPOSITORY".into(),
            serde_json::to_string(&clusters.get("db").await.unwrap().spec.backup).unwrap(),
        ),
        ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY_ID.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), SECRET_ACCESS_KEY.into()),
    ];
    let mut cluster = TestCluster::start_with(api.clone(), "db", 2, 0, env)
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    let replica = 1 - primary;
    cluster
        .wait_for_role(replica, api::contract::role::REPLICA, STARTUP)
        .await
        .unwrap();

    let ctx = Arc::new(controllers::postgres_cluster::Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "postgres-operator".into(),
                instance: None,
            },
        ),
        client: client.clone(),
        metrics: Arc::new(controllers::metrics::Metrics::new()),
        settings: Default::default(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(controllers::backup_job::run(
        ctx,
        Some("default".into()),
        async {
            let _ = stopped.await;
        },
    ));

    // From the replica, while the primary takes writes.
    let writer_client = cluster.connect(primary).await.unwrap();
    writer_client
        .batch_execute("CREATE TABLE items (id int)")
        .await
        .unwrap();
    create_job(&client, "from-replica", "db", true).await;
    let writes = tokio::spawn(async move {
        let mut count = 0;
        for id in 0..200 {
            if writer_client
                .execute("INSERT INTO items VALUES ($1)", &[&id])
                .await
                .is_ok()
            {
                count += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        count
    });
    let status = wait_phase(&client, "from-replica", &["Completed", "Failed"], STARTUP).await;
    assert_eq!(
        status.phase.as_deref(),
        Some("Completed"),
        "{status:?}\n{}",
        cluster.logs()
    );
    assert_eq!(
        status.instance.as_deref(),
        Some(cluster.instances[replica].name.as_str())
    );
    assert!(status.backup_id.is_some() && status.begin_lsn.is_some() && status.end_lsn.is_some());
    assert!(status.size_bytes.unwrap_or(0) > 1_000_000, "{status:?}");
    assert!(status.begin_time.is_some() && status.end_time.is_some());
    assert_eq!(
        writes.await.unwrap(),
        200,
        "writes stopped during the backup"
    );

    // Three BackupJobs at once (a ScheduledBackup's immediate job, late, its first tick, and a
    // manual one from the replica): three backups, one after the other in the order the jobs
    // were created, each under its own name in the repository.
    let twins = ["twin-a", "twin-b", "twin-c"];
    for twin in twins {
        create_job(&client, twin, "db", twin == "twin-c").await;
    }
    let mut runs = Vec::new();
    for twin in twins {
        let status = wait_phase(&client, twin, &["Completed", "Failed"], STARTUP).await;
        assert_eq!(
            status.phase.as_deref(),
            Some("Completed"),
            "{twin}: {status:?}"
        );
        runs.push(status);
    }
    let ids: std::collections::BTreeSet<_> = runs.iter().map(|s| s.backup_id.clone()).collect();
    assert_eq!(ids.len(), 3, "three jobs, three backups: {ids:?}");
    assert_eq!(
        runs[2].instance.as_deref(),
        Some(cluster.instances[replica].name.as_str())
    );
    for pair in runs.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let ended = before.completed_at.as_ref().unwrap().0;
        let started = after.started_at.as_ref().unwrap().0;
        assert!(
            started >= ended,
            "a cluster takes one backup at a time, in the jobs' order: one ran on {:?} until {ended}, the next started on {:?} at {started}",
            before.instance,
            after.instance
        );
    }

    // A kill of the instance manager during the backup fails that job cleanly.
    create_job(&client, "killed", "db", false).await;
    let status = wait_phase(
        &client,
        "killed",
        &["Running", "Completed", "Failed"],
        STARTUP,
    )
    .await;
    assert_eq!(status.phase.as_deref(), Some("Running"), "{status:?}");
    assert_eq!(
        status.instance.as_deref(),
        Some(cluster.instances[primary].name.as_str())
    );
    cluster.kill_instance(primary);
    let status = wait_phase(&client, "killed", &["Completed", "Failed"], STARTUP).await;
    assert_eq!(status.phase.as_deref(), Some("Failed"), "{status:?}");
    let reason = status.failure_reason.unwrap();
    assert!(reason.contains("create a new BackupJob"), "{reason}");

    // The next job succeeds (on whichever instance is primary now).
    cluster.start_instance(primary).unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    cluster
        .wait_for_role(1 - primary, api::contract::role::REPLICA, STARTUP)
        .await
        .unwrap();
    create_job(&client, "after-kill", "db", false).await;
    let status = wait_phase(&client, "after-kill", &["Completed", "Failed"], STARTUP).await;
    assert_eq!(
        status.phase.as_deref(),
        Some("Completed"),
        "{status:?}\n{}",
        cluster.logs()
    );

    // A cluster without a repository: a reason that says what to add.
    create_job(&client, "no-repository", "plain", false).await;
    let status = wait_phase(&client, "no-repository", &["Completed", "Failed"], STARTUP).await;
    assert!(
        status
            .failure_reason
            .unwrap()
            .contains("has no spec.backup"),
        "the reason names the missing field"
    );

    // A schedule: one job right away (immediate), one per minute after; keepJobs 1 deletes the
    // older finished job; suspend stops it.
    let ctx = Arc::new(controllers::postgres_cluster::Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "postgres-operator".into(),
                instance: None,
            },
        ),
        client: client.clone(),
        metrics: Arc::new(controllers::metrics::Metrics::new()),
        settings: Default::default(),
    });
    let (stop_schedules, schedules_stopped) = tokio::sync::oneshot::channel::<()>();
    let schedules_controller = tokio::spawn(controllers::scheduled_backup::run(
        ctx,
        Some("default".into()),
        async {
            let _ = schedules_stopped.await;
        },
    ));
    let schedules: Api<ScheduledBackup> = Api::namespaced(client.clone(), "default");
    let schedule: ScheduledBackup = serde_json::from_value(serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "ScheduledBackup",
        "metadata": {"name": "minutely"},
        "spec": {"cluster": {"name": "db"}, "schedule": "* * * * *", "immediate": true, "keepJobs": 1},
    }))
    .unwrap();
    schedules
        .create(&PostParams::default(), &schedule)
        .await
        .unwrap();
    let jobs: Api<BackupJob> = Api::namespaced(client.clone(), "default");
    let scheduled = ListParams::default().labels("postgres.keiailab.io/scheduled-backup=minutely");
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let list = jobs.list(&scheduled).await.unwrap();
        for job in &list.items {
            seen.insert(job.name_any());
        }
        let finished: Vec<&BackupJob> = list
            .items
            .iter()
            .filter(|job| job.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Completed"))
            .collect();
        // Two jobs were created, both completed, and only the newest finished one is kept.
        if seen.len() >= 2 && finished.len() == 1 && list.items.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "schedule: seen {seen:?}, now {:?}",
            list.items
                .iter()
                .map(|job| (job.name_any(), job.status.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = schedules.get("minutely").await.unwrap().status.unwrap();
    assert!(status.last_backup_job.is_some() && status.next_schedule_time.is_some());
    schedules
        .patch(
            "minutely",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    eventually_suspended(&schedules).await;

    let _ = stop_schedules.send(());
    let _ = schedules_controller.await;
    let _ = stop.send(());
    let _ = controller.await;
}

async fn eventually_suspended(schedules: &Api<ScheduledBackup>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = schedules
            .get("minutely")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if status
            .conditions
            .iter()
            .any(|c| c.type_ == "Scheduled" && c.reason == "Suspended")
            && status.next_schedule_time.is_none()
        {
            return;
        }
        assert!(Instant::now() < deadline, "not suspended: {status:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
