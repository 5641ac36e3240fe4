//! Planned switchover: the primary hands the Lease to a chosen replica (pause, checkpoint, demote,
//! write the hand-over LSN), and the replica it names promotes once it has received that WAL.
//! Apart from the run loop because a handover is one multi-step protocol between two managers,
//! read and changed on its own.

use super::*;

impl Manager {
    pub(super) async fn promote_handed_over(&mut self) -> Result<()> {
        let Some(local) = self.local.clone() else {
            return Ok(());
        };
        let wanted = self
            .lease
            .annotation(contract::ANNOTATION_SWITCHOVER_LSN)
            .and_then(|lsn| decision::parse_lsn(&lsn));
        if let Some(wanted) = wanted
            && local.position().is_none_or(|position| position <= wanted)
            && !self.receives_past(wanted).await
        {
            debug!(wanted = %decision::format_lsn(wanted), "waiting for the old primary's last WAL");
            return Ok(());
        }
        info!("the Lease was handed over: promoting");
        self.acquire().await?;
        let previous = self.other_pods();
        self.promote(previous).await
    }

    /// Whether this replica receives WAL past `wanted` within [`HANDOVER_WAL_WAIT`], asked every
    /// 20 ms: the old primary's last WAL usually arrives within milliseconds of the hand-over,
    /// and waiting for the next tick (250 ms) would add to the clients' pause.
    pub(super) async fn receives_past(&self, wanted: u64) -> bool {
        let Ok(client) = self.postgres.connect().await else {
            return false;
        };
        let deadline = Instant::now() + HANDOVER_WAL_WAIT;
        while Instant::now() < deadline {
            let received = client
                .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
                .await
                .ok()
                .and_then(|row| row.get::<_, Option<String>>(0))
                .and_then(|lsn| decision::parse_lsn(&lsn));
            if received.is_some_and(|position| position > wanted) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub(super) async fn switchover(&mut self, target: String) -> Result<()> {
        if target == self.me() || self.member(&target).is_none() {
            warn!(%target, "switchover target is this primary or not a member; clearing the request");
            return self.clear_switchover_request().await;
        }
        let client = self.postgres.connect().await?;
        let application = quote::slot_name(&target);
        let streaming = client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&application],
            )
            .await
            .map_err(Error::postgres("checking the switchover target streams"))?
            .is_some();
        if !streaming {
            let since = match &self.switchover_since {
                Some((name, at)) if *name == target => *at,
                _ => {
                    let now = Instant::now();
                    self.switchover_since = Some((target.clone(), now));
                    now
                }
            };
            if since.elapsed() > Duration::from_secs(self.config.switchover_timeout_seconds) {
                warn!(%target, "switchover target never streamed; abandoning the switchover");
                self.switchover_since = None;
                return self.clear_switchover_request().await;
            }
            return Ok(());
        }
        self.switchover_since = None;
        // Checkpoint while clients still run, so that the shutdown checkpoint inside the pause
        // has little left to write: the pause lasts the stop, the hand-over and the promotion.
        client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(Error::postgres("CHECKPOINT before the switchover"))?;
        // Clients of the Poolers wait in PgBouncer instead of failing: paused before the stop,
        // resumed once the rw Service reaches a writable primary again (this one, if the
        // hand-over fails), or when the pause timeout runs out.
        let paused = self.poolers.pause().await;
        let result = self.hand_over(target, client).await;
        if let Some(paused) = paused {
            self.poolers.resume_when_writable(paused);
        }
        result
    }

