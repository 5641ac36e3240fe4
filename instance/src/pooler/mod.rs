//! What the primary's instance manager does for the cluster's Poolers (PgBouncer):
//!
//! - [`auth`]: keeps the `auth_query` role and lookup function applied, with the password of the
//!   cluster's pooler auth Secret (the operator generates it when the first Pooler appears).
//! - [`pause`]: PAUSE before a switchover, RECONNECT + RESUME once the new primary is writable.
//! - [`verify`]: TLS (verify-full against the cluster's CA) of the probe of the rw Service.
//! - [`exporter`]: `pg-instance pooler-exporter`, the Pooler pods' `/metrics` (PgBouncer's admin
//!   console under pgbouncer_exporter's names); it runs in the Pooler pod, not in the instance.
//!
//! Every instance runs the loop; only a writable primary acts, so a failover moves the work.

pub mod auth;
pub mod client;
pub mod exporter;
pub mod pause;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::config::Config;
use crate::declarative::sql::Connector;

/// Longest time between two passes of the auth loop: a new Pooler's Secret, or a database
/// created by hand, gets the role and function within it.
const AUTH_PERIOD: Duration = Duration::from_secs(10);

/// Starts the loop that keeps the pooler auth role and function applied while this instance is
/// the writable primary and the cluster's pooler auth Secret exists.
pub fn spawn_auth(
    client: Client,
    config: &Config,
    superuser: &str,
    mut primary: watch::Receiver<bool>,
) {
    let connector = Connector::local(&config.run_dir(), config.port, superuser);
    let secrets: Api<Secret> = Api::namespaced(client, &config.namespace);
    let secret_name = api::contract::pooler_auth_secret(&config.cluster);
    let period = AUTH_PERIOD.min(Duration::from_secs(
        config.declarative_resync_seconds.max(1),
    ));
    tokio::spawn(async move {
        // Each pass reads before it writes: a right cluster is only read.
        loop {
            if *primary.borrow_and_update() {
                match password(&secrets, &secret_name).await {
                    Ok(Some(password)) => match auth::ensure(&connector, &password).await {
                        Ok(applied) => {
                            if applied.role || !applied.databases.is_empty() {
                                tracing::info!(
                                    role_changed = applied.role,
                                    databases = ?applied.databases,
                                    "pooler auth role and lookup function applied"
                                );
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "applying the pooler auth role failed; retrying")
                        }
                    },
                    Ok(None) => {}
                    Err(error) => {
                        tracing::debug!(%error, secret = %secret_name, "reading the pooler auth Secret")
                    }
                }
            }
            // Woken early when this instance becomes (or stops being) the primary.
            if let Ok(Err(_)) = tokio::time::timeout(period, primary.changed()).await {
                return; // The run loop ended.
            }
        }
    });
}

/// The `password` key of the pooler auth Secret; `None` when the Secret does not exist (the
/// cluster has no Pooler).
async fn password(secrets: &Api<Secret>, name: &str) -> Result<Option<String>, kube::Error> {
    let Some(secret) = secrets.get_opt(name).await? else {
        return Ok(None);
    };
    Ok(secret
        .data
        .and_then(|data| data.get("password").cloned())
        .and_then(|bytes| String::from_utf8(bytes.0).ok()))
}
