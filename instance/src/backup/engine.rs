//! The one interface the instance manager drives backups through. Each variant is an engine we
//! can run; today barman-cloud (pgBackRest 2.45, the one the registries serve, predates
//! PostgreSQL 18). A new engine is a new variant and its module.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backup::barman::BarmanCloud;
use crate::backup::store::{Store, Target};
use crate::backup::wal_uploader::WalUploader;
use crate::error::Result;

/// A backup engine.
#[derive(Clone, Debug)]
pub enum Engine {
    /// barman-cloud (`barman-cloud-*` commands).
    BarmanCloud(BarmanCloud),
}

/// How the engine reaches the local PostgreSQL (Unix socket, superuser).
#[derive(Clone, Debug)]
pub struct LocalServer {
    /// Socket folder.
    pub socket_dir: String,
    /// Port.
    pub port: u16,
    /// Superuser name.
    pub user: String,
}

/// One base backup in the repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupInfo {
    /// Backup id in the repository (what `spec.bootstrap.recovery.backupId` takes).
    pub backup_id: String,
    /// Name given when it was taken (the BackupJob's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// WAL location where it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_lsn: Option<String>,
    /// WAL location where it ends (recovery must replay up to here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    /// First WAL segment it needs (`000000010000000000000003`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_wal: Option<String>,
    /// Last WAL segment it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_wal: Option<String>,
    /// Start time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_time: Option<String>,
    /// End time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// Size of the database files it holds, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Timeline it was taken on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Engine status (`DONE`, `FAILED`, ...).
    #[serde(default)]
    pub status: String,
}

impl Engine {
    /// The `restore_command` that fetches WAL from `store` (run by PostgreSQL, as its user).
    pub fn restore_command(&self, store: &Store) -> String {
        match self {
            Self::BarmanCloud(barman) => barman.restore_command(store, None),
        }
    }

    /// The `restore_command` of a bootstrap recovery: as [`Self::restore_command`], fetching
    /// the next segments ahead into `spool` (when it exists) and serving them from there.
    pub fn restore_command_with_prefetch(&self, store: &Store, spool: &Path) -> String {
        match self {
            Self::BarmanCloud(barman) => barman.restore_command(store, Some(spool)),
        }
    }

    /// What `store`'s WAL archive holds past the segment `after` (a replica cluster's distance
    /// to its source).
    pub async fn archive_tail(
        &self,
        store: &Store,
        after: &str,
    ) -> Result<crate::backup::source_lag::ArchiveTail> {
        match self {
            Self::BarmanCloud(barman) => barman.archive_tail(store, after).await,
        }
    }

    /// Uploads one WAL file (segment, `.partial` or `.history`).
    pub async fn archive_wal(&self, store: &Store, wal: &Path) -> Result<()> {
        match self {
            Self::BarmanCloud(barman) => barman.archive_wal(store, wal).await,
        }
    }

    /// A long-lived uploader of WAL files to `store` (one process for many files, started with
    /// the first).
    pub fn wal_uploader(&self, store: &Store) -> WalUploader {
        match self {
            Self::BarmanCloud(barman) => WalUploader::new(barman.clone(), store.clone()),
        }
    }

    /// Takes an online base backup of the local server, labelled `name`.
    pub async fn backup(
        &self,
        store: &Store,
        server: &LocalServer,
        name: &str,
    ) -> Result<BackupInfo> {
        match self {
            Self::BarmanCloud(barman) => barman.backup(store, server, name).await,
        }
    }

    /// The backups in `store`, oldest first.
    pub async fn list(&self, store: &Store) -> Result<Vec<BackupInfo>> {
        match self {
            Self::BarmanCloud(barman) => barman.list(store).await,
        }
    }

    /// Downloads a backup into the (empty) data directory: `backup_id`, or the one the target
    /// needs (the latest before it), or the latest.
    pub async fn restore(
        &self,
        store: &Store,
        backup_id: Option<&str>,
        target: Option<&Target>,
        pgdata: &Path,
    ) -> Result<()> {
        match self {
            Self::BarmanCloud(barman) => barman.restore(store, backup_id, target, pgdata).await,
        }
    }

    /// Deletes the backups (and the WAL only they need) outside the retention policy, never the
    /// base backup the recovery window starts from; returns the engine's report.
    pub async fn delete_expired(&self, store: &Store, policy: &str) -> Result<String> {
        match self {
            Self::BarmanCloud(barman) => barman.delete_expired(store, policy).await,
        }
    }

    /// What the cluster's folder in `store` already holds (base backups or WAL), `None` when it
    /// is empty; an error when the store cannot be read (a missing bucket, refused keys).
    pub async fn data_in(&self, store: &Store) -> Result<Option<String>> {
        match self {
            Self::BarmanCloud(barman) => {
                // The listing fails on a missing bucket, before the WAL check could create it.
                let backups = barman.list(store).await?;
                if let Some(first) = backups.first() {
                    return Ok(Some(format!(
                        "{} base backup(s) (the oldest {})",
                        backups.len(),
                        first.backup_id
                    )));
                }
                if !barman.wal_archive_empty(store).await? {
                    return Ok(Some("archived WAL".to_string()));
                }
                Ok(None)
            }
        }
    }

    /// Whether `store` can be written (bucket exists, credentials accepted).
    pub async fn check(&self, store: &Store) -> Result<()> {
        match self {
            Self::BarmanCloud(barman) => barman.check(store).await,
        }
    }
}
