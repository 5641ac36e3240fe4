//! Starting PostgreSQL in its role: a new cluster from a backup, a replica rejoining (rewind) or
//! re-cloned from its upstream, a primary or replica start. Apart from the run loop because these
//! are the long-running steps `act` hands off to, each one a sequence on the data directory.

use super::*;
use crate::backup::BackupSetup;

impl Manager {
    pub(super) fn recovery(&self) -> Option<Recovery> {
        self.backup
            .as_ref()
            .and_then(|backup| backup.setup.recovery.clone())
    }

    /// A replica cluster (`spec.replica.enabled`): the primary is a designated primary, a standby
    /// replaying the recovery source's WAL archive, and taking over never promotes PostgreSQL.
    pub(super) fn follows_source(&self) -> bool {
        self.backup
            .as_ref()
            .is_some_and(|backup| backup.setup.follows_source)
    }

    /// Creates the cluster from a backup (`spec.bootstrap.recovery`): download, archive recovery
    /// up to the target, promotion; the Lease is renewed while PostgreSQL replays.
    pub(super) async fn bootstrap_from_backup(&mut self, recovery: Recovery) -> Result<()> {
        let Some(setup) = self.backup.as_ref().map(|backup| backup.setup.clone()) else {
            return Ok(());
        };
        let marker = self.config.run_dir().join(RESTORE_MARKER);
        std::fs::write(&marker, b"").map_err(Error::io("writing the restore marker"))?;
        info!(
            source = %recovery.store.destination(),
            source_cluster = %recovery.store.server_name,
            backup = ?recovery.backup_id,
            target = ?recovery.target,
            "bootstrapping the cluster from a backup"
        );
        self.postgres.stop(StopMode::Fast).await;
        self.postgres.empty_data_dir()?;
        recovery::download(&setup, &recovery, self.postgres.pgdata(), MANAGED_CONFIG).await?;
        self.recover_restored(&setup, &recovery, &marker).await
    }

