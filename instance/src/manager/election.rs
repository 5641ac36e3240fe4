//! Holding the Lease: acquiring and releasing it, the check with the peers before a primary that
//! cannot renew stops, the primary's renewal, and promotion (with its synchronous set). Apart
//! from the run loop because these are the steps whose order keeps a cluster to one primary.

use super::*;

impl Manager {
    /// Takes (or renews) the Lease with an optimistic-concurrency write.
    pub(super) async fn acquire(&mut self) -> Result<()> {
        let started = Instant::now();
        let claimed = lease::claimed(
            self.lease.lease(),
            &self.cluster.lease_name(),
            &self.config.namespace,
            Some(self.me()),
            self.config.lease_duration(),
        );
        let written = if self.lease.exists() {
            self.cluster.replace_lease(&claimed).await?
        } else {
            self.cluster.create_lease(&claimed).await?
        };
        self.lease.observe(Some(written), Instant::now());
        self.last_renewal = Some(started);
        self.watchdog.extend(started + self.watchdog_window());
        Ok(())
    }

    /// After PostgreSQL stopped on the primary (no more writes): marks the Lease released (and
    /// shortens it to one second for instances that do not know the mark), so a replica takes over
    /// at once instead of after a whole Lease duration. The holder stays named, so that the
    /// candidates know whose synchronous standbys to consult.
    pub(super) async fn release_lease(&mut self) {
        if self.lease.holder().as_deref() != Some(self.me()) {
            return;
        }
        let mut released = lease::claimed(
            self.lease.lease(),
            &self.cluster.lease_name(),
            &self.config.namespace,
            Some(self.me()),
            self.config.lease_duration(),
        );
        if let Some(spec) = released.spec.as_mut() {
            spec.lease_duration_seconds = Some(1);
        }
        lease::annotate(
            &mut released,
            &[(
                contract::ANNOTATION_RELEASED_BY,
                Some(self.me().to_string()),
            )],
        );
        match self.cluster.replace_lease(&released).await {
            Ok(written) => {
                self.lease.observe(Some(written), Instant::now());
                info!("Lease released with PostgreSQL stopped")
            }
            Err(error) => {
                warn!(%error, "releasing the Lease failed; replicas take over when it expires")
            }
        }
    }

    /// Whether every peer answers that it cannot reach the API server either (then none of them
    /// can take the Lease, and the primary keeps serving).
    pub(super) async fn peers_confirm_api_outage(&self) -> bool {
        let peers: Vec<&Member> = self
            .members
            .iter()
            .filter(|member| member.name != self.me())
            .collect();
        if peers.is_empty() {
            return false;
        }
        let answers = join_all(peers.iter().map(|peer| async move {
            match &peer.ip {
                Some(ip) => http::peer_status(ip, peer.http_port, PEER_TIMEOUT).await,
                None => None,
            }
        }))
        .await;
        let confirmed = answers
            .iter()
            .all(|answer| matches!(answer, Some(status) if !status.api_reachable));
        debug!(confirmed, "primary cannot renew its Lease; asked its peers");
        confirmed
    }

    pub(super) async fn run_for_primary(&mut self) -> Result<()> {
        if self.fence_requested {
            return Ok(());
        }
        let Some(local) = self.local.clone() else {
            return Ok(());
        };
        let Some(position) = local.position() else {
            return Ok(());
        };
        let old_primary = self.lease.holder().filter(|holder| holder != self.me());
        let old_status = old_primary
            .as_deref()
            .and_then(|name| self.member(name))
            .and_then(|member| member.status.clone());
        let number = self.config.synchronous_standbys;
        let sync_names: Vec<String> = match &old_status {
            Some(status) if number > 0 && !status.synchronous_standbys.is_empty() => {
                status.synchronous_standbys.clone()
            }
            _ if number > 0 => self
                .members
                .iter()
                .map(|member| member.name.clone())
                .filter(|name| Some(name) != old_primary.as_ref())
                .collect(),
            _ => Vec::new(),
        };
        let number = old_status
            .as_ref()
            .map(|status| status.synchronous_number)
            .filter(|n| *n > 0)
            .unwrap_or(number);
        let peers: Vec<&Member> = self
            .members
            .iter()
            .filter(|member| member.name != self.me() && Some(&member.name) != old_primary.as_ref())
            .collect();
        let positions = join_all(peers.iter().map(|peer| async move {
            let status = match &peer.ip {
                Some(ip) => http::peer_status(ip, peer.http_port, PEER_TIMEOUT).await,
                None => None,
            };
            PeerPosition {
                name: peer.name.clone(),
                received_lsn: status
                    .as_ref()
                    .filter(|status| status.postgres_ready)
                    .and_then(InstanceStatus::position),
                fenced: status.as_ref().is_some_and(|status| status.fenced),
            }
        }))
        .await;
        match decision::candidacy(self.me(), position, &positions, &sync_names, number) {
            Candidacy::Wait(reason) => {
                if self.last_wait_reason.as_deref() != Some(reason.as_str()) {
                    info!(%reason, "not promoting");
                    self.last_wait_reason = Some(reason);
                }
                Ok(())
            }
            Candidacy::Promote => {
                self.last_wait_reason = None;
                info!(
                    old_primary = ?old_primary,
                    lsn = %decision::format_lsn(position),
                    "the Lease expired and this is the best candidate: taking the Lease"
                );
                self.acquire().await?;
                let mut inherited = sync_names;
                if let Some(old) = old_primary {
                    inherited.push(old);
                }
                self.promote(inherited).await
            }
        }
    }

