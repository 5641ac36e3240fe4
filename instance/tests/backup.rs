//! Backups on real PostgreSQL 18, a real S3 server (moto, on loopback) and a real kube-apiserver:
//! continuous WAL archiving by the instance manager, base backups over its HTTP API, restores into
//! new clusters to the backup, a time, an LSN, an xid (not inclusive) and a restore point,
//! archiving across a failover and a store outage, and a clear error for a missing bucket (the
//! secret never shown). The repository settings (`walArchiving`, `region`, `forcePathStyle`) are
//! in `backup_settings.rs`, so that each binary stays short.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::backup::*;
use support::{TestCluster, eventually};
use testbed::ApiServer;
use testbed::object_store::{S3Server, SECRET_ACCESS_KEY};

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

/// `backup_and_list.py` replaces `pg_backup_stop`'s own wait for the archive (a 1 s poll) by the
/// same check after the data upload: the files it waits for must be those PostgreSQL would wait
/// for, its busy test PostgreSQL's, and each change must still apply to the pinned barman (a
/// barman upgrade that renames what it replaces would silently bring the idle seconds back).
#[test]
fn the_backup_waits_for_the_files_postgresql_would_and_the_speed_ups_apply_to_the_pinned_barman() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/backup/backup_and_list.py");
    let pg_wal = tempfile::tempdir().unwrap();
    let check = format!(
        r#"
import os, types
m = types.ModuleType("backup_and_list")
exec(open({script:?}).read(), m.__dict__)

class Info:
    begin_xlog = "0/5000028"
def stop(location, in_recovery, mode):
    return {{"location": location, "timeline": 1, "in_recovery": in_recovery,
             "archive_mode": mode, "wal_segment_size": 16777216}}
# A primary waits for the segment holding the byte before the stop point and the history file.
assert m.files_to_archive(Info, stop("0/5000120", False, "on")) == [
    "000000010000000000000005", "000000010000000000000005.00000028.backup"], "primary"
# A stop point on a segment boundary: the previous segment (XLByteToPrevSeg).
assert m.files_to_archive(Info, stop("0/6000000", False, "always"))[0] == "000000010000000000000005"
# A standby waits only with archive_mode=always, and has no history file.
assert m.files_to_archive(Info, stop("0/5000120", True, "on")) == [], "standby, on"
assert m.files_to_archive(Info, stop("0/5000120", True, "always")) == ["000000010000000000000005"]
# No archiving, no wait (walArchiving: false uploads the backup's WAL itself).
assert m.files_to_archive(Info, stop("0/5000120", False, "off")) == [], "off"

# XLogArchiveIsBusy: .done wins, .ready waits, a removed segment was archived.
pg_wal = {pg_wal:?}
os.makedirs(os.path.join(pg_wal, "archive_status"))
seg = "000000010000000000000007"
open(os.path.join(pg_wal, seg), "w").close()
assert m.archive_busy(pg_wal, seg), "segment with no status yet"
open(os.path.join(pg_wal, "archive_status", seg + ".ready"), "w").close()
assert m.archive_busy(pg_wal, seg), ".ready"
os.rename(os.path.join(pg_wal, "archive_status", seg + ".ready"),
          os.path.join(pg_wal, "archive_status", seg + ".done"))
assert not m.archive_busy(pg_wal, seg), ".done"
assert not m.archive_busy(pg_wal, "000000010000000000000009"), "removed by a checkpoint"

# Every change applies to the pinned barman.
from barman import cloud, fs, postgres
import botocore.session
stock = (fs._translate_to_regexp, botocore.session.create_loader, cloud.CloudInterface.close,
         postgres.PostgreSQLConnection.stop_concurrent_backup, cloud.CloudBackupUploader._finalise_copy)
m.speed_up()
now = (fs._translate_to_regexp, botocore.session.create_loader, cloud.CloudInterface.close,
       postgres.PostgreSQLConnection.stop_concurrent_backup, cloud.CloudBackupUploader._finalise_copy)
unchanged = [f.__qualname__ for f, g in zip(stock, now) if f is g]
assert not unchanged, "not replaced: %s" % unchanged
print("ok")
"#,
        pg_wal = pg_wal.path().display().to_string(),
    );
    let output = std::process::Command::new(
        testbed::object_store::barman_bin()
            .unwrap()
            .join("barman-cloud-python"),
    )
    .arg("-c")
    .arg(&check)
    .output()
    .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
