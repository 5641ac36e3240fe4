//! End to end, backups under the real controllers and the node agent with the operator installed
//! by helm (see `common`): a cluster archives to a real S3 server (moto, listening on the pod
//! bridge's gateway, the host address pods reach since they have no default route), a BackupJob
//! completes (the operator exports its time, again after it was killed), and a new cluster
//! bootstraps from that backup and the archived WAL with exactly the
//! expected rows; retention deletes the backups outside the recovery window (aged by rewriting
//! their `backup.info`: the window is days long) and keeps the one the window starts from; a
//! ScheduledBackup runs at once and then every minute, keeps one finished BackupJob and creates
//! none while suspended; a replica cluster restored from one cluster's backup replays its
//! archive read-only (primary and replica) until `replica.enabled` is turned off, which
//! promotes it; one with `replica.streaming` streams from its source's primary too; a BackupJob
//! to a volume (no object store) is restored into a new cluster with exactly the backup's rows.
//! Scenarios run in parallel in their own namespaces.
//!
//! Needs the workspace's `postgres-operator` and `pg-instance` binaries next to this test's
//! target folder (`cargo build -p controllers -p instance`; `cargo xtask test` builds them), and
//! barman-cloud and moto (installed on first use by `testbed::object_store`).

mod common;
#[path = "e2e_backup/volume.rs"]
mod volume;

use std::time::Duration;

use common::backup::{
    BUCKET, archive_current_wal, backup_job, calm_failover, completed, credentials, s3, store,
};
use common::{
    connect_when_served, create_cluster, eventually, installed_certificates, kill_operator,
    not_after, operator_backup_figure, patch_spec, ready_message_containing, secret_value, stack,
    superuser_login,
};
use kube::api::Api;
use serde_json::json;
use testbed::object_store::S3Server;

/// A Healthy one-instance cluster `name` in a new `namespace`, with the store's credentials,
/// archiving to the store under `name/` (`backup` adds to its `spec.backup`).
async fn cluster_with_store(
    e2e: &common::E2e,
    store: &S3Server,
    client: &kube::Client,
    namespace: &str,
    name: &str,
    backup: serde_json::Value,
) -> anyhow::Result<()> {
    testbed::manifests::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        namespace,
    )
    .await?;
    credentials(client, namespace).await?;
    let mut spec_backup = json!({"s3": s3(store, name)});
    if let (Some(all), Some(more)) = (spec_backup.as_object_mut(), backup.as_object()) {
        all.extend(more.clone());
    }
    let clusters = create_cluster(
        client,
        namespace,
        name,
        json!({"instances": 1, "backup": spec_backup, "failover": calm_failover()}),
    )
    .await?;
    e2e.wait_healthy(&clusters, name, None, Duration::from_secs(180))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_job_then_a_new_cluster_restores_the_rows() -> anyhow::Result<()> {
    let e2e = stack()?;
    let store = store(&e2e)?;
    let client = e2e.client().await?;
    let namespace = "e2e-backup";
    cluster_with_store(&e2e, store, &client, namespace, "src", json!({})).await?;
    let password = superuser_login(&client, namespace, "src").await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("src"))?;
    connect_when_served(rw, &password)
        .await?
        .batch_execute(
            "CREATE TABLE rows (id int PRIMARY KEY); INSERT INTO rows SELECT generate_series(1, 100)",
        )
        .await?;

    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "BackupJob",
                "metadata": {"name": "first", "namespace": namespace},
                "spec": {"cluster": {"name": "src"}}}),
        namespace,
    )
    .await?;
    let backup = completed(&jobs, "first").await?;
    assert!(backup.backup_id.is_some(), "{backup:?}");

    // What PostgresBackupTooOld reads: the operator's figure for src, again after the operator
    // was killed and replaced (it comes from the BackupJob's status, not from memory).
    let figure = || async {
        Ok(
            match operator_backup_figure(&e2e, namespace, "src").await? {
                Some(value) if value > 0.0 => Ok(value),
                other => Err(format!("{other:?}")),
            },
        )
    };
    let exported = eventually(
        "the operator to export src's last backup time",
        Duration::from_secs(60),
        figure,
    )
    .await?;
    let now = k8s_openapi::jiff::Timestamp::now().as_second() as f64;
    assert!(
        (now - exported).abs() < 600.0,
        "{exported} is not the backup's time ({now})"
    );
    kill_operator(&client).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = eventually(
        "the replaced operator to export it again",
        Duration::from_secs(120),
        figure,
    )
    .await?;
    assert_eq!(
        again, exported,
        "the figure survives the operator's restart"
    );
    let keys = store.list_keys(BUCKET, "src/")?;
    assert!(
        keys.iter().any(|k| k.contains("/base/")) && keys.iter().any(|k| k.contains("/wals/")),
        "the store holds a base backup and WAL of src: {keys:?}"
    );

    // Rows after the backup reach the store as WAL.
    connect_when_served(rw, &password)
        .await?
        .batch_execute("INSERT INTO rows SELECT generate_series(101, 150)")
        .await?;
    archive_current_wal(rw, &password).await?;

    // A new cluster from that backup and WAL, archiving to its own path.
    let restored = create_cluster(
        &client,
        namespace,
        "copy",
        json!({"instances": 1,
               "bootstrap": {"recovery": {"source": s3(store, "src"), "sourceCluster": "src"}},
               "backup": {"s3": s3(store, "copy")},
               "failover": calm_failover()}),
    )
    .await?;
    e2e.wait_healthy(&restored, "copy", None, Duration::from_secs(240))
        .await?;
    let copy_password = superuser_login(&client, namespace, "copy").await?;
    let copy_rw = e2e.service_port(namespace, &api::contract::rw_service("copy"))?;
    let row = connect_when_served(copy_rw, &copy_password)
        .await?
        .query_one("SELECT count(*), min(id), max(id) FROM rows", &[])
        .await?;
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i32>(1),
            row.get::<_, i32>(2)
        ),
        (150, 1, 150),
        "the restored cluster has every row of the source"
    );
    Ok(())
}

