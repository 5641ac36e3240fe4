//! Shared by the backup test binaries (`backup.rs`, `backup_settings.rs`): the environment of a
//! `pg-instance` with a backup repository on a real S3 server (moto), the instance manager's
//! backup HTTP API, WAL switches, and restores into new clusters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use testbed::ApiServer;
use testbed::object_store::{ACCESS_KEY_ID, S3Server, SECRET_ACCESS_KEY};

use super::TestCluster;

pub const STARTUP: Duration = Duration::from_secs(120);
pub const BUCKET: &str = "backups";

/// Environment of a `pg-instance` with a repository at `path` in `bucket`, and optionally a
/// recovery from `source_path`'s cluster `source_cluster`.
pub fn backup_env(
    store: &S3Server,
    bucket: &str,
    path: &str,
    recovery: Option<serde_json::Value>,
) -> Vec<(String, String)> {
    backup_env_with(store, bucket, path, recovery, |_| {})
}

/// As [`backup_env`], with `adjust` changing the repository (`spec.backup`) first.
pub fn backup_env_with(
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
pub fn recovery_spec(
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
pub async fn http(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(20), http_exchange(port, method, path))
        .await
        .map_err(|_| {
            anyhow::anyhow!("{method} {path}: no answer from the instance manager in 20 s")
        })?
}

pub async fn http_exchange(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
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
    Ok(testbed::http::status_and_body(&response))
}

/// Takes a base backup on instance `index` over HTTP and waits for its end.
pub async fn base_backup(
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
pub async fn archive_status(cluster: &TestCluster, index: usize) -> serde_json::Value {
    let (_, body) = http(cluster.instances[index].http_port, "GET", "/archive")
        .await
        .unwrap_or_default();
    serde_json::from_str(&body).unwrap_or_default()
}

/// Switches to a new WAL segment on instance `index` and waits until the archiver uploaded the
/// one just closed.
pub async fn switch_and_wait_archived(cluster: &TestCluster, index: usize) -> anyhow::Result<()> {
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

pub async fn insert(client: &tokio_postgres::Client, from: i32, to: i32) {
    client
        .execute(
            "INSERT INTO items SELECT generate_series($1::int, $2::int)",
            &[&from, &to],
        )
        .await
        .unwrap();
}

pub async fn ids(cluster: &TestCluster, index: usize) -> Vec<i32> {
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
pub async fn restore(
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

pub fn range(from: i32, to: i32) -> Vec<i32> {
    (from..=to).collect()
}

/// The WAL files under `<prefix>/wals/` in the store, by name (without compression suffix).
pub fn archived_wal(store: &S3Server, prefix: &str) -> Vec<String> {
    store
        .list_keys(BUCKET, &format!("{prefix}/wals/"))
        .unwrap()
        .iter()
        .filter_map(|key| key.rsplit('/').next())
        .map(|name| name.trim_end_matches(".lz4").to_string())
        .collect()
}

/// Segment names from `first` to `last` on one timeline (16 MiB segments).
pub fn segments(first: &str, last: &str) -> Vec<String> {
    let number = |name: &str| {
        u64::from_str_radix(&name[8..16], 16).unwrap() * 256
            + u64::from_str_radix(&name[16..24], 16).unwrap()
    };
    (number(first)..=number(last))
        .map(|n| format!("{}{:08X}{:08X}", &first[..8], n / 256, n % 256))
        .collect()
}

/// Closes the current WAL segment (after a transaction, so that there is one to close).
pub async fn switch_wal(client: &tokio_postgres::Client) {
    client
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap();
    client
        .query_one("SELECT pg_switch_wal()::text", &[])
        .await
        .unwrap();
}
