//! Base backups on request: the operator asks an instance (over HTTP, see [`super::http`]) to
//! take a backup named after its BackupJob; the run goes on in the background and its state is
//! read back by name. The state lives in memory only: when the instance manager restarts, the
//! run is gone and the operator fails the job (a clean failure; the next job starts afresh).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::backup::archiver::ArchiveState;
use crate::backup::engine::{BackupInfo, LocalServer};
use crate::backup::metrics::BackupMetrics;
use crate::backup::{BackupSetup, Store, backup_wal};
use crate::error::{Error, Result};

/// Where a base backup run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupPhase {
    /// Being taken.
    Running,
    /// In the repository.
    Completed,
    /// Failed; `error` says why.
    Failed,
}

/// One base backup run on this instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupRun {
    /// Name (the BackupJob's).
    pub name: String,
    /// Phase.
    pub phase: BackupPhase,
    /// Role of this instance when the run started (`primary` or `replica`).
    pub taken_from: String,
    /// Start (RFC 3339).
    pub started_at: String,
    /// End (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// The backup, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupInfo>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Base backups of this instance, and what the HTTP endpoints read.
pub struct BackupService {
    /// The backup configuration.
    pub setup: Arc<BackupSetup>,
    /// The archiver's state.
    pub archive: Arc<ArchiveState>,
    server: LocalServer,
    /// `pg_wal`, where a backup's own WAL is read when nothing archives it continuously.
    wal_dir: std::path::PathBuf,
    metrics: BackupMetrics,
    runs: Mutex<BTreeMap<String, BackupRun>>,
    /// One base backup at a time: barman names a backup by the second it starts, so two started
    /// in the same second (a ScheduledBackup's `immediate` job late under load, and its first
    /// tick) would write the same files in the repository and both report that one backup.
    one_at_a_time: tokio::sync::Mutex<()>,
    role: Mutex<String>,
    /// When the repository was last found in use (the check is not repeated every tick).
    refused_at: Mutex<Option<(std::time::Instant, String)>>,
    /// A replica cluster's distance to its source's archive (designated primary only).
    source_lag: Mutex<Option<crate::backup::source_lag::SourceArchiveLag>>,
}