/// `(status, reason, message)` of the condition `type_` of the cluster `name`.
async fn condition_of(
    clusters: &Api<api::PostgresCluster>,
    name: &str,
    type_: &str,
) -> anyhow::Result<(String, String, String)> {
    let conditions = clusters
        .get(name)
        .await?
        .status
        .unwrap_or_default()
        .conditions;
    Ok(api::common::find_condition(&conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default())
}

/// A Healthy cluster `name` archiving to the store, with a table `rows` of ids 1 to `rows`;
/// its superuser login and rw port.
async fn source_with_rows(
    e2e: &common::E2e,
    store: &S3Server,
    client: &kube::Client,
    namespace: &str,
    name: &str,
    rows: i32,
) -> anyhow::Result<(common::Login, u16)> {
    cluster_with_store(e2e, store, client, namespace, name, json!({})).await?;
    let login = superuser_login(client, namespace, name).await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service(name))?;
    let source = connect_when_served(rw, &login).await?;
    source
        .batch_execute("CREATE TABLE rows (id int PRIMARY KEY)")
        .await?;
    source
        .execute(
            "INSERT INTO rows SELECT generate_series(1, $1::int)",
            &[&rows],
        )
        .await?;
    Ok((login, rw))
}

/// A replica cluster's source: [`source_with_rows`] and a completed base backup.
async fn source_with_backup(
    e2e: &common::E2e,
    store: &S3Server,
    client: &kube::Client,
    namespace: &str,
    name: &str,
    rows: i32,
) -> anyhow::Result<(common::Login, u16)> {
    let (login, rw) = source_with_rows(e2e, store, client, namespace, name, rows).await?;
    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    backup_job(client, namespace, "base", name).await?;
    completed(&jobs, "base").await?;
    Ok((login, rw))
}

