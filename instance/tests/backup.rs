//! Backups on real PostgreSQL 18, a real S3 server (moto, on loopback) and a real kube-apiserver:
//! continuous WAL archiving by the instance manager, base backups over its HTTP API, restores into
//! new clusters to the backup, a time, an LSN, an xid (not inclusive) and a restore point,
//! archiving across a failover
//! and a store outage, and a clear error for a missing bucket (the secret never shown).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use support::{TestCluster, eventually};
use testbed::ApiServer;
use testbed::object_store::{ACCESS_KEY_ID, S3Server, SECRET_ACCESS_KEY};

const STARTUP: Duration = Duration::from_secs(120);
const BUCKET: &str = "backups";

/// Environment of a `pg-instance` with a repository at `path` in `bucket`, and optionally a
/// recovery from `source_path`'s cluster `source_cluster`.
fn backup_env(
    store: &S3Server,
    bucket: &str,
    path: &str,
    recovery: Option<serde_json::Value>,
) -> Vec<(String, String)> {
    backup_env_with(store, bucket, path, recovery, |_| {})
}

/// As [`backup_env`], with `adjust` changing the repository (`spec.backup`) first.
fn backup_env_with(
    store: &S3Server,
    bucket: &str,
    path: &str,
    recovery: Option<serde_json::Value>,
    adjust: impl FnOnce(&mut serde_json::Value),
) -> Vec<(String, String)> {
    let mut repository = serde_json::json!({
        "s3": {
            "endpoint": store.endpoint(),
            "bucket": bucket,
            "path": path,
            "credentialsSecret": {"name": "s3-credentials"},
        },
        "walArchiving": true,
        "retention": "30d",
    });
    adjust(&mut repository);
    let mut env = vec![
        (
            "BARMAN_BIN".to_string(),
            testbed::object_store::barman_bin()
                .unwrap()
                .display()
                .to_string(),
        ),
        ("BACKUP_REPOSITORY".into(), repository.to_string()),
        ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY_ID.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), SECRET_ACCESS_KEY.into()),
    ];
    if let Some(recovery) = recovery {
        env.push(("BOOTSTRAP_RECOVERY".into(), recovery.to_string()));
        env.push(("RECOVERY_AWS_ACCESS_KEY_ID".into(), ACCESS_KEY_ID.into()));
        env.push((
            "RECOVERY_AWS_SECRET_ACCESS_KEY".into(),
            SECRET_ACCESS_KEY.into(),
        ));
    }
    env
}

/// `spec.bootstrap.recovery` from the cluster `source` archived at `path`.
fn recovery_spec(
    store: &S3Server,
    path: &str,
    source: &str,
    target: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "source": {
            "endpoint": store.endpoint(),
            "bucket": BUCKET,
            "path": path,
            "credentialsSecret": {"name": "s3-credentials"},
        },
        "sourceCluster": source,
    });
    if let Some(target) = target {
        spec["target"] = target;
    }
    spec
}

/// One HTTP/1.0 request to an instance manager: (status code, body); an error after 20 s (a
/// loaded machine's answer takes a while, a stuck one must not hang the test).
async fn http(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(20), http_exchange(port, method, path))
        .await
        .map_err(|_| {
            anyhow::anyhow!("{method} {path}: no answer from the instance manager in 20 s")
        })?
}