    /// Promotes the local replica (the Lease is already ours).
    pub(super) async fn promote(&mut self, inherited_set: Vec<String>) -> Result<()> {
        if self.follows_source() {
            return self.designate().await;
        }
        let pods = self.other_pods();
        self.synchronous_set =
            decision::next_synchronous_set(&inherited_set, &[], &pods, self.me());
        let settings = self.primary_settings();
        // synchronous_standby_names is in place before the first write is accepted.
        self.postgres
            .write_config(&settings, true, &self.replication.username)?;
        let client = self.postgres.connect().await?;
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(Error::postgres("reloading the configuration"))?;
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(Error::postgres("checking recovery before promotion"))?
            .get(0);
        // An earlier attempt may have promoted it already (pg_promote timed out, or we restarted).
        let promoted = !in_recovery || self.wait_for_promotion(&client).await?;
        if !promoted {
            return Err(Error::Invalid(
                "pg_promote did not complete within 8 s; retrying".into(),
            ));
        }
        info!("promoted: this instance is the primary");
        // Poolers a former primary paused (or that still hold server connections to a dead one)
        // are re-pointed and resumed once the rw Service reaches this writable primary.
        self.poolers.resume_all_when_writable();
        self.role = Role::Primary;
        self.watchdog.guard(self.postgres.pid());
        self.roles.reset();
        self.last_join.get_or_insert_with(|| "promote".into());
        let _ = self.reconcile_primary().await;
        Ok(())
    }

    /// Takes the primary role in a replica cluster (the Lease is already ours): PostgreSQL stays
    /// a standby and stops streaming from the former designated primary; it replays the source's
    /// archive from where it is (`primary_conninfo` is reloaded, no restart).
    pub(super) async fn designate(&mut self) -> Result<()> {
        self.synchronous_set.clear();
        self.write_designated_config()?;
        self.postgres.signal(Signal::SIGHUP);
        self.followed = None;
        info!("designated primary: replaying the source's WAL archive (replica cluster)");
        self.role = Role::Primary;
        self.watchdog.guard(self.postgres.pid());
        self.last_join.get_or_insert_with(|| "promote".into());
        let _ = self.reconcile_primary().await;
        Ok(())
    }

    /// Signals promotion and waits up to 8 s for PostgreSQL to leave recovery, renewing the Lease
    /// meanwhile. The end of recovery can outlast a Lease (restore_command fetching the last WAL
    /// and the timeline history from a slow store): a Lease left to lapse here made the watchdog
    /// stop the new primary right after its promotion.
    pub(super) async fn wait_for_promotion(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<bool> {
        client
            .batch_execute("SELECT pg_promote(false)")
            .await
            .map_err(Error::postgres("pg_promote"))?;
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut renewed = Instant::now();
        loop {
            let in_recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(Error::postgres("waiting for the end of recovery"))?
                .get(0);
            if !in_recovery {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            if renewed.elapsed() >= Duration::from_secs(1) {
                self.acquire().await?;
                renewed = Instant::now();
            }
            // Promotion takes tens of milliseconds; clients of a switchover wait for it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