    /// The second half of a switchover (checkpointed, poolers paused): stop, write the standby
    /// configuration, hand the Lease to `target`, start as its replica.
    pub(super) async fn hand_over(
        &mut self,
        target: String,
        client: tokio_postgres::Client,
    ) -> Result<()> {
        info!(%target, "switchover: stop and hand over the Lease");
        drop(client);
        let upstream = self.upstream_of(&target)?;
        // Giving up the role on purpose: the clean shutdown must not be cut short.
        self.watchdog.guard(None);
        self.postgres.stop(StopMode::Fast).await;
        // A designated primary (replica cluster) wrote nothing: the target replays the source's
        // archive from where it is, there is no last WAL of this one's to wait for.
        let lsn = if self.follows_source() {
            None
        } else {
            match self.postgres.shutdown_checkpoint_lsn().await {
                Ok(lsn) => Some(lsn),
                Err(error) => {
                    warn!(%error, "no clean shutdown checkpoint; staying primary");
                    self.start_primary().await?;
                    return Err(error);
                }
            }
        };
        self.postgres.write_config(
            &ManagedSettings {
                upstream: Some(upstream.clone()),
                synchronous_standby_names: String::new(),
            },
            true,
            &self.replication.username,
        )?;
        self.followed = Some(upstream);
        let mut handed = lease::claimed(
            self.lease.lease(),
            &self.cluster.lease_name(),
            &self.config.namespace,
            Some(&target),
            self.config.lease_duration(),
        );
        lease::annotate(
            &mut handed,
            &[
                (contract::ANNOTATION_SWITCHOVER_TO, None),
                (contract::ANNOTATION_SWITCHOVER_LSN, lsn.clone()),
            ],
        );
        let mut outcome = self.cluster.replace_lease(&handed).await;
        // Fault injection for tests: the API server applies the hand-over, its answer is lost.
        if outcome.is_ok() && std::env::var(FAULT_ENV).as_deref() == Ok("lose_handover_answer") {
            outcome = Err(Error::Invalid(
                "fault injection: the hand-over's answer is lost".into(),
            ));
        }
        let written = match outcome {
            Ok(written) => written,
            Err(error) => match self.handed_over_after_all(&target, lsn.as_deref()).await {
                // The API server applied the update but its answer was lost (a reset
                // connection): the target promotes, so this instance must not.
                Some(written) => written,
                None => return Err(error),
            },
        };
        self.lease.observe(Some(written), Instant::now());
        info!(%target, lsn = ?lsn, "Lease handed over; restarting as a replica");
        self.role = Role::Replica {
            upstream: Some(target),
        };
        self.last_renewal = None;
        self.last_join = Some("switchover".into());
        self.postgres.start(Duration::from_secs(60)).await
    }

    /// After a failed hand-over write, whether the Lease went to `target` anyway: the write may
    /// have been applied with its answer lost. Only a Lease read back that is still this
    /// instance's makes it primary again; when it cannot be read, PostgreSQL stays stopped and
    /// the next tick resolves the role from the Lease, since restarting as primary while the
    /// target may be promoting would make two writable primaries.
    pub(super) async fn handed_over_after_all(
        &mut self,
        target: &str,
        lsn: Option<&str>,
    ) -> Option<Lease> {
        match self.cluster.get_lease().await {
            Ok(Some(current))
                if current
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(target)
                    && lease::annotation_of(&current, contract::ANNOTATION_SWITCHOVER_LSN)
                        == lsn =>
            {
                info!(%target, "the Lease hand-over was applied although its answer was lost");
                Some(current)
            }
            Ok(current) => {
                warn!("handing over the Lease failed; staying primary");
                self.lease.observe(current, Instant::now());
                if let Err(error) = self.start_primary().await {
                    warn!(%error, "starting again as primary failed");
                }
                None
            }
            Err(error) => {
                warn!(%error, "handing over the Lease failed and the Lease cannot be read: staying stopped until it can");
                self.role = Role::Pending;
                None
            }
        }
    }

    pub(super) async fn clear_switchover_request(&mut self) -> Result<()> {
        let Some(mut current) = self.lease.lease().cloned() else {
            return Ok(());
        };
        lease::annotate(&mut current, &[(contract::ANNOTATION_SWITCHOVER_TO, None)]);
        let written = self.cluster.replace_lease(&current).await?;
        self.lease.observe(Some(written), Instant::now());
        Ok(())
    }
}
