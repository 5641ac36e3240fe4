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
        if !local.postgres_ready || local.in_recovery != Some(false) {
            return Ok(());
        }
        let client = self.local_client().await?;
        let upkeep = self.primary_upkeep(&client).await;
        if upkeep.is_err() {
            // A broken connection is replaced on the next tick.
            self.local_client = None;
        }
        upkeep
    }

    async fn primary_upkeep(&mut self, client: &tokio_postgres::Client) -> Result<()> {
        if !self.roles_ensured {
            self.ensure_roles(client).await?;
            self.roles_ensured = true;
        }
        if !self.api_reachable {
            return Ok(());
        }
        self.mark_bootstrapped(client).await?;
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

    /// Creates (or updates the password of) the replication and application roles.
    pub(super) async fn ensure_roles(&self, client: &tokio_postgres::Client) -> Result<()> {
        // The statements hold passwords: keep them out of the server log.
        client
            .batch_execute("SET log_statement TO 'none'; SET log_min_duration_statement TO -1")
            .await
            .map_err(Error::postgres("hiding role statements from the log"))?;
        // The superuser too: a cluster restored from a backup starts with the source's password.
        let mut roles = vec![
            (&self.superuser, "SUPERUSER LOGIN"),
            (&self.replication, "LOGIN REPLICATION"),
        ];
        if let Some(app) = &self.app {
            roles.push((app, "LOGIN"));
        }
        for (user, attributes) in roles {
            let stored: Option<Option<String>> = client
                .query_opt(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                    &[&user.username],
                )
                .await
                .map_err(Error::postgres("looking up a role"))?
                .map(|row| row.get(0));
            let verb = if stored.is_some() { "ALTER" } else { "CREATE" };
            // A right verifier is kept: a new one (new salt) for the same password would fail
            // the server logins PgBouncer makes with the SCRAM keys of its connected clients.
            let password = match stored.flatten() {
                Some(stored) if crate::declarative::scram::matches(&stored, &user.password) => {
                    String::new()
                }
                // A verifier, never the cleartext (see declarative::scram).
                _ => format!(
                    " PASSWORD {}",
                    quote::literal(&crate::declarative::scram::verifier(&user.password))
                ),
            };
            client
                .batch_execute(&format!(
                    "{verb} ROLE {} WITH {attributes}{password}",
                    quote::identifier(&user.username),
                ))
                .await
                .map_err(Error::postgres(format!("{verb} ROLE {}", user.username)))?;
        }
        if let Some(app) = &self.app {
            let database = self
                .config
                .app_database
                .clone()
                .or_else(|| app.dbname.clone())
                .unwrap_or_else(|| app.username.clone());
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
                .await
                .map_err(Error::postgres("looking up the application database"))?
                .is_some();
            if !exists {
                client
                    .batch_execute(&format!(
                        "CREATE DATABASE {} OWNER {}",
                        quote::identifier(&database),
                        quote::identifier(&app.username)
                    ))
                    .await
                    .map_err(Error::postgres(format!("CREATE DATABASE {database}")))?;
                info!(%database, "application database created");
            }
        }
        Ok(())
    }
}
