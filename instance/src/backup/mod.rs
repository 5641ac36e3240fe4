//! Backups and recovery, run by the instance manager: continuous WAL archiving from the primary
//! (the manager's own parallel archiver, [`archiver`]), base backups on request over HTTP
//! ([`service`]), WAL restore for replicas and recovery (`restore_command`), and the bootstrap of
//! a new cluster from a backup with point-in-time targets ([`recovery`]).
//!
//! The engine that moves the data sits behind [`engine::Engine`]; today it is barman-cloud
//! ([`barman`]), found in one folder (`--barman-bin`). The repository and the recovery source come
//! from the PostgresCluster's `spec.backup` and `spec.bootstrap.recovery`, handed over as JSON in
//! the environment ([`api::backup::instance_env`]); their credentials come from environment
//! variables (the pod takes them from the Secret), never from a command line or a file that
//! PostgreSQL logs.

pub mod archiver;
pub mod backup_wal;
pub mod barman;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod recovery;
pub mod service;
pub mod source_lag;
pub mod store;
pub mod wal_uploader;

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};

pub use engine::Engine;
pub use store::{Store, Target};

/// What the configuration asks of backups: where to archive and back up, and where to recover
/// from at bootstrap.
#[derive(Clone, Debug)]
pub struct BackupSetup {
    /// The engine.
    pub engine: Engine,
    /// The cluster's own repository (`spec.backup`), when configured.
    pub repository: Option<Store>,
    /// Archive WAL continuously to the repository (`spec.backup.walArchiving`).
    pub wal_archiving: bool,
    /// Retention policy of the repository (`spec.backup.retention`), as barman says it
    /// (`RECOVERY WINDOW OF 30 DAYS`).
    pub retention: Option<String>,
    /// Recovery at bootstrap (`spec.bootstrap.recovery`), when configured.
    pub recovery: Option<recovery::Recovery>,
    /// A replica cluster: every instance restores WAL from the recovery source's archive (not
    /// the own repository, which has none yet) and the primary never promotes.
    pub follows_source: bool,
    /// Folder where the archiver leaves a marker per uploaded segment for `archive_command`.
    pub spool: PathBuf,
    /// Folder where a bootstrap recovery's `restore_command` keeps the WAL segments it fetched
    /// ahead (see [`recovery::prepare_restore_spool`]).
    pub restore_spool: PathBuf,
}

impl BackupSetup {
    /// Reads the backup configuration; `None` when neither a repository nor a recovery is set.
    pub fn from_config(config: &Config, ids: Option<(u32, u32)>) -> Result<Option<Arc<Self>>> {
        let repository: Option<api::postgres_cluster::BackupRepositorySpec> = config
            .backup_repository
            .as_deref()
            .filter(|text| !text.trim().is_empty())
            .map(|text| {
                serde_json::from_str(text).map_err(|error| {
                    Error::Invalid(format!(
                        "{} is not a valid spec.backup: {error}",
                        api::backup::instance_env::BACKUP_REPOSITORY
                    ))
                })
            })
            .transpose()?;
        let recovery: Option<api::postgres_cluster::RecoveryBootstrap> = config
            .bootstrap_recovery
            .as_deref()
            .filter(|text| !text.trim().is_empty())
            .map(|text| {
                serde_json::from_str(text).map_err(|error| {
                    Error::Invalid(format!(
                        "{} is not a valid spec.bootstrap.recovery: {error}",
                        api::backup::instance_env::BOOTSTRAP_RECOVERY
                    ))
                })
            })
            .transpose()?;
        if config.replica_cluster && recovery.is_none() {
            return Err(Error::Invalid(format!(
                "{} is set without {}: a replica cluster follows the source it was restored from (spec.bootstrap.recovery)",
                api::backup::instance_env::REPLICA_CLUSTER,
                api::backup::instance_env::BOOTSTRAP_RECOVERY
            )));
        }
        if repository.is_none() && recovery.is_none() {
            return Ok(None);
        }
        let run_dir = config.run_dir();
        let engine = Engine::BarmanCloud(barman::BarmanCloud::new(
            config.barman_bin.clone(),
            ids,
            run_dir.clone(),
        ));
        let store = repository
            .as_ref()
            .map(|spec| {
                Store::from_spec(
                    &spec.s3,
                    &config.cluster,
                    api::backup::instance_env::AWS_ACCESS_KEY_ID,
                    api::backup::instance_env::AWS_SECRET_ACCESS_KEY,
                )
                .with_ca_bundle(
                    &spec.s3,
                    api::backup::instance_env::BACKUP_CA_BUNDLE,
                    &run_dir.join("backup-ca.crt"),
                )
            })
            .transpose()
            .map_err(Error::io("writing the backup repository's CA certificate"))?;
        if let (Some(own), Some(source)) = (&store, &recovery) {
            let source_store = Store::from_spec(
                &source.source,
                &source.source_cluster,
                api::backup::instance_env::RECOVERY_AWS_ACCESS_KEY_ID,
                api::backup::instance_env::RECOVERY_AWS_SECRET_ACCESS_KEY,
            );
            if own.same_location(&source_store) {
                return Err(Error::Invalid(format!(
                    "spec.backup points at {} {}, where the recovery source's WAL lives: archiving there would mix two clusters' WAL; give spec.backup.s3.path another value",
                    own.destination(),
                    own.server_name
                )));
            }
        }
        Ok(Some(Arc::new(Self {
            engine,
            wal_archiving: repository.as_ref().is_some_and(|spec| spec.wal_archiving),
            retention: repository
                .as_ref()
                .and_then(|spec| store::retention_policy(&spec.retention)),
            repository: store,
            follows_source: config.replica_cluster,
            recovery: recovery
                .map(|spec| -> Result<recovery::Recovery> {
                    let mut recovery = recovery::Recovery::from_spec(&spec);
                    recovery.store = recovery
                        .store
                        .with_ca_bundle(
                            &spec.source,
                            api::backup::instance_env::RECOVERY_CA_BUNDLE,
                            &run_dir.join("recovery-ca.crt"),
                        )
                        .map_err(Error::io("writing the recovery source's CA certificate"))?;
                    Ok(recovery)
                })
                .transpose()?,
            spool: run_dir.join("archived"),
            restore_spool: run_dir.join("wal-restore-spool"),
        })))
    }

