//! End to end, what the backup repository refuses, under the real controllers and the node
//! agent with the operator installed by helm (see `common`): a store that checks keys as AWS
//! does (moto with IAM) refuses a wrong key, and the cluster's ContinuousArchiving condition and
//! the BackupJob's failure reason say so (never the key itself), while the right key works; and
//! a new cluster whose repository already holds WAL is not bootstrapped, with a condition and an
//! event saying which folder and what to change; a store behind TLS with a private CA is trusted
//! with `spec.backup.s3.caSecret` (and refused without it).
//! Scenarios run in parallel in their own namespaces.
//!
//! Needs the workspace's `postgres-operator` and `pg-instance` binaries next to this test's
//! target folder (`cargo build -p controllers -p instance`; `cargo xtask test` builds them), and
//! barman-cloud and moto (installed on first use by `testbed::object_store`).

mod common;

use std::time::Duration;

use common::backup::{backup_job, calm_failover, completed, visible_text};
use common::{connect_when_served, create_cluster, eventually, stack, superuser_login};
use kube::api::Api;
use serde_json::json;
use testbed::object_store::S3Server;

/// Six clusters start at once in this binary; on a loaded machine the operator takes a while to
/// reach each.
const STARTUP: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_refuses_the_credentials_is_named_in_the_condition_and_the_job()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-backup-credentials";
    let host = e2e
        .host_address()
        .ok_or_else(|| anyhow::anyhow!("the node agent is not running"))?;
    let logs = tempfile::tempdir()?;
    // A store that checks keys and signatures as AWS does.
    let (guarded, key) = S3Server::start_with_iam(logs.path(), host.into(), &["guarded"])?;
    let wrong_secret = format!("{}-not-it", key.secret_access_key);
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        namespace,
    )
    .await?;
    for (name, secret) in [
        ("right-key", key.secret_access_key.as_str()),
        ("wrong-key", wrong_secret.as_str()),
    ] {
        testbed::manifests::apply(
            &client,
            &json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace},
                    "stringData": {"ACCESS_KEY_ID": key.access_key_id, "ACCESS_SECRET_KEY": secret}}),
            namespace,
        )
        .await?;
    }
    let store = |path: &str, secret: &str| {
        json!({"s3": {"endpoint": guarded.direct_endpoint(), "bucket": "guarded", "path": path,
                      "credentialsSecret": {"name": secret}}})
    };
    let clusters = create_cluster(
        &client,
        namespace,
        "denied",
        json!({"backup": store("denied", "wrong-key"), "failover": calm_failover()}),
    )
    .await?;
    create_cluster(
        &client,
        namespace,
        "allowed",
        json!({"backup": store("allowed", "right-key"), "failover": calm_failover()}),
    )
    .await?;
    e2e.wait_healthy(&clusters, "denied", None, STARTUP).await?;
    e2e.wait_healthy(&clusters, "allowed", None, STARTUP)
        .await?;

    // The refused key: the condition says why, a BackupJob fails naming the Secret.
    let condition = |name: &'static str| {
        let clusters = clusters.clone();
        async move {
            let cluster = clusters.get(name).await?;
            let found = cluster
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "ContinuousArchiving");
            Ok::<_, anyhow::Error>(found.map(|c| (c.status, c.reason, c.message)))
        }
    };
    for name in ["denied", "allowed"] {
        let rw = e2e.service_port(namespace, &api::contract::rw_service(name))?;
        let password = superuser_login(&client, namespace, name).await?;
        connect_when_served(rw, &password)
            .await?
            .batch_execute("CREATE TABLE t (id int); SELECT pg_switch_wal()")
            .await?;
    }
    let (_, reason, message) = eventually(
        "the denied cluster's archiving to fail",
        Duration::from_secs(120),
        || async {
            Ok(match condition("denied").await? {
                Some((status, reason, message))
                    if status == "False" && reason == "ArchivingFailing" =>
                {
                    Ok((status, reason, message))
                }
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    assert!(
        message.contains("SignatureDoesNotMatch")
            || message.contains("AccessDenied")
            || message.contains("InvalidAccessKeyId"),
        "{reason}: {message}"
    );
    eventually(
        "the allowed cluster to archive",
        Duration::from_secs(120),
        || async {
            Ok(match condition("allowed").await? {
                Some((status, _, _)) if status == "True" => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;

    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    backup_job(&client, namespace, "denied-backup", "denied").await?;
    backup_job(&client, namespace, "allowed-backup", "allowed").await?;
    completed(&jobs, "allowed-backup").await?;
    let failed = eventually(
        "the denied BackupJob to fail",
        Duration::from_secs(180),
        || async {
            let status = jobs.get("denied-backup").await?.status.unwrap_or_default();
            Ok(match status.phase.as_deref() {
                Some("Failed") => Ok(status),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    let reason = failed.failure_reason.unwrap_or_default();
    assert!(
        reason.contains("refused the credentials") && reason.contains("credentialsSecret"),
        "the failure says what to fix: {reason}"
    );
    let shown = visible_text(&client, namespace).await?;
    assert!(
        !shown.contains(&key.secret_access_key) && !shown.contains(&wrong_secret),
        "a secret key in a status or an event"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_cluster_is_not_bootstrapped_into_a_repository_that_holds_wal() -> anyhow::Result<()>
{
    let e2e = stack()?;
    let client = e2e.client().await?;
    let store = common::backup::store(&e2e)?;
    // Two clusters of one name in two namespaces, with the same repository: the second would
    // archive into the first one's folder.
    let spec =
        json!({"backup": {"s3": common::backup::s3(store, "shared")}, "failover": calm_failover()});
    let (first, second) = ("e2e-repository-first", "e2e-repository-second");
    for namespace in [first, second] {
        testbed::manifests::apply(
            &client,
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
            namespace,
        )
        .await?;
        common::backup::credentials(&client, namespace).await?;
    }
    let clusters = create_cluster(&client, first, "twin", spec.clone()).await?;
    e2e.wait_healthy(&clusters, "twin", None, STARTUP).await?;
    let rw = e2e.service_port(first, &api::contract::rw_service("twin"))?;
    let password = superuser_login(&client, first, "twin").await?;
    common::backup::archive_current_wal(rw, &password).await?;

    let refused = create_cluster(&client, second, "twin", spec).await?;
    let refusal = eventually(
        "the second cluster's ContinuousArchiving condition to say the repository is in use",
        STARTUP,
        || async {
            let cluster = refused.get("twin").await?;
            let found = cluster
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "ContinuousArchiving");
            Ok(match found {
                Some(c) if c.reason == "ArchiveNotEmpty" => Ok(c.message),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await;
    let message = match refusal {
        Ok(message) => message,
        Err(error) => anyhow::bail!("{error:#}\n{}", e2e.cluster_logs(second, "twin", 1)),
    };
    assert!(
        message.contains("s3://e2e-backups/shared/twin") && message.contains("spec.backup.s3.path"),
        "the condition names the folder and what to change: {message}"
    );
    let warned = eventually(
        "a Warning event ArchiveNotEmpty",
        Duration::from_secs(60),
        || async {
            let events =
                Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), second)
                    .list(&Default::default())
                    .await?;
            let reasons: Vec<String> = events.iter().filter_map(|e| e.reason.clone()).collect();
            Ok(events
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("ArchiveNotEmpty")
                        && e.type_.as_deref() == Some("Warning")
                })
                .and_then(|e| e.message)
                .ok_or_else(|| format!("{reasons:?}")))
        },
    )
    .await?;
    assert!(warned.contains("already holds"), "{warned}");
    // Nothing was bootstrapped there: no primary.
    let status = refused.get("twin").await?.status.unwrap_or_default();
    assert_eq!(status.current_primary, None, "{status:?}");
    assert_ne!(status.phase.as_deref(), Some("Healthy"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_behind_a_private_ca_is_trusted_through_ca_secret() -> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-backup-ca";
    let host = e2e
        .host_address()
        .ok_or_else(|| anyhow::anyhow!("the node agent is not running"))?;
    let logs = tempfile::tempdir()?;
    let (tls, ca) = S3Server::start_tls(logs.path(), host.into(), &["private-ca"])?;
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        namespace,
    )
    .await?;
    common::backup::credentials(&client, namespace).await?;
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "store-ca", "namespace": namespace},
                "stringData": {"ca.crt": ca}}),
        namespace,
    )
    .await?;
    let store = |path: &str, ca: bool| {
        let mut s3 = json!({"endpoint": tls.direct_endpoint(), "bucket": "private-ca", "path": path,
                            "credentialsSecret": {"name": "store-credentials"}});
        if ca {
            s3["caSecret"] = json!({"name": "store-ca"});
        }
        json!({"backup": {"s3": s3}, "failover": calm_failover()})
    };
    let clusters = create_cluster(&client, namespace, "trusted", store("trusted", true)).await?;
    create_cluster(&client, namespace, "untrusted", store("untrusted", false)).await?;
    for name in ["trusted", "untrusted"] {
        e2e.wait_healthy(&clusters, name, None, STARTUP).await?;
        let rw = e2e.service_port(namespace, &api::contract::rw_service(name))?;
        let password = superuser_login(&client, namespace, name).await?;
        connect_when_served(rw, &password)
            .await?
            .batch_execute("CREATE TABLE t (id int); SELECT pg_switch_wal()")
            .await?;
    }
    let archiving = |name: &'static str| {
        let clusters = clusters.clone();
        async move {
            let found = clusters
                .get(name)
                .await?
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "ContinuousArchiving");
            Ok::<_, anyhow::Error>(found.map(|c| (c.status, c.reason, c.message)))
        }
    };
    eventually(
        "the cluster given the CA to archive over TLS",
        Duration::from_secs(120),
        || async {
            Ok(match archiving("trusted").await? {
                Some((status, _, _)) if status == "True" => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    let (_, _, message) = eventually(
        "the cluster without the CA to fail verifying the store",
        Duration::from_secs(120),
        || async {
            Ok(match archiving("untrusted").await? {
                Some((status, reason, message))
                    if status == "False" && reason == "ArchivingFailing" =>
                {
                    Ok((status, reason, message))
                }
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await?;
    assert!(message.to_lowercase().contains("certificate"), "{message}");
    let jobs: Api<api::BackupJob> = Api::namespaced(client.clone(), namespace);
    backup_job(&client, namespace, "over-tls", "trusted").await?;
    completed(&jobs, "over-tls").await?;
    Ok(())
}
