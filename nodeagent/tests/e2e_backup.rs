//! End to end, backups under the real controllers and the node agent with the operator installed
//! by helm (see `common`): a cluster archives to a real S3 server (moto, listening on the pod
//! bridge's gateway, the host address pods reach since they have no default route), a BackupJob
//! completes, and a new cluster bootstraps from that backup and the archived WAL with exactly the
//! expected rows. Scenarios run in parallel in their own namespaces.
//!
//! Needs the workspace's `postgres-operator` and `pg-instance` binaries next to this test's
//! target folder (`cargo build -p controllers -p instance`; `cargo xtask test` builds them), and
//! barman-cloud and moto (installed on first use by `testbed::object_store`).

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{connect_when_served, create_cluster, eventually, stack, superuser_login};
use kube::api::Api;
use serde_json::{Value, json};
use testbed::object_store::{ACCESS_KEY_ID, S3Server, SECRET_ACCESS_KEY};

const BUCKET: &str = "e2e-backups";

/// The S3 server of this test binary, on the pods' gateway; stopped when the binary exits.
fn store(e2e: &common::E2e) -> anyhow::Result<&'static S3Server> {
    static STORE: OnceLock<Result<(S3Server, tempfile::TempDir), String>> = OnceLock::new();
    let started = STORE.get_or_init(|| {
        let start = || -> anyhow::Result<(S3Server, tempfile::TempDir)> {
            let host = e2e
                .host_address()
                .ok_or_else(|| anyhow::anyhow!("the node agent is not running"))?;
            let logs = tempfile::tempdir()?;
            let server = S3Server::start_on(logs.path(), host.into())?;
            server.create_bucket(BUCKET)?;
            Ok((server, logs))
        };
        start().map_err(|error| format!("{error:#}"))
    });
    match started {
        Ok((server, _)) => Ok(server),
        Err(error) => anyhow::bail!("starting the S3 server: {error}"),
    }
}

/// The Secret with the store's keys, in `namespace`.
async fn credentials(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "store-credentials", "namespace": namespace},
        "stringData": {"ACCESS_KEY_ID": ACCESS_KEY_ID, "ACCESS_SECRET_KEY": SECRET_ACCESS_KEY}});
    testbed::manifests::apply(client, &secret, namespace).await?;
    Ok(())
}

/// `spec.backup.s3` (or `bootstrap.recovery.source`) for the store, at `path`.
fn s3(store: &S3Server, path: &str) -> Value {
    json!({"endpoint": store.direct_endpoint(), "bucket": BUCKET, "path": path,
           "credentialsSecret": {"name": "store-credentials"}})
}

/// Waits until the BackupJob `name` is Completed (fails at once when it Failed); its status.
async fn completed(
    jobs: &Api<api::BackupJob>,
    name: &str,
) -> anyhow::Result<api::backup::BackupJobStatus> {
    eventually(
        &format!("BackupJob {name} to complete"),
        Duration::from_secs(180),
        || async {
            let status = jobs.get(name).await?.status.unwrap_or_default();
            match status.phase.as_deref() {
                Some("Completed") => Ok(Ok(status)),
                Some("Failed") => {
                    anyhow::bail!("BackupJob {name} failed: {:?}", status.failure_reason)
                }
                other => Ok(Err(format!("{other:?}"))),
            }
        },
    )
    .await
}

/// Switches WAL on the primary behind `rw` and waits until that segment is archived.
async fn archive_current_wal(rw: u16, password: &common::Login) -> anyhow::Result<()> {
    let client = connect_when_served(rw, password).await?;
    let segment: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await?
        .get(0);
    eventually(
        &format!("WAL segment {segment} to be archived"),
        Duration::from_secs(120),
        || async {
            let archived: Option<String> = client
                .query_one("SELECT last_archived_wal FROM pg_stat_archiver", &[])
                .await?
                .get(0);
            Ok(match archived {
                Some(last) if last >= segment => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_job_then_a_new_cluster_restores_the_rows() -> anyhow::Result<()> {
    let e2e = stack()?;
    let store = store(&e2e)?;
    let client = e2e.client().await?;
    let namespace = "e2e-backup";
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        namespace,
    )
    .await?;
    credentials(&client, namespace).await?;
    let clusters = create_cluster(
        &client,
        namespace,
        "src",
        json!({"instances": 1, "backup": {"s3": s3(store, "src")}}),
    )
    .await?;
    e2e.wait_healthy(&clusters, "src", None, Duration::from_secs(180))
        .await?;
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
               "backup": {"s3": s3(store, "copy")}}),
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