    /// The archive recovery of restored data (`recovery.signal` written): a replica cluster's
    /// designated primary starts replaying with no end; any other cluster replays to the target
    /// (or the archive's end), promotes and then archives to its own repository. `marker` goes
    /// once that is done.
    async fn recover_restored(
        &mut self,
        setup: &BackupSetup,
        recovery: &Recovery,
        marker: &std::path::Path,
    ) -> Result<()> {
        if setup.follows_source {
            return self.start_designated_after_restore(marker).await;
        }
        let mut settings = setup.archive_settings();
        settings.extend(recovery.settings(setup));
        self.postgres.set_backup_settings(settings);
        let managed = ManagedSettings {
            upstream: None,
            synchronous_standby_names: String::new(),
        };
        self.postgres
            .write_config(&managed, false, &self.replication.username)?;
        self.acquire().await?;
        self.postgres.start(Duration::from_secs(3600)).await?;
        loop {
            if !self.postgres.is_running() {
                return Err(Error::Invalid(
                    "PostgreSQL stopped during the recovery (is the target inside the archived WAL, after the backup? see its log)".into(),
                ));
            }
            if let Ok(client) = self.postgres.connect().await
                && let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await
                && !row.get::<_, bool>(0)
            {
                break;
            }
            self.acquire().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        info!("recovery finished and promoted: archiving to this cluster's own repository");
        self.postgres.set_backup_settings(setup.archive_settings());
        self.postgres
            .write_config(&managed, false, &self.replication.username)?;
        self.postgres.signal(Signal::SIGHUP);
        self.roles.reset();
        let _ = std::fs::remove_file(marker);
        Ok(())
    }

    /// Starts the data a Job restored from a BackupJob's volume (`spec.bootstrap.volume`) as
    /// the new cluster's first primary: the copy's backup_label makes PostgreSQL replay the WAL
    /// the backup holds, up to the backup's end, and the cluster goes on from there. The
    /// marker goes once the Lease is ours (a restart then finds its own Lease).
    ///
    /// With `spec.bootstrap.recovery` as well (CloudNativePG's recovery from a volume snapshot
    /// plus a WAL archive), the data is an archive recovery's starting point instead: the
    /// source's WAL is replayed from the backup's end to the target and the cluster promoted,
    /// or, in a replica cluster, followed with no end. A restart in the middle finds the marker
    /// and its own Lease (`resuming`) and starts that recovery again from PostgreSQL's last
    /// restartpoint; the own repository is not checked again then (the recovery may have
    /// archived into it already).
    pub(super) async fn start_restored_volume(
        &mut self,
        marker: &std::path::Path,
        resuming: bool,
    ) -> Result<Role> {
        self.acquire().await?;
        if let Some(backup) = self.backup.as_ref().filter(|_| !resuming) {
            backup.check_repository_unused().await?;
        }
        // A restart after the promotion but before the marker went: the replay is over.
        let replayed = resuming && crate::volume_backup::recovery_finished(self.postgres.pgdata());
        if let (Some(setup), Some(recovery), false) = (
            self.backup.as_ref().map(|backup| backup.setup.clone()),
            self.recovery(),
            replayed,
        ) {
            info!(
                source = %recovery.store.destination(),
                source_cluster = %recovery.store.server_name,
                target = ?recovery.target,
                "replaying the source's WAL archive on the data restored from a backup volume"
            );
            if !setup.follows_source {
                self.roles.new_cluster();
            }
            self.postgres.stop(StopMode::Fast).await;
            recovery::ask_for_archive_recovery(&setup, self.postgres.pgdata(), MANAGED_CONFIG)?;
            self.recover_restored(&setup, &recovery, marker).await?;
            self.last_join = Some("restore".into());
            return Ok(Role::Primary);
        }
        info!("starting the data restored from a backup volume as the new cluster's primary");
        self.roles.new_cluster();
        self.start_primary().await?;
        let _ = std::fs::remove_file(marker);
        self.last_join = Some("restore".into());
        Ok(Role::Primary)
    }

    /// A designated primary's configuration: a standby with no upstream (it replays the source's
    /// archive through `restore_command`) and no synchronous standbys (it commits nothing).
    pub(super) fn write_designated_config(&self) -> Result<()> {
        self.postgres.write_config(
            &ManagedSettings {
                upstream: None,
                synchronous_standby_names: String::new(),
            },
            true,
            &self.replication.username,
        )
    }

    /// The end of a replica cluster's bootstrap: the restored data starts as a standby
    /// (`standby.signal`, not `recovery.signal`) that replays the source's archive with no end.
    async fn start_designated_after_restore(&mut self, marker: &std::path::Path) -> Result<()> {
        let _ = std::fs::remove_file(self.postgres.pgdata().join("recovery.signal"));
        self.write_designated_config()?;
        self.acquire().await?;
        // Accepting connections means consistent: the backup's WAL is replayed.
        self.postgres.start(Duration::from_secs(3600)).await?;
        // Fetching that WAL can outlast the Lease on a loaded machine: renew before the run loop
        // guards this primary, or its watchdog stops PostgreSQL at once (seen in a CI run: the
        // restart then replayed for over 5 s and the instance gave the role up).
        self.acquire().await?;
        info!(
            "restored: the designated primary replays the source's WAL archive (replica cluster)"
        );
        let _ = std::fs::remove_file(marker);
        Ok(())
    }

    /// A former primary becomes a replica of `upstream`: pg_rewind, or a new clone when rewinding
    /// is impossible.
    pub(super) async fn rejoin(&mut self, upstream: &Upstream) -> Result<()> {
        info!(primary = %upstream.host, port = upstream.port, "former primary: running pg_rewind");
        match self.postgres.rewind(upstream).await {
            Ok(output) => {
                info!(output = %output.trim(), "pg_rewind done");
                self.last_join = Some("rewind".into());
            }
            Err(error) => {
                warn!(%error, "pg_rewind failed; cloning the primary again");
                self.reclone(upstream, &format!("pg_rewind failed: {error}"))
                    .await?;
            }
        }
        Ok(())
    }

    /// Replaces the data directory with a new clone of the primary at `upstream`, and says so
    /// (`lastJoin: reclone` in the status, a `Recloned` event on the pod with `why`).
    pub(super) async fn reclone(&mut self, upstream: &Upstream, why: &str) -> Result<()> {
        let note = format!("data directory replaced by a new clone of the primary: {why}");
        let note: String = note.chars().take(1000).collect();
        if let Err(error) = self.cluster.warning_event("Recloned", note).await {
            debug!(%error, "recording the reclone event failed");
        }
        let marker = self.config.run_dir().join("clone-incomplete");
        std::fs::write(&marker, b"").map_err(Error::io("writing the clone marker"))?;
        self.postgres
            .basebackup(upstream, &self.replication.username)
            .await?;
        let _ = std::fs::remove_file(&marker);
        self.last_join = Some("reclone".into());
        Ok(())
    }

    pub(super) async fn start_primary(&mut self) -> Result<()> {
        // A replica cluster's designated primary stays a standby; data that was promoted already
        // (the instance restarted inside the rolling update that promotes the cluster) is not
        // turned back into one: its writes have no place in the source's history.
        let designated = self.follows_source() && self.postgres.is_standby_configured();
        if designated {
            self.write_designated_config()?;
        } else {
            let settings = self.primary_settings();
            self.postgres
                .write_config(&settings, false, &self.replication.username)?;
        }
        self.roles.reset();
        // Not a wait for crash recovery: this server cannot start on the data at all.
        self.postgres.check_major_version().await?;
        self.postgres
            .start(self.config.renew_deadline() / 2)
            .await
            .or_else(|error| {
                // Crash recovery may take longer than a tick; readiness is checked every tick.
                debug!(%error, "primary not ready yet");
                Ok::<(), Error>(())
            })?;
        let _ = self.reconcile_primary().await;
        Ok(())
    }

    pub(super) async fn start_replica(&mut self, upstream: Option<Upstream>) -> Result<()> {
        self.followed = upstream.clone();
        let settings = ManagedSettings {
            upstream,
            synchronous_standby_names: String::new(),
        };
        self.postgres
            .write_config(&settings, true, &self.replication.username)?;
        self.postgres.start(Duration::from_secs(60)).await
    }
}
