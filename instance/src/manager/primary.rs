//! Primary upkeep: the bootstrapped mark on the Lease, roles (passwords from their Secrets), one
//! physical slot per member and synchronous_standby_names. Apart from the run loop because it
//! runs only on the primary, every tick, against the local server.

use super::*;

impl Manager {
    /// Writes [`contract::ANNOTATION_BOOTSTRAPPED`] on the Lease once the data exists twice (or
    /// a lone primary has served a while): from then on a lost volume is never re-initialised.
    pub(super) async fn mark_bootstrapped(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<()> {
        let serving_for = self
            .serving_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        if self
            .lease
            .annotation(contract::ANNOTATION_BOOTSTRAPPED)
            .is_some()
            || self.lease.holder().as_deref() != Some(self.me())
        {
            return Ok(());
        }
        let streaming: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .map_err(Error::postgres("counting streaming replicas"))?
            .get(0);
        if !bootstrap::now_bootstrapped(streaming, serving_for) {
            return Ok(());
        }
        let Some(mut current) = self.lease.lease().cloned() else {
            return Ok(());
        };
        lease::annotate(&mut current, &[bootstrap::annotation()]);
        // A renewal in between makes this a conflict: the next upkeep tries again.
        match self.cluster.replace_lease(&current).await {
            Ok(written) => {
                self.lease.observe(Some(written), Instant::now());
                info!(
                    streaming,
                    "the cluster is bootstrapped: its data exists on more than this instance"
                );
            }
            Err(error) => debug!(%error, "marking the Lease bootstrapped failed; retrying"),
        }
        Ok(())
    }

    /// Primary upkeep: roles, one physical slot per member, synchronous_standby_names.
    pub(super) async fn reconcile_primary(&mut self) -> Result<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        if !local.postgres_ready {
            return Ok(());
        }
        if local.in_recovery != Some(false) {
            if local.in_recovery == Some(true) && self.follows_source() {
                return self.designated_upkeep().await;
            }
            return Ok(());
        }
        // In a task of its own (see roles.rs); its error, which the status says, does not stop
        // the rest of the upkeep.
        let patience = self.config.renew_deadline() / 4;
        let roles = self.roles.advance(&self.bootstrap_roles, patience).await;
        let client = self.local_client().await?;
        let upkeep = self.primary_upkeep(&client).await;
        if upkeep.is_err() {
            // A broken connection is replaced on the next tick.
            self.local_client = None;
        }
        upkeep.and(roles)
    }

    /// A replica cluster's designated primary is read-only: no roles, no synchronous standbys;
    /// only the slots its replicas stream from (created on a standby as on a primary) and the
    /// bootstrapped mark.
    async fn designated_upkeep(&mut self) -> Result<()> {
        if !self.api_reachable {
            return Ok(());
        }
        let client = self.local_client().await?;
        let upkeep = match self.mark_bootstrapped(&client).await {
            Ok(()) => self.keep_slots(&client).await,
            Err(error) => Err(error),
        };
        if upkeep.is_err() {
            self.local_client = None;
        }
        upkeep
    }

    async fn primary_upkeep(&mut self, client: &tokio_postgres::Client) -> Result<()> {
        if !self.api_reachable {
            return Ok(());
        }
        self.mark_bootstrapped(client).await?;
        self.keep_slots(client).await?;
        self.keep_synchronous_standbys(client).await
    }

    /// One physical slot per other member; slots of former members are dropped.
    async fn keep_slots(&self, client: &tokio_postgres::Client) -> Result<()> {
        let pods = self.other_pods();
        let wanted_slots: Vec<String> = pods.iter().map(|pod| quote::slot_name(pod)).collect();
        let slots = client
            .query(
                "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'",
                &[],
            )
            .await
            .map_err(Error::postgres("listing replication slots"))?;
        for slot in &wanted_slots {
            if !slots.iter().any(|row| row.get::<_, String>(0) == *slot) {
                client
                    .execute(
                        "SELECT pg_create_physical_replication_slot($1, true)",
                        &[slot],
                    )
                    .await
                    .map_err(Error::postgres(format!("creating replication slot {slot}")))?;
                info!(%slot, "replication slot created");
            }
        }
        for row in &slots {
            let name: String = row.get(0);
            let active: bool = row.get(1);
            if !active && !wanted_slots.contains(&name) {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .map_err(Error::postgres(format!("dropping replication slot {name}")))?;
                info!(slot = %name, "replication slot of a former member dropped");
            }
        }
        Ok(())
    }

    /// synchronous_standby_names from the streaming members under the cluster's policy.
    async fn keep_synchronous_standbys(&mut self, client: &tokio_postgres::Client) -> Result<()> {
        let pods = self.other_pods();
        if self.config.synchronous_standbys > 0 {
            let streaming_apps: Vec<String> = client
                .query(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .await
                .map_err(Error::postgres("listing streaming replicas"))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let streaming: Vec<String> = pods
                .iter()
                .filter(|pod| streaming_apps.contains(&quote::slot_name(pod)))
                .cloned()
                .collect();
            let policy = self.config.sync_policy();
            let next = decision::next_synchronous_set_for(
                &self.synchronous_set,
                &streaming,
                &pods,
                self.me(),
                policy,
            );
            let names = decision::standby_names(&next, policy);
            let current: String = client
                .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                .await
                .map_err(Error::postgres("reading synchronous_standby_names"))?
                .get(0);
            self.synchronous_set = next;
            if current != names {
                self.postgres.write_config(
                    &ManagedSettings {
                        upstream: None,
                        synchronous_standby_names: names.clone(),
                    },
                    false,
                    &self.replication.username,
                )?;
                client
                    .batch_execute("SELECT pg_reload_conf()")
                    .await
                    .map_err(Error::postgres("reloading the configuration"))?;
                info!(synchronous_standby_names = %names, "synchronous standbys updated");
            }
        }
        Ok(())
    }
}