impl BackupService {
    /// A service that backs up the server reached through `server`, whose WAL is in `wal_dir`.
    pub fn new(
        setup: Arc<BackupSetup>,
        archive: Arc<ArchiveState>,
        server: LocalServer,
        wal_dir: std::path::PathBuf,
        metrics: BackupMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            setup,
            archive,
            server,
            wal_dir,
            metrics,
            runs: Mutex::new(BTreeMap::new()),
            one_at_a_time: tokio::sync::Mutex::new(()),
            role: Mutex::new(String::new()),
            refused_at: Mutex::new(None),
            source_lag: Mutex::new(None),
        })
    }

    /// The last measure of the replica cluster's distance to its source's archive.
    pub fn source_lag(&self) -> Option<crate::backup::source_lag::SourceArchiveLag> {
        self.source_lag.lock().ok()?.clone()
    }

    /// Records (or forgets, with `None`) the distance to the source's archive.
    pub fn set_source_lag(&self, lag: Option<crate::backup::source_lag::SourceArchiveLag>) {
        if let Ok(mut current) = self.source_lag.lock() {
            *current = lag;
        }
    }

    /// Records the current role (`primary`, `replica`, ...) and whether PostgreSQL serves.
    pub fn set_role(&self, role: &str, serving: bool) {
        if let Ok(mut current) = self.role.lock() {
            *current = if serving {
                role.to_string()
            } else {
                String::new()
            };
        }
    }

    fn role(&self) -> String {
        self.role
            .lock()
            .map(|role| role.clone())
            .unwrap_or_default()
    }

    /// The run named `name`.
    pub fn get(&self, name: &str) -> Option<BackupRun> {
        self.runs.lock().ok()?.get(name).cloned()
    }

    /// Starts a base backup named `name` (or returns the run of that name if there is one).
    pub fn start(self: &Arc<Self>, name: &str) -> Result<BackupRun> {
        let Some(store) = self.setup.repository.clone() else {
            return Err(Error::Invalid(
                "this cluster has no backup repository: set spec.backup".into(),
            ));
        };
        if let Some(existing) = self.get(name) {
            return Ok(existing);
        }
        let role = self.role();
        if role != api::contract::role::PRIMARY && role != api::contract::role::REPLICA {
            return Err(Error::Invalid(format!(
                "this instance cannot take a backup now: PostgreSQL is not serving as primary or replica (role: {})",
                if role.is_empty() { "none" } else { &role }
            )));
        }
        let run = BackupRun {
            name: name.to_string(),
            phase: BackupPhase::Running,
            taken_from: role,
            started_at: k8s_openapi::jiff::Timestamp::now().to_string(),
            completed_at: None,
            backup: None,
            error: None,
        };
        if let Ok(mut runs) = self.runs.lock() {
            runs.insert(name.to_string(), run.clone());
        }
        let service = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let turn = service.one_at_a_time.lock().await;
            info!(backup = %name, destination = %store.destination(), "base backup started");
            let result = service.take_backup(&store, &name).await;
            let completed_at = Some(k8s_openapi::jiff::Timestamp::now().to_string());
            if let Ok(mut runs) = service.runs.lock()
                && let Some(run) = runs.get_mut(&name)
            {
                run.completed_at = completed_at;
                match result {
                    Ok(backup) => {
                        info!(backup = %name, id = %backup.backup_id, "base backup completed");
                        service.metrics.backups_completed.inc();
                        service.metrics.last_backup_time.set(
                            k8s_openapi::jiff::Timestamp::now().as_millisecond() as f64 / 1000.0,
                        );
                        run.phase = BackupPhase::Completed;
                        run.backup = Some(backup);
                    }
                    Err(error) => {
                        warn!(backup = %name, %error, "base backup failed");
                        service.metrics.backups_failed.inc();
                        run.phase = BackupPhase::Failed;
                        run.error = Some(error.to_string());
                    }
                }
            }
            // The next backup starts in a later second, hence under another name.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            drop(turn);
        });
        Ok(run)
    }

    /// Takes the base backup; without continuous archiving, uploads the WAL it needs too.
    async fn take_backup(&self, store: &Store, name: &str) -> Result<BackupInfo> {
        let backup = self.setup.engine.backup(store, &self.server, name).await?;
        if self.setup.wal_archiving {
            return Ok(backup);
        }
        let (Some(begin), Some(end)) = (&backup.begin_wal, &backup.end_wal) else {
            return Err(Error::Invalid(format!(
                "backup {} is listed without its WAL range: it cannot be made restorable without WAL archiving",
                backup.backup_id
            )));
        };
        let files = backup_wal::files_for_backup(&self.wal_dir, begin, end)?;
        for file in &files {
            self.setup
                .engine
                .archive_wal(store, &self.wal_dir.join(file))
                .await?;
        }
        info!(backup = %name, files = files.len(), "uploaded the WAL the backup needs (walArchiving is off)");
        Ok(backup)
    }

    /// The backups in the repository, oldest first.
    pub async fn list(&self) -> Result<Vec<BackupInfo>> {
        let store = self.setup.repository.as_ref().ok_or_else(|| {
            Error::Invalid("this cluster has no backup repository: set spec.backup".into())
        })?;
        self.setup.engine.list(store).await
    }

    /// Before a new cluster is bootstrapped (initdb or a restore): its repository must not hold
    /// backups or WAL already, or two clusters' WAL would mix in one folder (and a restore from
    /// it would replay the wrong history). A refusal is an error whose text says what to do, and
    /// the archive status's `refused` (the operator's `ContinuousArchiving` condition); it is
    /// checked again every 15 s. A store that cannot be read does not stop the bootstrap:
    /// archiving reports that failure itself.
    pub async fn check_repository_unused(&self) -> Result<()> {
        const RECHECK: std::time::Duration = std::time::Duration::from_secs(15);
        let Some(store) = self
            .setup
            .repository
            .as_ref()
            .filter(|_| self.setup.wal_archiving)
        else {
            return Ok(());
        };
        if let Ok(refused) = self.refused_at.lock()
            && let Some((at, message)) = refused.as_ref()
            && at.elapsed() < RECHECK
        {
            return Err(Error::Invalid(message.clone()));
        }
        match self.setup.engine.data_in(store).await {
            Ok(None) => {
                self.archive.set_refused(None);
                if let Ok(mut refused) = self.refused_at.lock() {
                    *refused = None;
                }
                Ok(())
            }
            Ok(Some(found)) => {
                let message = format!(
                    "not bootstrapping: the backup repository {}/{} already holds {found}, from another cluster or an earlier one of this name; archiving there would mix two clusters' WAL. Point spec.backup.s3.path (or bucket) at an empty location, or empty that one",
                    store.destination(),
                    store.server_name
                );
                warn!(repository = %store.destination(), %found, "refusing to bootstrap into a repository in use");
                self.archive.set_refused(Some(message.clone()));
                if let Ok(mut refused) = self.refused_at.lock() {
                    *refused = Some((std::time::Instant::now(), message.clone()));
                }
                Err(Error::Invalid(message))
            }
            Err(error) => {
                warn!(%error, "cannot check that the backup repository is empty; bootstrapping anyway (archiving reports its failures)");
                Ok(())
            }
        }
    }

    /// Applies the retention policy (`spec.backup.retention`); returns the engine's report.
    pub async fn apply_retention(&self) -> Result<String> {
        let store = self.setup.repository.as_ref().ok_or_else(|| {
            Error::Invalid("this cluster has no backup repository: set spec.backup".into())
        })?;
        let policy = self.setup.retention.as_deref().ok_or_else(|| {
            Error::Invalid("spec.backup.retention is not `<n>d`, `<n>w` or `<n>m`".into())
        })?;
        self.setup.engine.delete_expired(store, policy).await
    }
}
