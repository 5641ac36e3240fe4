//! The bootstrap roles (superuser, replication, application) and the application database, made
//! to match their Secrets on a primary, in a task beside the run loop.
//!
//! Their statements can wait long: CREATE DATABASE waits up to 5 s for other sessions to leave
//! the template, ALTER ROLE waits for a transaction that holds the role's row (a prepared one
//! holds it across restarts). A run loop held that long misses its Lease renewals and the
//! watchdog fences a healthy primary, so the run loop only starts the task and reads its end.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::info;

use crate::cluster::Credentials;
use crate::error::{Error, Result};
use crate::postgres::LocalConnector;
use crate::quote;

/// The roles of the cluster's Secrets and the application database, and how to reach the server
/// that holds them.
pub(super) struct BootstrapRoles {
    /// The task's own connection (never the run loop's: its statements may wait).
    pub connector: LocalConnector,
    pub superuser: Credentials,
    pub replication: Credentials,
    pub app: Option<Credentials>,
    /// The database's name when it is not the application Secret's (`--app-database`).
    pub app_database: Option<String>,
}

/// Where the roles stand since PostgreSQL last (re)started or was promoted.
#[derive(Default)]
pub(super) struct RoleUpkeep {
    state: State,
    /// This process made the cluster (initdb, a restore) and no run has succeeded yet: the
    /// application role and database do not exist.
    new_cluster: bool,
    /// Why the last run failed, until one succeeds: the instance's status says it every tick
    /// while the next run is on its way.
    failed: Option<String>,
}

#[derive(Default)]
enum State {
    #[default]
    Pending,
    Running(JoinHandle<Result<()>>),
    Done,
}

impl RoleUpkeep {
    /// The roles are to be made again (PostgreSQL restarted, was promoted or recovered): a run
    /// still under way is abandoned, its connection may be to a server that is gone.
    pub(super) fn reset(&mut self) {
        if let State::Running(task) = &self.state {
            task.abort();
        }
        self.state = State::Pending;
    }

    /// This process makes a new cluster (initdb, a restore): until a run succeeds the instance
    /// is not ready and the declarative loops wait (see [`Self::new_cluster_pending`]).
    pub(super) fn new_cluster(&mut self) {
        self.new_cluster = true;
    }

    /// Whether this process made a new cluster whose application role and database do not exist
    /// yet. A primary that was promoted or restarted has them from before.
    pub(super) fn new_cluster_pending(&self) -> bool {
        self.new_cluster
    }

    /// Starts a run when none is under way or done, and waits up to `patience` for it: the
    /// common run (milliseconds) ends within the tick, as before the first status a primary
    /// publishes; a long one goes on beside the run loop. The error of the last failed run
    /// until one succeeds.
    pub(super) async fn advance(
        &mut self,
        roles: &Arc<BootstrapRoles>,
        patience: Duration,
    ) -> Result<()> {
        if matches!(self.state, State::Done) {
            return Ok(());
        }
        if matches!(self.state, State::Pending) {
            let roles = roles.clone();
            self.state = State::Running(tokio::spawn(async move {
                let client = roles.connector.connect().await?;
                ensure_roles(&client, &roles).await
            }));
        }
        if let State::Running(task) = &mut self.state
            && let Ok(joined) = tokio::time::timeout(patience, task).await
        {
            let outcome = joined.unwrap_or_else(|error| {
                Err(Error::Invalid(format!(
                    "the role upkeep task ended: {error}"
                )))
            });
            match outcome {
                Ok(()) => {
                    self.state = State::Done;
                    self.new_cluster = false;
                    self.failed = None;
                }
                Err(error) => {
                    // The next tick starts a new run.
                    self.failed = Some(error.to_string());
                    self.state = State::Pending;
                }
            }
        }
        match &self.failed {
            Some(error) => Err(Error::Invalid(format!(
                "making the cluster's roles and application database: {error}"
            ))),
            None => Ok(()),
        }
    }
}

/// Creates (or updates the password of) the superuser, replication and application roles, and
/// creates the application database.
async fn ensure_roles(client: &tokio_postgres::Client, roles: &BootstrapRoles) -> Result<()> {
    // The statements hold verifiers: keep them out of the server log and pg_stat_statements.
    client
        .batch_execute(&crate::declarative::statement::hide_from_logs(false))
        .await
        .map_err(Error::postgres("hiding role statements from the log"))?;
    // The superuser too: a cluster restored from a backup starts with the source's password.
    let mut wanted = vec![
        (&roles.superuser, "SUPERUSER LOGIN"),
        (&roles.replication, "LOGIN REPLICATION"),
    ];
    if let Some(app) = &roles.app {
        wanted.push((app, "LOGIN"));
    }
    for (user, attributes) in wanted {
        let stored: Option<Option<String>> = client
            .query_opt(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&user.username],
            )
            .await
            .map_err(Error::postgres("looking up a role"))?
            .map(|row| row.get(0));
        let verb = if stored.is_some() { "ALTER" } else { "CREATE" };
        // A right verifier is kept: a new one (new salt) for the same password would fail the
        // server logins PgBouncer makes with the SCRAM keys of its connected clients.
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
    if let Some(app) = &roles.app {
        let database = roles
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