    /// PostgreSQL settings for archiving and WAL restore from the cluster's own repository.
    pub fn archive_settings(&self) -> Vec<(String, String)> {
        let mut settings = Vec::new();
        let Some(store) = &self.repository else {
            return settings;
        };
        if self.wal_archiving {
            // `always`: replicas archive the WAL they receive too, so a segment the primary had
            // not uploaded when it failed is still archived by the replica that takes over.
            settings.push(("archive_mode".into(), "always".into()));
            settings.push((
                "archive_command".into(),
                archiver::archive_command(&self.spool),
            ));
            // A segment at least every minute, so that point-in-time recovery reaches recent
            // transactions on a quiet cluster.
            settings.push(("archive_timeout".into(), "60s".into()));
        }
        settings.push(("restore_command".into(), self.engine.restore_command(store)));
        settings
    }

    /// PostgreSQL settings of every instance: [`Self::archive_settings`], and in a replica
    /// cluster the source's archive as `restore_command` (the own repository has no WAL of the
    /// source's history; with `archive_mode = always` the designated primary archives what it
    /// replays there, so the own repository is ready when the cluster is promoted).
    pub fn instance_settings(&self) -> Vec<(String, String)> {
        let mut settings = self.archive_settings();
        if let Some(recovery) = self.recovery.as_ref().filter(|_| self.follows_source) {
            settings.retain(|(name, _)| name != "restore_command");
            settings.push((
                "restore_command".into(),
                self.engine.restore_command(&recovery.store),
            ));
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    const REPOSITORY: &str = r#"{"s3": {"endpoint": "http://s3:9000", "bucket": "backups", "path": "dr", "credentialsSecret": {"name": "keys"}}}"#;
    const SOURCE: &str = r#"{"source": {"endpoint": "http://s3:9000", "bucket": "backups", "path": "main", "credentialsSecret": {"name": "keys"}}, "sourceCluster": "main"}"#;

    fn setup_of(replica_cluster: &str, recovery: bool) -> Result<Option<Arc<BackupSetup>>> {
        let mut args = vec![
            "pg-instance",
            "--pod-name",
            "dr-1",
            "--cluster",
            "dr",
            "--pgdata",
            "/nonexistent/dr-1/data",
            "--backup-repository",
            REPOSITORY,
            "--replica-cluster",
            replica_cluster,
        ];
        if recovery {
            args.extend(["--bootstrap-recovery", SOURCE]);
        }
        BackupSetup::from_config(&Config::parse_from(args), None)
    }

    fn restore_command(settings: &[(String, String)]) -> String {
        let commands: Vec<&String> = settings
            .iter()
            .filter(|(name, _)| name == "restore_command")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(commands.len(), 1, "{settings:?}");
        commands[0].clone()
    }

    #[test]
    fn a_replica_cluster_restores_wal_from_its_source_and_archives_to_its_own_repository() {
        let setup = setup_of("true", true).unwrap().unwrap();
        assert!(setup.follows_source);
        let settings = setup.instance_settings();
        let command = restore_command(&settings);
        assert!(command.contains("'s3://backups/main'"), "{command}");
        assert!(command.contains("$RECOVERY_AWS_ACCESS_KEY_ID"), "{command}");
        assert!(
            settings
                .iter()
                .any(|(name, value)| name == "archive_mode" && value == "always"),
            "{settings:?}"
        );

        // An ordinary restored cluster's instances restore from their own repository.
        let own = setup_of("false", true).unwrap().unwrap();
        assert!(!own.follows_source);
        let command = restore_command(&own.instance_settings());
        assert!(command.contains("'s3://backups/dr'"), "{command}");
    }

    #[test]
    fn a_replica_cluster_without_a_recovery_source_is_refused_at_start() {
        let error = setup_of("true", false).unwrap_err().to_string();
        assert!(
            error.contains("REPLICA_CLUSTER is set without BOOTSTRAP_RECOVERY"),
            "{error}"
        );
    }
}
