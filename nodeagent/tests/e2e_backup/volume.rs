//! Backups to a volume: a BackupJob to a volume (no object store) is restored into a new
//! cluster with exactly the backup's rows; a volume backup of a cluster that archives is replayed
//! from its archive to a restore point (point-in-time recovery) and followed as a replica
//! cluster; a volume of another cluster than the archive named is refused.

use std::time::Duration;

use kube::api::Api;
use serde_json::json;

use super::common::backup::{archive_current_wal, calm_failover, completed, s3, store};
use super::common::{connect_when_served, create_cluster, eventually, stack, superuser_login};
use super::{condition_of, count_rows, source_with_rows};

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_to_a_volume_restores_into_a_new_cluster_without_an_object_store()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-volume-backup";
    // No spec.backup anywhere: the volume is the only place the backup goes.
    let clusters = create_cluster(
        &client,
        namespace,
        "vsrc",
        json!({"instances": 2, "failover": calm_failover()}),
    )
    .await?;
    // Without TLS, the backup Job logs in with the replication password (started now, backed
    // up below).
    create_cluster(
        &client,
        namespace,
        "vplain",
        json!({"instances": 1, "tls": {"mode": "Disabled"}, "failover": calm_failover()}),
    )
    .await?;
    e2e.wait_healthy(&clusters, "vsrc", None, Duration::from_secs(240))
        .await?;
    let login = superuser_login(&client, namespace, "vsrc").await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("vsrc"))?;
    let source = connect_when_served(rw, &login).await?;
    source
        .batch_execute(
            "CREATE TABLE rows (id int PRIMARY KEY); INSERT INTO rows SELECT generate_series(1, 100)",
        )
        .await?;
    // The replica has the rows before the backup is taken from it.
    let lsn: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    eventually("the replica to replay the rows", Duration::from_secs(60), || async {
        let replayed: bool = source
            .query_one(
                "SELECT coalesce(bool_and(replay_lsn >= $1::text::pg_lsn), false) FROM pg_stat_replication",
                &[&lsn],
            )
            .await?
            .get(0);
        Ok(if replayed { Ok(()) } else { Err("behind".to_string()) })
    })
    .await?;

    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    let job = |name: &str| {
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "BackupJob",
               "metadata": {"name": name, "namespace": namespace},
               "spec": {"cluster": {"name": "vsrc"}, "preferReplica": true,
                        "volume": {"size": "1Gi"}}})
    };
    testbed::manifests::apply(&client, &job("nightly"), namespace).await?;
    let backup = completed(&jobs, "nightly").await?;
    let primary = clusters
        .get("vsrc")
        .await?
        .status
        .unwrap_or_default()
        .current_primary
        .unwrap_or_default();
    assert_eq!(
        backup.volume_claim.as_deref(),
        Some("nightly"),
        "{backup:?}"
    );
    assert_eq!(backup.backup_id.as_deref(), Some("nightly"), "{backup:?}");
    assert!(
        backup.instance.is_some() && backup.instance.as_deref() != Some(primary.as_str()),
        "taken from the replica (preferReplica), not {primary}: {backup:?}"
    );
    assert!(
        backup.begin_lsn.is_some() && backup.end_lsn.is_some() && backup.begin_time.is_some(),
        "the Job's report reaches the status: {backup:?}"
    );
    assert!(
        backup.size_bytes.unwrap_or(0) > 1_000_000,
        "a data directory's size: {backup:?}"
    );

    // Every minute into a volume, keeping one: the pruned BackupJob's claim goes with it.
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "ScheduledBackup",
                "metadata": {"name": "vsched", "namespace": namespace},
                "spec": {"cluster": {"name": "vsrc"}, "schedule": "* * * * *", "immediate": true,
                         "keepJobs": 1, "volume": {"size": "1Gi"}}}),
        namespace,
    )
    .await?;
    let schedules: Api<api::ScheduledBackup> = Api::namespaced(client.clone(), namespace);
    let last_scheduled = || async {
        anyhow::Ok(
            schedules
                .get("vsched")
                .await?
                .status
                .unwrap_or_default()
                .last_backup_job,
        )
    };
    let first_scheduled = eventually(
        "vsched's first BackupJob",
        Duration::from_secs(30),
        || async {
            Ok(last_scheduled()
                .await?
                .ok_or_else(|| "none yet".to_string()))
        },
    )
    .await?;

    // Rows after the backup are not in it.
    source
        .batch_execute("INSERT INTO rows SELECT generate_series(101, 150)")
        .await?;

    // A claim of that name that is not the BackupJob's: refused, and left as it was.
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": "taken", "namespace": namespace},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
        namespace,
    )
    .await?;
    testbed::manifests::apply(&client, &job("taken"), namespace).await?;
    let refused = eventually(
        "BackupJob taken to fail",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("taken").await?.status.unwrap_or_default();
            Ok(match status.phase.as_deref() {
                Some("Failed") => Ok(status),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    assert!(
        refused
            .failure_reason
            .as_deref()
            .is_some_and(|why| why.contains("PersistentVolumeClaim named taken exists already")),
        "{refused:?}"
    );

    // A new cluster from the claim: the backup's rows, its own passwords, writable.
    let copies = create_cluster(
        &client,
        namespace,
        "vcopy",
        json!({"instances": 2, "bootstrap": {"volume": {"claimName": "nightly"}},
               "failover": calm_failover()}),
    )
    .await?;
    // Eight minutes: a copy Job, then two instances one after the other (the second cloned
    // from the first); beside two other test binaries on two cores this took over five.
    e2e.wait_healthy(&copies, "vcopy", None, Duration::from_secs(480))
        .await?;
    let copy_login = superuser_login(&client, namespace, "vcopy").await?;
    assert_ne!(
        copy_login.password, login.password,
        "vcopy has passwords of its own"
    );
    let copy_rw = e2e.service_port(namespace, &api::contract::rw_service("vcopy"))?;
    let copy = connect_when_served(copy_rw, &copy_login).await?;
    let row = copy
        .query_one("SELECT count(*), max(id) FROM rows", &[])
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i32>(1)),
        (100, 100),
        "the restored cluster has the rows of the backup, not those written after it"
    );
    copy.batch_execute("INSERT INTO rows VALUES (1000)").await?;
    let streaming: i64 = copy
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        streaming, 1,
        "vcopy's second instance cloned the restored primary"
    );

    e2e.wait_healthy(&clusters, "vplain", None, Duration::from_secs(120))
        .await?;
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "BackupJob",
                "metadata": {"name": "plain", "namespace": namespace},
                "spec": {"cluster": {"name": "vplain"}, "volume": {"size": "1Gi"}}}),
        namespace,
    )
    .await?;
    let plain = completed(&jobs, "plain").await?;
    assert!(
        plain.end_lsn.is_some() && plain.size_bytes.is_some(),
        "{plain:?}"
    );

    // By now the schedule made a second backup and pruned the first with its claim.
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), namespace);
    let kept = eventually(
        "vsched to keep one completed backup volume, a later one than its first",
        Duration::from_secs(180),
        || async {
            let scheduled: Vec<String> = jobs
                .list(&kube::api::ListParams::default().labels("postgres.keiailab.io/scheduled-backup=vsched"))
                .await?
                .items
                .into_iter()
                .filter(|job| job.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Completed"))
                .map(|job| kube::ResourceExt::name_any(&job))
                .collect();
            let first_claim = claims.get_opt(&first_scheduled).await?.is_some();
            // The newest BackupJob may still be running (on a loaded machine a backup can take
            // longer than the schedule's minute): the one completed one is what is kept.
            let kept_claim = match &scheduled[..] {
                [only] => claims.get_opt(only).await?.is_some(),
                _ => false,
            };
            Ok(match &scheduled[..] {
                [only] if *only != first_scheduled && !first_claim && kept_claim => Ok(only.clone()),
                _ => Err(format!("completed {scheduled:?} (claim {kept_claim}), last {:?}, first {first_scheduled} (claim {first_claim})", last_scheduled().await?)),
            })
        },
    )
    .await?;
    assert!(kept.starts_with("vsched-"), "{kept}");

    // A claim that does not exist: the cluster says which, and starts nothing.
    let missing = create_cluster(
        &client,
        namespace,
        "vnone",
        json!({"instances": 1, "bootstrap": {"volume": {"claimName": "nope"}}}),
    )
    .await?;
    let (_, reason, message) = eventually(
        "vnone to say its claim is missing",
        Duration::from_secs(60),
        || async {
            let degraded = condition_of(&missing, "vnone", "Degraded").await?;
            Ok(if degraded.1 == "BackupVolumeNotFound" {
                Ok(degraded)
            } else {
                Err(format!("{degraded:?}"))
            })
        },
    )
    .await?;
    assert!(message.contains("nope"), "{reason}: {message}");
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(client.clone(), namespace);
    assert!(
        sets.get_opt("vnone").await?.is_none(),
        "no instance starts without its data"
    );

    // A claim with no backup in it (the empty one above): the restore Job fails and says why.
    let empty = create_cluster(
        &client,
        namespace,
        "vempty",
        json!({"instances": 1, "bootstrap": {"volume": {"claimName": "taken"}}}),
    )
    .await?;
    // Up to five minutes: on a loaded machine (a CI run building release binaries beside it)
    // the restore Job's pod was still running after two.
    let (_, _, message) = eventually(
        "vempty to say its restore failed",
        Duration::from_secs(300),
        || async {
            let degraded = condition_of(&empty, "vempty", "Degraded").await?;
            Ok(if degraded.1 == "VolumeRestoreFailed" {
                Ok(degraded)
            } else {
                let progressing = condition_of(&empty, "vempty", "Progressing").await?;
                Err(format!("{degraded:?}, Progressing {progressing:?}"))
            })
        },
    )
    .await?;
    assert!(
        message.contains("holds no backup") && message.contains("vempty-restore"),
        "{message}"
    );
    assert!(
        sets.get_opt("vempty").await?.is_none(),
        "nothing starts on it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_backup_replays_its_clusters_archive_to_a_restore_point_or_follows_it()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let store = store(&e2e)?;
    let client = e2e.client().await?;
    let namespace = "e2e-volume-pitr";
    let (login, rw) = source_with_rows(&e2e, store, &client, namespace, "psrc", 100).await?;
    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "BackupJob",
                "metadata": {"name": "pnightly", "namespace": namespace},
                "spec": {"cluster": {"name": "psrc"}, "volume": {"size": "1Gi"}}}),
        namespace,
    )
    .await?;
    completed(&jobs, "pnightly").await?;

    // After the backup, in the archive only: rows 101-150, a restore point, rows 151-200 (each
    // statement its own transaction, so the point falls between the two commits).
    let source = connect_when_served(rw, &login).await?;
    for statement in [
        "INSERT INTO rows SELECT generate_series(101, 150)",
        "SELECT pg_create_restore_point('before-151')",
        "INSERT INTO rows SELECT generate_series(151, 200)",
    ] {
        source.batch_execute(statement).await?;
    }
    archive_current_wal(rw, &login).await?;

    let recovery = |target: serde_json::Value| {
        let mut recovery = json!({"source": s3(store, "psrc"), "sourceCluster": "psrc"});
        if !target.is_null() {
            recovery["target"] = target;
        }
        recovery
    };
    // To the restore point, promoted, archiving to its own folder; and a replica cluster from
    // the same volume that follows psrc's archive to its end.
    let copies = create_cluster(
        &client,
        namespace,
        "ppitr",
        json!({"instances": 1,
               "bootstrap": {"volume": {"claimName": "pnightly"},
                             "recovery": recovery(json!({"name": "before-151"}))},
               "backup": {"s3": s3(store, "ppitr")},
               "failover": calm_failover()}),
    )
    .await?;
    create_cluster(
        &client,
        namespace,
        "pfollow",
        json!({"instances": 1,
               "bootstrap": {"volume": {"claimName": "pnightly"}, "recovery": recovery(json!(null))},
               "replica": {"enabled": true},
               "failover": calm_failover()}),
    )
    .await?;
    // A volume of psrc with another cluster's archive: refused before anything is copied.
    create_cluster(
        &client,
        namespace,
        "pwrong",
        json!({"instances": 1,
               "bootstrap": {"volume": {"claimName": "pnightly"},
                             "recovery": {"source": s3(store, "other"), "sourceCluster": "other"}}}),
    )
    .await?;

    e2e.wait_healthy(&copies, "ppitr", None, Duration::from_secs(300))
        .await?;
    let pitr_login = superuser_login(&client, namespace, "ppitr").await?;
    let pitr_rw = e2e.service_port(namespace, &api::contract::rw_service("ppitr"))?;
    let pitr = connect_when_served(pitr_rw, &pitr_login).await?;
    let row = pitr
        .query_one(
            "SELECT count(*), max(id), pg_is_in_recovery() FROM rows",
            &[],
        )
        .await?;
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i32>(1),
            row.get::<_, bool>(2)
        ),
        (150, 150, false),
        "the volume's rows and the archive's up to the restore point, promoted"
    );
    pitr.batch_execute("INSERT INTO rows VALUES (1000)").await?;
    let timeline: i32 = pitr
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await?
        .get(0);
    assert!(
        timeline > 1,
        "a new timeline after the recovery: {timeline}"
    );

    e2e.wait_healthy(&copies, "pfollow", None, Duration::from_secs(300))
        .await?;
    // Until promoted, a replica cluster's roles are its source's.
    let follow_login = superuser_login(&client, namespace, "pfollow")
        .await?
        .with_password(&login.password);
    let follow_rw = e2e.service_port(namespace, &api::contract::rw_service("pfollow"))?;
    eventually(
        "pfollow to replay psrc's archive to its end",
        Duration::from_secs(120),
        || async {
            let rows = count_rows(follow_rw, &follow_login).await?;
            Ok(if rows == 200 {
                Ok(())
            } else {
                Err(format!("{rows} rows"))
            })
        },
    )
    .await?;
    let (status, reason, message) = condition_of(&copies, "pfollow", "ReplicaCluster").await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "FollowingSource"),
        "{message}"
    );

    let (_, _, message) = eventually(
        "pwrong to say the volume is not the archive's cluster",
        Duration::from_secs(60),
        || async {
            let degraded = condition_of(&copies, "pwrong", "Degraded").await?;
            Ok(if degraded.1 == "VolumeSourceMismatch" {
                Ok(degraded)
            } else {
                Err(format!("{degraded:?}"))
            })
        },
    )
    .await?;
    assert!(
        message.contains("cluster psrc") && message.contains("is other"),
        "{message}"
    );
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(client.clone(), namespace);
    assert!(
        sets.get_opt("pwrong").await?.is_none(),
        "nothing starts on it"
    );
    Ok(())
}