/// `SELECT count(*) FROM rows` behind the local port `port`.
async fn count_rows(port: u16, login: &common::Login) -> anyhow::Result<i64> {
    Ok(connect_when_served(port, login)
        .await?
        .query_one("SELECT count(*) FROM rows", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cluster_follows_its_sources_archive_read_only_until_it_is_promoted()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let store = store(&e2e)?;
    let client = e2e.client().await?;
    let namespace = "e2e-replica-cluster";
    let (main_login, main_rw) =
        source_with_backup(&e2e, store, &client, namespace, "main", 100).await?;

    // Two instances: the second streams from the designated primary.
    let clusters = create_cluster(
        &client,
        namespace,
        "dr",
        json!({"instances": 2,
               "bootstrap": {"recovery": {"source": s3(store, "main"), "sourceCluster": "main"}},
               "replica": {"enabled": true},
               "backup": {"s3": s3(store, "dr")},
               "failover": calm_failover()}),
    )
    .await?;
    e2e.wait_healthy(&clusters, "dr", None, Duration::from_secs(300))
        .await?;
    // Until it is promoted its roles are the source's: main's password, dr's certificate.
    let dr_login = superuser_login(&client, namespace, "dr").await?;
    let as_source = dr_login.with_password(&main_login.password);
    let dr_rw = e2e.service_port(namespace, &api::contract::rw_service("dr"))?;
    let dr_ro = e2e.service_port(namespace, &api::contract::ro_service("dr"))?;

    // Rows main writes after the backup reach both of dr's instances through main's archive.
    connect_when_served(main_rw, &main_login)
        .await?
        .batch_execute("INSERT INTO rows SELECT generate_series(101, 150)")
        .await?;
    archive_current_wal(main_rw, &main_login).await?;
    eventually(
        "main's archived rows on dr's designated primary and its replica",
        Duration::from_secs(120),
        || async {
            let seen = (
                count_rows(dr_rw, &as_source).await?,
                count_rows(dr_ro, &as_source).await?,
            );
            Ok(if seen == (150, 150) {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            })
        },
    )
    .await?;
    let refused = connect_when_served(dr_rw, &as_source)
        .await?
        .batch_execute("INSERT INTO rows VALUES (1000)")
        .await
        .expect_err("a replica cluster accepts no writes");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused}"
    );
    // Following, and caught up with main's archive (its designated primary lists it every 30 s).
    eventually(
        "dr's ReplicaCluster condition: following main, caught up with its archive",
        Duration::from_secs(120),
        || async {
            let (status, reason, message) = condition_of(&clusters, "dr", "ReplicaCluster").await?;
            Ok(
                if (status.as_str(), reason.as_str()) == ("True", "FollowingSource")
                    && message.contains("main")
                    && message.contains("(caught up with the archive)")
                {
                    Ok(())
                } else {
                    Err(format!("{status} {reason}: {message}"))
                },
            )
        },
    )
    .await?;
    // A database declared for dr is answered, not ignored: read-only until the promotion.
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresDatabase",
                "metadata": {"name": "dr-reports", "namespace": namespace},
                "spec": {"cluster": {"name": "dr"}, "name": "reports", "owner": "postgres"}}),
        namespace,
    )
    .await?;
    let databases: Api<api::PostgresDatabase> = Api::namespaced(client.clone(), namespace);
    let database_ready = |wanted: &'static str| {
        let databases = databases.clone();
        async move {
            eventually(
                &format!("the PostgresDatabase's Ready reason {wanted}"),
                Duration::from_secs(120),
                || async {
                    let conditions = databases
                        .get("dr-reports")
                        .await?
                        .status
                        .unwrap_or_default()
                        .conditions;
                    let ready = api::common::find_condition(&conditions, "Ready")
                        .map(|c| (c.reason.clone(), c.message.clone()))
                        .unwrap_or_default();
                    Ok(if ready.0 == wanted {
                        Ok(ready.1)
                    } else {
                        Err(format!("{ready:?}"))
                    })
                },
            )
            .await
        }
    };
    let waiting = database_ready("ReplicaCluster").await?;
    assert!(
        waiting.contains("once the cluster is promoted"),
        "{waiting}"
    );
    // So is a Pooler: it waits for the promotion (PgBouncer could not log in before).
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "Pooler",
                "metadata": {"name": "dr-pool", "namespace": namespace},
                "spec": {"cluster": {"name": "dr"}, "type": "rw", "instances": 1}}),
        namespace,
    )
    .await?;
    let poolers: Api<api::Pooler> = Api::namespaced(client.clone(), namespace);
    let pooler_conditions = |pooler: api::Pooler| pooler.status.unwrap_or_default().conditions;
    ready_message_containing(
        &poolers,
        "dr-pool",
        "the Pooler is deployed once the cluster is promoted",
        pooler_conditions,
    )
    .await?;

    // Promotion: dr accepts writes (with its own passwords now), keeps main's rows, and
    // archives to its own repository; main goes on.
    patch_spec(&clusters, "dr", json!({"replica": {"enabled": false}})).await?;
    let promoted = eventually(
        "dr to be promoted and accept writes",
        Duration::from_secs(300),
        || async {
            let Ok(client) = connect_when_served(dr_rw, &dr_login).await else {
                return Ok(Err("no connection with dr's own password yet".to_string()));
            };
            let recovering: bool = client
                .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
                .await?
                .get(0);
            Ok(if recovering {
                Err("in recovery".to_string())
            } else {
                Ok(client)
            })
        },
    )
    .await?;
    promoted
        .batch_execute("INSERT INTO rows SELECT generate_series(151, 160)")
        .await?;
    e2e.wait_healthy(&clusters, "dr", None, Duration::from_secs(300))
        .await?;
    assert_eq!(count_rows(dr_rw, &dr_login).await?, 160);
    database_ready("Applied").await?;
    let exists: i64 = connect_when_served(dr_rw, &dr_login)
        .await?
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'reports'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        exists, 1,
        "the declared database exists after the promotion"
    );
    ready_message_containing(
        &poolers,
        "dr-pool",
        "1 of 1 PgBouncer pods ready",
        pooler_conditions,
    )
    .await?;
    let (status, reason, message) = condition_of(&clusters, "dr", "ReplicaCluster").await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Promoted"),
        "{message}"
    );
    archive_current_wal(dr_rw, &dr_login).await?;
    let own = store.list_keys(BUCKET, "dr/dr/wals/")?;
    assert!(
        !own.is_empty(),
        "the promoted cluster archives to its own repository"
    );
    connect_when_served(main_rw, &main_login)
        .await?
        .batch_execute("INSERT INTO rows VALUES (1000)")
        .await?;
    assert_eq!(
        count_rows(main_rw, &main_login).await?,
        151,
        "main is untouched"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cluster_streams_from_its_sources_primary_with_the_sources_certificate()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let store = store(&e2e)?;
    let client = e2e.client().await?;
    let namespace = "e2e-replica-streaming";
    let (origin_login, origin_rw) =
        source_with_backup(&e2e, store, &client, namespace, "origin", 1).await?;

    // The source's own replication Secret holds its CA and a streaming_replica certificate.
    let clusters = create_cluster(
        &client,
        namespace,
        "near",
        json!({"instances": 1,
               "bootstrap": {"recovery": {"source": s3(store, "origin"), "sourceCluster": "origin"}},
               "replica": {"enabled": true, "streaming": {
                   "host": format!("{}.{namespace}.svc", api::contract::rw_service("origin")),
                   "certificateSecret": {"name": api::contract::tls_replication_secret("origin")}}},
               "failover": calm_failover()}),
    )
    .await?;
    e2e.wait_healthy(&clusters, "near", None, Duration::from_secs(300))
        .await?;
    let near_login = superuser_login(&client, namespace, "near")
        .await?
        .with_password(&origin_login.password);
    let near_rw = e2e.service_port(namespace, &api::contract::rw_service("near"))?;

    // No WAL switch: the row arrives by streaming, and origin sees near's receiver.
    connect_when_served(origin_rw, &origin_login)
        .await?
        .batch_execute("INSERT INTO rows VALUES (2)")
        .await?;
    eventually(
        "the row to reach near by streaming, its receiver connected to origin",
        Duration::from_secs(60),
        || async {
            let near = connect_when_served(near_rw, &near_login).await?;
            let rows: i64 = near
                .query_one("SELECT count(*) FROM rows", &[])
                .await?
                .get(0);
            let receiving: Option<String> = near
                .query_opt(
                    "SELECT sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                    &[],
                )
                .await?
                .map(|row| row.get(0));
            Ok(match (rows, receiving) {
                (2, Some(host)) if host.starts_with("origin-rw") => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    let senders: i64 = connect_when_served(origin_rw, &origin_login)
        .await?
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'near_0' AND state = 'streaming'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(senders, 1, "origin streams to near's designated primary");

    // The copy of origin's certificate is the user's to renew: near's instance reports its
    // validity (metrics and the PostgresCertificateExpiresSoon alert), beside its own.
    let origin_secret = api::contract::tls_replication_secret("origin");
    let expected = [
        (
            "source",
            not_after(&secret_value(&client, namespace, &origin_secret, "tls.crt").await?)?,
        ),
        (
            "source-ca",
            not_after(&secret_value(&client, namespace, &origin_secret, "ca.crt").await?)?,
        ),
    ];
    let installed = installed_certificates(&client, namespace, "near-0").await?;
    for (certificate, not_after) in expected {
        assert!(
            installed.contains(&(certificate.to_string(), not_after)),
            "{certificate} until {not_after} in {installed:?}"
        );
    }
    for own in ["server", "replication", "ca"] {
        assert!(
            installed.iter().any(|(certificate, _)| certificate == own),
            "{own} in {installed:?}"
        );
    }
    Ok(())
}

/// The names of the WAL segments archived under `prefix` (without folder or compression
/// suffix; history files left out).
fn wal_segments(store: &S3Server, prefix: &str) -> anyhow::Result<Vec<String>> {
    Ok(store
        .list_keys(BUCKET, &format!("{prefix}/wals/"))?
        .iter()
        .filter_map(|key| key.rsplit('/').next())
        .filter(|name| name.len() >= 24 && name[..24].chars().all(|c| c.is_ascii_hexdigit()))
        .map(|name| name[..24].to_string())
        .collect())
}

/// Rewrites `begin_time` and `end_time` in a backup's `backup.info` in the store to `days_ago`
/// days before now: the recovery window is days long, and the test cannot wait that long.
fn age_backup(
    store: &S3Server,
    prefix: &str,
    backup_id: &str,
    days_ago: i64,
) -> anyhow::Result<()> {
    let key = format!("{prefix}/base/{backup_id}/backup.info");
    let info = store.get_object(BUCKET, &key)?;
    let then = k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_hours(24 * days_ago);
    let stamp = then.strftime("%Y-%m-%d %H:%M:%S+00:00").to_string();
    let aged: String = info
        .lines()
        .map(|line| {
            if line.starts_with("begin_time=") {
                format!("begin_time={stamp}\n")
            } else if line.starts_with("end_time=") {
                format!("end_time={stamp}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    anyhow::ensure!(aged.contains("end_time="), "no end_time in {key}: {info}");
    store.put_object(BUCKET, &key, &aged)
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_the_backups_outside_the_recovery_window_and_their_wal()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let store = store(&e2e)?;
    let client = e2e.client().await?;
    let namespace = "e2e-backup-retention";
    cluster_with_store(
        &e2e,
        store,
        &client,
        namespace,
        "ret",
        json!({"retention": "30d"}),
    )
    .await?;
    let password = superuser_login(&client, namespace, "ret").await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("ret"))?;
    connect_when_served(rw, &password)
        .await?
        .batch_execute("CREATE TABLE t (id int)")
        .await?;
    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    let prefix = "ret/ret";

    // Three backups: the first aged 60 days, the second 45 days (outside the 30-day window,
    // but the base that recovery to the window's start needs), the third today.
    let mut ids = Vec::new();
    let mut wals_after_b1 = Vec::new();
    for (name, age) in [("b1", Some(60)), ("b2", Some(45)), ("b3", None)] {
        connect_when_served(rw, &password)
            .await?
            .batch_execute("INSERT INTO t VALUES (1)")
            .await?;
        archive_current_wal(rw, &password).await?;
        backup_job(&client, namespace, name, "ret").await?;
        let id = completed(&jobs, name).await?.backup_id.unwrap_or_default();
        if let Some(days) = age {
            age_backup(store, prefix, &id, days)?;
        }
        if name == "b1" {
            // Nothing is deleted while b1 is the only backup.
            wals_after_b1 = wal_segments(store, prefix)?;
        }
        ids.push(id);
    }
    let b2_begin = store
        .get_object(BUCKET, &format!("{prefix}/base/{}/backup.info", ids[1]))?
        .lines()
        .find_map(|line| line.strip_prefix("begin_wal=").map(str::to_string))
        .ok_or_else(|| anyhow::anyhow!("no begin_wal in the backup.info of b2"))?;
    let older: Vec<&String> = wals_after_b1.iter().filter(|w| **w < b2_begin).collect();
    assert!(
        !older.is_empty(),
        "WAL older than b2 ({b2_begin}) was archived: {wals_after_b1:?}"
    );

    // The retention after b3: b1 goes with the WAL only it needs; b2 and b3 stay.
    let base = |id: &str| format!("{prefix}/base/{id}/");
    eventually(
        "b1 to be deleted by retention",
        Duration::from_secs(120),
        || async {
            let keys = store.list_keys(BUCKET, &format!("{prefix}/base/"))?;
            let has = |id: &str| keys.iter().any(|k| k.starts_with(&base(id)));
            Ok(if !has(&ids[0]) && has(&ids[1]) && has(&ids[2]) {
                Ok(())
            } else {
                Err(format!("{keys:?}"))
            })
        },
    )
    .await?;
    // barman-cloud removed the WAL older than the oldest kept backup in one run and kept it in
    // another: what is asserted is that the WAL b2 needs is still there.
    let wals = wal_segments(store, prefix)?;
    println!(
        "e2e: retention removed b1; WAL segments older than b2 ({b2_begin}) still archived: {}",
        wals.iter().filter(|w| **w < b2_begin).count()
    );
    assert!(
        wals.contains(&b2_begin),
        "the WAL b2 needs is kept: {wals:?}"
    );
    Ok(())
}

/// The BackupJobs a ScheduledBackup created (its label), with their phases, oldest first.
async fn scheduled_jobs(
    jobs: &Api<api::BackupJob>,
    schedule: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut list: Vec<api::BackupJob> = jobs
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("postgres.keiailab.io/scheduled-backup={schedule}")),
        )
        .await?
        .items;
    list.sort_by_key(|job| job.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(list
        .into_iter()
        .map(|job| {
            let phase = job
                .status
                .and_then(|status| status.phase)
                .unwrap_or_default();
            (job.metadata.name.unwrap_or_default(), phase)
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_backup_runs_on_time_keeps_its_last_jobs_and_pauses_when_suspended()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let store = store(&e2e)?;
    let client = e2e.client().await?;
    let namespace = "e2e-schedule";
    cluster_with_store(&e2e, store, &client, namespace, "timed", json!({})).await?;

    // Every minute, a first one right away, keeping one finished BackupJob.
    let schedule = |suspend: bool| {
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "ScheduledBackup",
               "metadata": {"name": "every-minute", "namespace": namespace},
               "spec": {"cluster": {"name": "timed"}, "schedule": "* * * * *",
                        "immediate": true, "keepJobs": 1, "suspend": suspend}})
    };
    testbed::manifests::apply(&client, &schedule(false), namespace).await?;
    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    let first = eventually(
        "the immediate BackupJob to complete",
        Duration::from_secs(180),
        || async {
            let list = scheduled_jobs(&jobs, "every-minute").await?;
            Ok(match list.first() {
                Some((name, phase)) if phase == "Completed" => Ok(name.clone()),
                Some((_, phase)) if phase == "Failed" => anyhow::bail!("{list:?}"),
                _ => Err(format!("{list:?}")),
            })
        },
    )
    .await?;
    // The next minute's job completes, and the first is deleted: one finished job is kept.
    let second = eventually(
        "the next scheduled BackupJob to complete and the first to go",
        Duration::from_secs(200),
        || async {
            let list = scheduled_jobs(&jobs, "every-minute").await?;
            let finished: Vec<&(String, String)> = list
                .iter()
                .filter(|(_, phase)| phase == "Completed" || phase == "Failed")
                .collect();
            Ok(match finished.as_slice() {
                [(name, phase)] if *name != first && phase == "Completed" => Ok(name.clone()),
                _ => Err(format!("{list:?}")),
            })
        },
    )
    .await?;
    let schedules: Api<api::ScheduledBackup> = Api::namespaced(client.clone(), namespace);
    let status = schedules
        .get("every-minute")
        .await?
        .status
        .unwrap_or_default();
    assert!(
        status.last_backup_job.is_some() && status.next_schedule_time.is_some(),
        "the status names the last job ({second} or a later one) and the next time: {status:?}"
    );
    let keys = store.list_keys(BUCKET, "timed/")?;
    assert!(
        keys.iter().filter(|k| k.ends_with("/backup.info")).count() >= 2,
        "two base backups in the store: {keys:?}"
    );

    // Suspended: no next time in the status, and no new BackupJob for more than a minute.
    testbed::manifests::apply(&client, &schedule(true), namespace).await?;
    eventually(
        "the suspended schedule to drop its next time",
        Duration::from_secs(30),
        || async {
            let status = schedules
                .get("every-minute")
                .await?
                .status
                .unwrap_or_default();
            Ok(match status.next_schedule_time {
                None => Ok(()),
                Some(next) => Err(format!("next {next:?}")),
            })
        },
    )
    .await?;
    let names = |list: Vec<(String, String)>| -> Vec<String> {
        list.into_iter().map(|(name, _)| name).collect()
    };
    let when_suspended = names(scheduled_jobs(&jobs, "every-minute").await?);
    tokio::time::sleep(Duration::from_secs(70)).await;
    let later = names(scheduled_jobs(&jobs, "every-minute").await?);
    assert!(
        later.iter().all(|name| when_suspended.contains(name)),
        "a suspended schedule created a BackupJob: {when_suspended:?} then {later:?}"
    );
    Ok(())
}
