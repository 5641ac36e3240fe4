//! What the backup scenarios share: the binary's S3 server (moto) on the pods' gateway, the
//! Secret with its keys, `spec.backup` for it, BackupJobs and waiting for them and for WAL.

use std::sync::OnceLock;
use std::time::Duration;

use kube::api::Api;
use serde_json::{Value, json};
use testbed::object_store::{ACCESS_KEY_ID, S3Server, SECRET_ACCESS_KEY};

use super::{E2e, connect_when_served, eventually};

/// Failover timing for scenarios that are not about failover: a primary on a machine this
/// loaded may miss the default 2 s renew deadline and fence itself, which would cut a backup's
/// connection. The HA scenarios keep the defaults.
pub fn calm_failover() -> Value {
    json!({"leaseDurationSeconds": 30, "renewDeadlineSeconds": 20})
}

/// The bucket of the binary's store.
pub const BUCKET: &str = "e2e-backups";

/// The S3 server of this test binary, on the pods' gateway; stopped when the binary exits.
///
/// Started from a thread that lives as long as the process: the server dies with the thread
/// that spawned it (PR_SET_PDEATHSIG), and a test's thread ends with the test.
pub fn store(e2e: &E2e) -> anyhow::Result<&'static S3Server> {
    static STORE: OnceLock<Result<S3Server, String>> = OnceLock::new();
    let started = STORE.get_or_init(|| {
        let Some(host) = e2e.host_address() else {
            return Err("the node agent is not running".to_string());
        };
        let (sender, receiver) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("s3-server".to_string())
            .spawn(move || {
                let start = || -> anyhow::Result<S3Server> {
                    let logs = tempfile::tempdir()?.keep();
                    let server = S3Server::start_on(&logs, host.into())?;
                    server.create_bucket(BUCKET)?;
                    Ok(server)
                };
                let _ = sender.send(start().map_err(|error| format!("{error:#}")));
                loop {
                    std::thread::park();
                }
            });
        if let Err(error) = spawned {
            return Err(format!("spawning the S3 server's thread: {error}"));
        }
        receiver
            .recv()
            .unwrap_or_else(|_| Err("the S3 server's thread died".to_string()))
    });
    match started {
        Ok(server) => Ok(server),
        Err(error) => anyhow::bail!("starting the S3 server: {error}"),
    }
}

/// The Secret with the store's keys, in `namespace`.
pub async fn credentials(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "store-credentials", "namespace": namespace},
        "stringData": {"ACCESS_KEY_ID": ACCESS_KEY_ID, "ACCESS_SECRET_KEY": SECRET_ACCESS_KEY}});
    testbed::manifests::apply(client, &secret, namespace).await?;
    Ok(())
}

/// `spec.backup.s3` (or `bootstrap.recovery.source`) for the store, at `path`.
pub fn s3(store: &S3Server, path: &str) -> Value {
    json!({"endpoint": store.direct_endpoint(), "bucket": BUCKET, "path": path,
           "credentialsSecret": {"name": "store-credentials"}})
}

/// Waits until the BackupJob `name` is Completed (fails at once when it Failed); its status.
pub async fn completed(
    jobs: &Api<api::BackupJob>,
    name: &str,
) -> anyhow::Result<api::backup::BackupJobStatus> {
    // Generous: a volume backup schedules a pod, provisions its claim and clones the primary,
    // which on a loaded two-core machine (a release build beside it) took over 180 s once.
    eventually(
        &format!("BackupJob {name} to complete"),
        Duration::from_secs(300),
        || async {
            let status = jobs.get(name).await?.status.unwrap_or_default();
            match status.phase.as_deref() {
                Some("Completed") => Ok(Ok(status)),
                Some("Failed") => {
                    anyhow::bail!("BackupJob {name} failed: {:?}", status.failure_reason)
                }
                other => {
                    // What the reconciler says, for the message if it never completes.
                    let said: Vec<String> = status
                        .conditions
                        .iter()
                        .map(|c| format!("{} {} {}: {}", c.type_, c.status, c.reason, c.message))
                        .collect();
                    Ok(Err(format!(
                        "{other:?} on {:?} (claim {:?}); {}",
                        status.instance,
                        status.volume_claim,
                        said.join("; ")
                    )))
                }
            }
        },
    )
    .await
}

/// Switches WAL on the primary behind `rw` and waits until that segment is archived.
pub async fn archive_current_wal(rw: u16, password: &super::Login) -> anyhow::Result<()> {
    let segment: String = connect_when_served(rw, password)
        .await?
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await?
        .get(0);
    eventually(
        &format!("WAL segment {segment} to be archived"),
        Duration::from_secs(120),
        || async {
            // A connection per look: one held across a restart of PostgreSQL would be lost.
            let archived: Option<String> = connect_when_served(rw, password)
                .await?
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

/// Creates the BackupJob `name` of `cluster`.
pub async fn backup_job(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    cluster: &str,
) -> anyhow::Result<()> {
    testbed::manifests::apply(
        client,
        &json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "BackupJob",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"cluster": {"name": cluster}}}),
        namespace,
    )
    .await?;
    Ok(())
}

/// Every text the API shows about `namespace`'s objects: the clusters' and jobs' status and
/// the events (where a leaked secret would be seen).
pub async fn visible_text(client: &kube::Client, namespace: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    for cluster in Api::<api::PostgresCluster>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await?
    {
        text.push_str(&serde_json::to_string(&cluster.status)?);
    }
    for job in Api::<api::BackupJob>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await?
    {
        text.push_str(&serde_json::to_string(&job.status)?);
    }
    for event in Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await?
    {
        text.push_str(event.message.as_deref().unwrap_or_default());
        text.push('\n');
    }
    Ok(text)
}