async fn http_exchange(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Takes a base backup on instance `index` over HTTP and waits for its end.
async fn base_backup(
    cluster: &TestCluster,
    index: usize,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let port = cluster.instances[index].http_port;
    // The instance refuses (409) until its run loop has seen PostgreSQL serve.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http(port, "POST", &format!("/backups/{name}")).await?;
        if code == 202 {
            break;
        }
        if code != 409 || Instant::now() > deadline {
            bail!("POST /backups/{name}: {code} {body}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, body) = http(port, "GET", &format!("/backups/{name}")).await?;
        let run: serde_json::Value = serde_json::from_str(&body)?;
        match run["phase"].as_str() {
            Some("Running") => {}
            _ => return Ok(run),
        }
        if Instant::now() > deadline {
            bail!("backup {name} still running after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The archiver's status on instance `index`.
async fn archive_status(cluster: &TestCluster, index: usize) -> serde_json::Value {
    let (_, body) = http(cluster.instances[index].http_port, "GET", "/archive")
        .await
        .unwrap_or_default();
    serde_json::from_str(&body).unwrap_or_default()
}

/// Switches to a new WAL segment on instance `index` and waits until the archiver uploaded the
/// one just closed.
async fn switch_and_wait_archived(cluster: &TestCluster, index: usize) -> anyhow::Result<()> {
    let client = cluster.connect(index).await?;
    // A transaction first: a switch with no WAL since the last one closes nothing.
    client.query_one("SELECT txid_current()", &[]).await?;
    let closed: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = archive_status(cluster, index).await;
        // Nothing older left behind either (uploads run in parallel, and retries come later).
        if status["lastArchivedWal"]
            .as_str()
            .is_some_and(|last| last.len() >= 24 && last[..24] >= closed[..24])
            && status["pending"] == 0
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{closed} not archived after 90 s: {status}\n{}",
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn insert(client: &tokio_postgres::Client, from: i32, to: i32) {
    client
        .execute(
            "INSERT INTO items SELECT generate_series($1::int, $2::int)",
            &[&from, &to],
        )
        .await
        .unwrap();
}

async fn ids(cluster: &TestCluster, index: usize) -> Vec<i32> {
    let client = cluster.connect(index).await.unwrap();
    client
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Bootstraps a one-instance cluster `name` from `recovery` and returns its rows.
async fn restore(
    api: &Arc<ApiServer>,
    store: &S3Server,
    name: &str,
    recovery: serde_json::Value,
) -> (TestCluster, Vec<i32>) {
    let env = backup_env(store, BUCKET, name, Some(recovery));
    let cluster = TestCluster::start_with(api.clone(), name, 1, 0, env)
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    let status = cluster
        .wait_for_role(primary, api::contract::role::PRIMARY, STARTUP)
        .await
        .unwrap();
    assert_eq!(status.last_join.as_deref(), Some("restore"), "{status:?}");
    let rows = ids(&cluster, primary).await;
    (cluster, rows)
}

fn range(from: i32, to: i32) -> Vec<i32> {
    (from..=to).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_then_restores_to_the_backup_a_time_an_lsn_an_xid_and_a_restore_point() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let source = TestCluster::start_with(
        api.clone(),
        "src",
        1,
        0,
        backup_env(&store, BUCKET, "src", None),
    )
    .await
    .unwrap();
    let primary = source
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    let client = source.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY)")
        .await
        .unwrap();
    insert(&client, 1, 10).await;

    let run = base_backup(&source, primary, "first").await.unwrap();
    assert_eq!(run["phase"], "Completed", "{run}");
    assert_eq!(run["takenFrom"], "primary", "{run}");
    let backup = &run["backup"];
    let backup_id = backup["backupId"].as_str().unwrap().to_string();
    let backup_end = backup["endLsn"].as_str().unwrap().to_string();
    assert!(backup["beginLsn"].as_str().is_some(), "{run}");
    assert!(backup["sizeBytes"].as_u64().unwrap() > 1_000_000, "{run}");

    insert(&client, 11, 20).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let time: String = client
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    insert(&client, 21, 30).await;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("BEGIN").await.unwrap();
    insert(&client, 31, 40).await;
    let xid: i64 = client
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("COMMIT").await.unwrap();
    client
        .batch_execute("SELECT pg_create_restore_point('before_forty_one')")
        .await
        .unwrap();
    insert(&client, 41, 50).await;
    switch_and_wait_archived(&source, primary).await.unwrap();

    // The repository lists the backup; the metrics count the archived WAL.
    let (_, listed) = http(source.instances[primary].http_port, "GET", "/backups")
        .await
        .unwrap();
    assert!(listed.contains(&backup_id), "{listed}");
    // Base backup and WAL are stored lz4-compressed.
    let keys = store.list_keys(BUCKET, "src/").unwrap();
    assert!(
        keys.iter()
            .any(|key| key.ends_with(&format!("{backup_id}/data.tar.lz4"))),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .filter(|key| key.contains("/wals/"))
            .all(|key| key.ends_with(".lz4")),
        "{keys:?}"
    );
    // Retention (30 days) keeps the only backup: the recovery window starts from it.
    let (code, report) = http(source.instances[primary].http_port, "POST", "/retention")
        .await
        .unwrap();
    assert_eq!(code, 200, "{report}");
    let (_, listed) = http(source.instances[primary].http_port, "GET", "/backups")
        .await
        .unwrap();
    assert!(
        listed.contains(&backup_id),
        "retention removed the needed backup: {listed}"
    );
    let (_, metrics) = source.http_get(primary, "/metrics").await.unwrap();
    assert!(
        metrics.contains("pg_instance_wal_archive_archived_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pg_instance_base_backups_completed_total 1"),
        "{metrics}"
    );
    // What the PostgresBackupTooOld alert reads: the time of the backup, not 0.
    let last_backup = metrics
        .lines()
        .find_map(|line| line.strip_prefix("pg_instance_backup_last_success_timestamp_seconds "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or_default();
    assert!(last_backup > 1.0e9, "{metrics}");

    let cases = [
        (
            "to-backup",
            Some(serde_json::json!({"lsn": backup_end})),
            Some(backup_id.as_str()),
            range(1, 10),
        ),
        (
            "to-time",
            Some(serde_json::json!({"time": time})),
            None,
            range(1, 20),
        ),
        (
            "to-lsn",
            Some(serde_json::json!({"lsn": lsn})),
            None,
            range(1, 30),
        ),
        // Not inclusive: stops just before that transaction commits.
        (
            "to-xid",
            Some(serde_json::json!({"xid": xid, "inclusive": false})),
            None,
            range(1, 30),
        ),
        (
            "to-name",
            Some(serde_json::json!({"name": "before_forty_one"})),
            None,
            range(1, 40),
        ),
        ("to-end", None, None, range(1, 50)),
    ];
    // The restores run three at a time: each mostly waits for WAL downloads.
    let store = &store;
    let api = &api;
    for batch in cases.chunks(3) {
        let restores = batch
            .iter()
            .map(|(name, target, backup_id, expected)| async move {
                let mut recovery = recovery_spec(store, "src", "src", target.clone());
                if let Some(id) = backup_id {
                    recovery["backupId"] = serde_json::json!(id);
                }
                let (restored, rows) = restore(api, store, name, recovery).await;
                assert_eq!(&rows, expected, "restore {name}");
                (*name, restored)
            });
        for (name, restored) in futures::future::join_all(restores).await {
            if name != "to-name" {
                continue;
            }
            // The restored cluster archives its own new timeline to its own path.
            let client = restored.connect(0).await.unwrap();
            client
                .batch_execute("INSERT INTO items VALUES (1000)")
                .await
                .unwrap();
            switch_and_wait_archived(&restored, 0).await.unwrap();
            let keys = store.list_keys(BUCKET, "to-name/").unwrap();
            assert!(keys.iter().any(|key| key.contains(".history")), "{keys:?}");
            let source_keys = store.list_keys(BUCKET, "src/").unwrap();
            assert!(
                !source_keys.iter().any(|key| key.contains(".history")),
                "the source's path got another cluster's timeline: {source_keys:?}"
            );
        }
    }
}

/// A metric's value from `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_survives_a_store_outage_and_follows_a_failover_with_no_gap() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let mut cluster = TestCluster::start_with(
        api.clone(),
        "ha",
        2,
        0,
        backup_env(&store, BUCKET, "ha", None),
    )
    .await
    .expect("step 1: start the two instances");
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .expect("step 1: a primary with its replica");
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY)")
        .await
        .unwrap();
    insert(&client, 1, 10).await;
    // The base backup comes from the replica when asked there.
    let replica = 1 - primary;
    let run = base_backup(&cluster, replica, "from-replica")
        .await
        .expect("step 2: the base backup from the replica");
    assert_eq!(run["phase"], "Completed", "{run}\n{}", cluster.logs());
    assert_eq!(run["takenFrom"], "replica", "{run}");

    // The store goes away: uploads fail, the failures show, the WAL stays on the primary.
    store.cut();
    insert(&client, 11, 20).await;
    let closed: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    eventually(
        "step 3 (store cut): the archiver reports failures",
        Duration::from_secs(60),
        || async {
            let status = archive_status(&cluster, primary).await;
            status["healthy"] == false && status["failedCount"].as_u64().unwrap_or(0) > 0
        },
    )
    .await
    .unwrap();
    let (_, metrics) = cluster.http_get(primary, "/metrics").await.unwrap();
    assert!(
        metric(&metrics, "pg_instance_wal_archive_failures_total") > 0.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "pg_instance_wal_archive_pending_segments") >= 1.0,
        "{metrics}"
    );
    eventually(
        "step 3 (store cut): /status shows the failing archive",
        Duration::from_secs(10),
        || async {
            cluster
                .status(primary)
                .await
                .and_then(|status| status.wal_archive)
                .is_some_and(|archive| !archive.healthy)
        },
    )
    .await
    .unwrap();
    let published = cluster.status(primary).await.unwrap().wal_archive.unwrap();
    assert!(
        !format!("{published:?}").contains(SECRET_ACCESS_KEY),
        "the secret leaked into the status"
    );
    let wal_dir = cluster.instances[primary].pgdata().join("pg_wal");
    assert!(
        wal_dir.join(&closed).exists(),
        "{closed} was removed before it was archived"
    );

    // The store comes back: archiving catches up.
    store.restore();
    switch_and_wait_archived(&cluster, primary)
        .await
        .expect("step 4 (store back): archiving catches up");

    // Failover with a slow store: the end of recovery (restore_command fetching the last WAL and
    // the timeline history) outlasts a Lease; the new primary renews its Lease meanwhile and is
    // not stopped by its own watchdog once promoted. Then it archives its new timeline.
    let old = cluster.instances[primary].name.clone();
    store.slow_down(Duration::from_secs(2));
    cluster.kill_instance(primary);
    let new_primary = cluster
        .wait_for_new_primary(&old, Duration::from_secs(90))
        .await
        .expect("step 5 (failover, slow store): a new primary");
    store.slow_down(Duration::ZERO);
    for _ in 0..6 {
        let client = cluster.connect(new_primary).await;
        assert!(
            client.is_ok(),
            "step 5: the new primary went down after its promotion: {client:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let client = cluster.connect(new_primary).await.unwrap();
    insert(&client, 21, 30).await;
    switch_and_wait_archived(&cluster, new_primary)
        .await
        .expect("step 6: the new primary archives its timeline");
    let keys = store.list_keys(BUCKET, "ha/").unwrap();
    assert!(
        keys.iter().any(|key| key.contains("/00000002.history")),
        "step 6: no history file of the new timeline: {keys:?}"
    );

    // Everything, before the outage, during it and after the failover, is recoverable.
    let (_restored, rows) = restore(
        &api,
        &store,
        "after-failover",
        recovery_spec(&store, "ha", "ha", None),
    )
    .await;
    assert_eq!(rows, range(1, 30), "step 7: the restore after the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_a_clear_error_that_never_shows_the_secret() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let cluster = TestCluster::start_with(
        api.clone(),
        "nobucket",
        1,
        0,
        backup_env(&store, "missing-bucket", "nobucket", None),
    )
    .await
    .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE items (id int); SELECT pg_switch_wal()")
        .await
        .unwrap();
    eventually(
        "the archiver reports the failure",
        Duration::from_secs(60),
        || async { archive_status(&cluster, primary).await["lastFailure"].is_string() },
    )
    .await
    .unwrap();
    let status = archive_status(&cluster, primary).await;
    let failure = status["lastFailure"].as_str().unwrap();
    assert!(
        failure.contains("NoSuchBucket") || failure.contains("bucket"),
        "{failure}"
    );
    let run = base_backup(&cluster, primary, "doomed").await.unwrap();
    assert_eq!(run["phase"], "Failed", "{run}");
    let error = run["error"].as_str().unwrap();
    assert!(error.contains("barman-cloud-backup"), "{error}");
    for text in [failure, error, &cluster.logs()] {
        assert!(
            !text.contains(SECRET_ACCESS_KEY),
            "the secret leaked: {text}"
        );
    }
}

/// The WAL files under `<prefix>/wals/` in the store, by name (without compression suffix).
fn archived_wal(store: &S3Server, prefix: &str) -> Vec<String> {
    store
        .list_keys(BUCKET, &format!("{prefix}/wals/"))
        .unwrap()
        .iter()
        .filter_map(|key| key.rsplit('/').next())
        .map(|name| name.trim_end_matches(".lz4").to_string())
        .collect()
}

/// Segment names from `first` to `last` on one timeline (16 MiB segments).
fn segments(first: &str, last: &str) -> Vec<String> {
    let number = |name: &str| {
        u64::from_str_radix(&name[8..16], 16).unwrap() * 256
            + u64::from_str_radix(&name[16..24], 16).unwrap()
    };
    (number(first)..=number(last))
        .map(|n| format!("{}{:08X}{:08X}", &first[..8], n / 256, n % 256))
        .collect()
}

/// Closes the current WAL segment (after a transaction, so that there is one to close).
async fn switch_wal(client: &tokio_postgres::Client) {
    client
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap();
    client
        .query_one("SELECT pg_switch_wal()::text", &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wal_archiving_only_a_backups_own_wal_is_uploaded_and_it_restores() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    store.start_recording().unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let env = backup_env_with(&store, BUCKET, "noarch", None, |repository| {
        repository["walArchiving"] = false.into();
    });
    let cluster = TestCluster::start_with(api.clone(), "noarch", 1, 0, env)
        .await
        .expect("step: start the cluster");
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .expect("step: a primary serves");
    let client = cluster.connect(primary).await.unwrap();
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY)")
        .await
        .unwrap();
    insert(&client, 1, 10).await;

    // PostgreSQL archives nothing, and no WAL reaches the store.
    let mode: String = client
        .query_one("SHOW archive_mode", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "off");
    switch_wal(&client).await;
    switch_wal(&client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(archived_wal(&store, "noarch/noarch"), Vec::<String>::new());

    // A base backup still works: it uploads the WAL it needs, from its first segment to its last.
    let run = base_backup(&cluster, primary, "self-contained")
        .await
        .expect("step: the base backup");
    assert_eq!(run["phase"], "Completed", "{run}\n{}", cluster.logs());
    let (first, last) = (
        run["backup"]["beginWal"].as_str().unwrap(),
        run["backup"]["endWal"].as_str().unwrap(),
    );
    let needed = segments(first, last);
    assert_eq!(archived_wal(&store, "noarch/noarch"), needed, "{run}");
    // WAL written after the backup stays on the server.
    insert(&client, 11, 20).await;
    switch_wal(&client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(archived_wal(&store, "noarch/noarch"), needed);

    // forcePathStyle (the default) and the default region, as the store saw them.
    let requests = store.recorded_requests();
    assert!(!requests.is_empty());
    let port = store.endpoint().rsplit(':').next().unwrap().to_string();
    for request in &requests {
        assert_eq!(request.host, format!("127.0.0.1:{port}"), "{request:?}");
        assert!(
            request.path().starts_with(&format!("/{BUCKET}")),
            "not path-style: {request:?}"
        );
        assert!(
            request.authorization.contains("/us-east-1/s3/aws4_request"),
            "{request:?}"
        );
    }

    // The backup restores on its own: the rows it holds, not those written after it.
    let (_restored, rows) = restore(
        &api,
        &store,
        "noarch-restored",
        recovery_spec(&store, "noarch", "noarch", None),
    )
    .await;
    assert_eq!(rows, range(1, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_and_virtual_hosted_addressing_reach_the_store() {
    let scratch = tempfile::tempdir().unwrap();
    let store = S3Server::start(scratch.path()).unwrap();
    store.create_bucket(BUCKET).unwrap();
    store.start_recording().unwrap();
    let api = Arc::new(ApiServer::start().await.unwrap());
    let port = store.endpoint().rsplit(':').next().unwrap().to_string();
    let mut env = backup_env_with(&store, BUCKET, "vhost", None, |repository| {
        repository["s3"]["endpoint"] = format!("http://localhost:{port}").into();
        repository["s3"]["forcePathStyle"] = false.into();
        repository["s3"]["region"] = "eu-central-1".into();
    });
    // Nothing resolves `backups.localhost` here: an HTTP proxy stands in for the DNS a
    // virtual-hosted store needs. It is the store itself (through its cuttable proxy), which
    // reads the bucket from the Host header.
    for name in ["HTTP_PROXY", "http_proxy"] {
        env.push((name.into(), format!("http://127.0.0.1:{port}")));
    }
    for name in ["NO_PROXY", "no_proxy"] {
        env.push((name.into(), "127.0.0.1".into()));
    }
    let cluster = TestCluster::start_with(api.clone(), "vhost", 1, 0, env)
        .await
        .expect("step: start the cluster");
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .expect("step: a primary serves");
    switch_and_wait_archived(&cluster, primary)
        .await
        .expect("step: WAL archiving");
    let run = base_backup(&cluster, primary, "vhost")
        .await
        .expect("step: the base backup");
    assert_eq!(run["phase"], "Completed", "{run}\n{}", cluster.logs());
    assert!(
        !archived_wal(&store, "vhost/vhost").is_empty(),
        "no WAL in the bucket"
    );

    let requests = store.recorded_requests();
    assert!(
        requests.iter().any(|request| request.method == "PUT"),
        "{requests:?}"
    );
    for request in &requests {
        assert_eq!(
            request.host,
            format!("{BUCKET}.localhost:{port}"),
            "not virtual-hosted: {request:?}"
        );
        assert!(
            !request.path().starts_with(&format!("/{BUCKET}")),
            "{request:?}"
        );
        assert!(
            request
                .authorization
                .contains("/eu-central-1/s3/aws4_request"),
            "the region is not in the signature's scope: {request:?}"
        );
    }
}
