//! What [`super::run`] prepares before its loop: the Kubernetes client, the cluster's
//! credentials, the backup services.

use std::sync::Arc;
use std::time::Duration;

use api::contract;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tracing::warn;

use crate::backup::BackupSetup;
use crate::backup::archiver::{self, ArchiveState};
use crate::backup::engine::LocalServer;
use crate::backup::service::BackupService;
use crate::cluster::{Cluster, Credentials};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::http::Shared;
use crate::postgres::LocalPostgres;

/// Sets up WAL archiving, WAL restore and the backup endpoints when the cluster has a backup
/// repository or a recovery source; starts the archiver.
pub(super) fn start_backups(
    config: &Config,
    postgres: &mut LocalPostgres,
    shared: &Arc<Shared>,
) -> Result<Option<Arc<BackupService>>> {
    let Some(setup) = BackupSetup::from_config(config, postgres.run_as_ids())? else {
        return Ok(None);
    };
    postgres.set_backup_settings(setup.instance_settings());
    let archive = Arc::new(ArchiveState::default());
    let metrics = shared.metrics.backup.clone();
    tokio::spawn(archiver::run(
        setup.clone(),
        postgres.pgdata().join("pg_wal"),
        archive.clone(),
        metrics.clone(),
        postgres.run_as_ids(),
    ));
    let service = BackupService::new(
        setup,
        archive,
        LocalServer {
            socket_dir: postgres.socket_dir().display().to_string(),
            port: postgres.port(),
            user: postgres.superuser().to_string(),
        },
        postgres.pgdata().join("pg_wal"),
        metrics,
    );
    let _ = shared.backup.set(service.clone());
    Ok(Some(service))
}

pub(super) async fn kube_client(config: &Config, timeout: Duration) -> Result<kube::Client> {
    let invalid = |error: &dyn std::fmt::Display| {
        Error::Invalid(format!("Kubernetes client configuration: {error}"))
    };
    let mut kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| invalid(&e))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| invalid(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| invalid(&e))?,
    };
    kube_config.connect_timeout = Some(timeout);
    kube_config.read_timeout = Some(timeout);
    kube_config.write_timeout = Some(timeout);
    kube::Client::try_from(kube_config).map_err(|e| invalid(&e))
}

/// The cluster's Secrets, read until the superuser's and the replication user's exist.
pub(super) async fn wait_for_credentials(
    cluster: &Cluster,
    config: &Config,
) -> (Credentials, Credentials, Option<Credentials>) {
    loop {
        let superuser = cluster
            .credentials(&contract::superuser_secret(&config.cluster))
            .await;
        let replication = cluster
            .credentials(&contract::replication_secret(&config.cluster))
            .await;
        let app_secret = config
            .app_secret
            .clone()
            .unwrap_or_else(|| contract::app_secret(&config.cluster));
        let app = cluster.credentials(&app_secret).await;
        match (superuser, replication, app) {
            (Ok(Some(superuser)), Ok(Some(replication)), Ok(app)) => {
                return (superuser, replication, app);
            }
            (superuser, replication, app) => {
                let problem = |read: &Result<Option<Credentials>>| match read {
                    Ok(Some(_)) => "found".to_string(),
                    Ok(None) => "not found".to_string(),
                    Err(error) => error.to_string(),
                };
                warn!(
                    superuser = problem(&superuser),
                    replication = problem(&replication),
                    application = problem(&app),
                    %app_secret,
                    "waiting for the cluster's Secrets"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
