//! Bootstrap from a backup (`spec.bootstrap.recovery`): download a base backup into the empty data
//! directory, then let PostgreSQL replay the source's archived WAL up to the target (time, LSN,
//! xid or restore point, `inclusive` honoured) or to the end of the archive, and promote. The
//! source's repository is only read; the new cluster archives to its own.

use std::path::Path;

use crate::backup::BackupSetup;
use crate::backup::store::{Store, Target};
use crate::error::{Error, Result};
use crate::quote;

/// Where and what to recover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The source cluster's repository.
    pub store: Store,
    /// Backup to restore; the latest suitable one when unset.
    pub backup_id: Option<String>,
    /// Point in time to stop at; the end of the archive when unset.
    pub target: Option<Target>,
    /// Stop just after (true) or just before (false) the target.
    pub inclusive: bool,
}

impl Recovery {
    /// From the API type.
    pub fn from_spec(spec: &api::postgres_cluster::RecoveryBootstrap) -> Self {
        Self {
            store: Store::from_spec(
                &spec.source,
                &spec.source_cluster,
                api::backup::instance_env::RECOVERY_AWS_ACCESS_KEY_ID,
                api::backup::instance_env::RECOVERY_AWS_SECRET_ACCESS_KEY,
            ),
            backup_id: spec.backup_id.clone().filter(|id| !id.is_empty()),
            target: spec.target.as_ref().and_then(Target::from_spec),
            inclusive: spec.target.as_ref().is_none_or(|target| target.inclusive),
        }
    }

    /// The PostgreSQL settings of the archive recovery (with `recovery.signal`).
    pub fn settings(&self, setup: &BackupSetup) -> Vec<(String, String)> {
        let mut settings = vec![
            (
                "restore_command".to_string(),
                setup
                    .engine
                    .restore_command_with_prefetch(&self.store, &setup.restore_spool),
            ),
            ("recovery_target_timeline".into(), "latest".into()),
            ("recovery_target_action".into(), "promote".into()),
        ];
        if let Some(target) = &self.target {
            let (name, value) = target.setting();
            settings.push((name.to_string(), value));
            settings.push((
                "recovery_target_inclusive".into(),
                if self.inclusive { "on" } else { "off" }.into(),
            ));
        }
        settings
    }
}

/// Downloads the backup into `pgdata` (emptied by the caller), makes sure the managed
/// configuration is included, and asks for an archive recovery (`recovery.signal`).
pub async fn download(
    setup: &BackupSetup,
    recovery: &Recovery,
    pgdata: &Path,
    managed_config: &str,
) -> Result<()> {
    setup
        .engine
        .restore(
            &recovery.store,
            recovery.backup_id.as_deref(),
            recovery.target.as_ref(),
            pgdata,
        )
        .await?;
    ask_for_archive_recovery(setup, pgdata, managed_config)
}

/// Makes a restored data directory (downloaded, or copied from a volume) ready for an archive
/// recovery: an empty restore spool, the managed configuration included, `recovery.signal`.
pub fn ask_for_archive_recovery(
    setup: &BackupSetup,
    pgdata: &Path,
    managed_config: &str,
) -> Result<()> {
    prepare_restore_spool(&setup.restore_spool, pgdata)
        .map_err(Error::io("preparing the WAL restore spool folder"))?;
    let conf = pgdata.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
    if !text.contains(managed_config) {
        text.push_str(&format!(
            "\n# Settings managed by pg-instance.\ninclude_if_exists = {}\n",
            quote::config_value(managed_config)
        ));
        std::fs::write(&conf, text).map_err(Error::io("writing postgresql.conf"))?;
    }
    for stale in ["postmaster.pid", "standby.signal"] {
        let _ = std::fs::remove_file(pgdata.join(stale));
    }
    std::fs::write(pgdata.join("recovery.signal"), b"")
        .map_err(Error::io("writing recovery.signal"))?;
    Ok(())
}

/// Empties (or creates) the folder where the recovery's `restore_command` keeps the segments it
/// fetched ahead, owned by the user that owns `pgdata` (the one PostgreSQL runs as): files from
/// an earlier recovery must not be replayed into this one.
pub fn prepare_restore_spool(spool: &Path, pgdata: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if spool.exists() {
        std::fs::remove_dir_all(spool)?;
    }
    std::fs::create_dir_all(spool)?;
    std::fs::set_permissions(spool, std::fs::Permissions::from_mode(0o700))?;
    let owner = std::fs::metadata(pgdata)?;
    std::os::unix::fs::chown(spool, Some(owner.uid()), Some(owner.gid()))
}
