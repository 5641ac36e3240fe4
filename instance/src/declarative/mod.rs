//! Declarative databases and roles: the primary's instance manager keeps the PostgresUser and
//! PostgresDatabase objects that name its cluster applied, over its private Unix socket as the
//! superuser (no superuser password crosses the network; the operator needs no route to the
//! database).
//!
//! - [`user_plan`] (pure): desired role + catalog -> ordered statements.
//! - [`role_sql`]: reads the catalog, applies a plan in one transaction, drops roles.
//! - [`scram`]: the SCRAM-SHA-256 verifiers that stand for passwords in every statement.
//! - [`connection_secret`] (pure): the keys of a generated user Secret.
//! - [`rotation`] (pure): which login role is active and when to rotate.
//! - [`user`]: the PostgresUser reconciler (Secret, apply, status, finalizer).
//! - [`database_plan`] (pure) and [`database_sql`]: the same for databases, schemas,
//!   extensions and privileges; [`database`]: the PostgresDatabase reconciler.
//! - [`sql`], [`statement`], [`error`], [`status`]: plumbing shared by both kinds.
//!
//! Every instance runs the controllers; only the current primary acts (the others requeue), so a
//! failover moves the work with the Lease.

pub mod connection_secret;
pub mod database;
pub mod database_plan;
pub mod database_sql;
pub mod error;
pub mod finalizer;
pub mod role_sql;
pub mod rotation;
pub mod scram;
pub mod sql;
pub mod statement;
pub mod status;
pub mod user;
pub mod user_plan;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::Controller;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::config::Config;
use error::DeclarativeError;
use sql::Connector;

/// Finalizer that keeps an object with `reclaimPolicy: Delete` until its role or database is
/// dropped.
pub const FINALIZER: &str = "postgres.keiailab.io/declarative";

/// What the reconcilers share.
pub struct Context {
    /// Kubernetes client (long timeouts: it watches).
    pub client: Client,
    /// Namespace of the cluster.
    pub namespace: String,
    /// PostgresCluster name: only objects naming it are handled.
    pub cluster: String,
    /// Superuser connections to the local PostgreSQL.
    pub connector: Connector,
    /// Whether this instance is the primary now (set by the run loop every tick).
    pub primary: watch::Receiver<bool>,
    /// Whether this instance is a replica cluster's designated primary now: it cannot apply
    /// anything (read-only), and says so on each object instead of leaving it unanswered.
    pub designated: watch::Receiver<bool>,
    /// Period of the drift-repairing reconcile.
    pub resync: Duration,
    /// Host and port written into generated Secrets (the read-write Service).
    pub service_host: String,
    /// Port written into generated Secrets.
    pub service_port: u16,
    /// Publishes the events of declarative objects (as `pg-instance`, this pod).
    pub recorder: kube::runtime::events::Recorder,
}

impl Context {
    /// Whether this instance may act now.
    pub fn is_primary(&self) -> bool {
        *self.primary.borrow()
    }

    /// What a replica cluster's designated primary answers instead of applying `what`; `None`
    /// on any other instance.
    pub fn read_only(&self, what: &str) -> Option<DeclarativeError> {
        (*self.designated.borrow()).then(|| {
            DeclarativeError::ReplicaCluster(format!(
                "PostgresCluster {} is a replica cluster (spec.replica.enabled): it is read-only and has its source's {what}s; this {what} is applied once the cluster is promoted (declare it on the source to have it in both)",
                self.cluster
            ))
        })
    }
}

/// Starts the PostgresUser (and PostgresDatabase) controllers in the background.
pub fn spawn(
    client: Client,
    config: &Config,
    superuser: &str,
    primary: watch::Receiver<bool>,
    designated: watch::Receiver<bool>,
) {
    let context = Arc::new(Context {
        client: client.clone(),
        namespace: config.namespace.clone(),
        cluster: config.cluster.clone(),
        connector: Connector::local(&config.run_dir(), config.port, superuser),
        primary,
        designated,
        resync: Duration::from_secs(config.declarative_resync_seconds.max(1)),
        service_host: format!(
            "{}.{}.svc",
            api::contract::rw_service(&config.cluster),
            config.namespace
        ),
        service_port: api::contract::POSTGRES_PORT,
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "pg-instance".to_string(),
                instance: Some(config.pod_name.clone()),
            },
        ),
    });
    // Watches end before the client's read timeout, so an idle watch is renewed, not failed.
    let watch_config = watcher::Config::default().timeout(25);
    let users: Api<api::PostgresUser> = Api::namespaced(client.clone(), &config.namespace);
    let user_context = context.clone();
    let user_watch = watch_config.clone();
    tokio::spawn(async move {
        Controller::new(users, user_watch)
            .run(user::reconcile, user::error_policy, user_context)
            .for_each(|result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "PostgresUser reconcile");
                }
            })
            .await;
    });
    let databases: Api<api::PostgresDatabase> = Api::namespaced(client, &config.namespace);
    tokio::spawn(async move {
        Controller::new(databases, watch_config)
            .run(database::reconcile, database::error_policy, context)
            .for_each(|result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "PostgresDatabase reconcile");
                }
            })
            .await;
    });
}
