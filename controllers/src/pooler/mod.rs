//! Pooler reconciler: a PgBouncer Deployment, Service, ConfigMap (pgbouncer.ini) and the
//! cluster's auth Secret in front of a PostgresCluster's rw or ro Service.
//!
//! Decide, then act: [`builders`] and [`status`] are pure; [`reconcile`] runs the stages
//! dereference → validate → build → apply → update_status against the API server.

pub mod builders;
pub mod reconcile;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use api::contract;
use api::pooler::Pooler;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::ResourceExt;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};

use crate::postgres_cluster::scoped;

use crate::postgres_cluster::Context;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "pooler";

/// Errors of a Pooler reconciliation, one variant per stage, so a log line says where it failed.
/// A spec the user must fix is not an error: it shows as the Degraded condition and an event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the PostgresCluster or the auth Secret failed.
    #[error("Pooler {pooler}: reading what it refers to failed: {source}")]
    Dereference {
        /// Pooler name.
        pooler: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Applying an owned object failed.
    #[error("Pooler {pooler}: applying {what} failed: {source}")]
    Apply {
        /// Pooler name.
        pooler: String,
        /// Which object.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Issuing or reading the Pooler's TLS certificate failed.
    #[error("Pooler {pooler}: its TLS certificate: {source}")]
    Tls {
        /// Pooler name.
        pooler: String,
        /// What failed.
        #[source]
        source: crate::tls::Error,
    },
    /// Writing the status failed.
    #[error("Pooler {pooler}: updating the status failed: {source}")]
    UpdateStatus {
        /// Pooler name.
        pooler: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The object has no namespace (Pooler is namespaced, so this is a bug).
    #[error("Pooler {0} has no namespace")]
    NoNamespace(String),
}

/// Retry after an error: soon, since most are conflicts or a busy API server. Invalid specs
/// never reach here (they wait for a change through the Degraded condition).
pub fn error_policy(pooler: Arc<Pooler>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(
        pooler = %pooler.name_any(),
        namespace = pooler.namespace().unwrap_or_default(),
        error = %error,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

/// Runs the Pooler controller until `shutdown` resolves. With `namespace`, only that namespace
/// is watched; otherwise every namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let watch = ctx.settings.watch_config();
    let client = ctx.client.clone();
    let namespace = namespace.as_deref();
    let managed = watch.clone().labels(&format!(
        "app.kubernetes.io/managed-by={},{}",
        contract::MANAGED_BY,
        builders::LABEL_POOLER
    ));
    let controller = Controller::new(
        scoped::<Pooler>(&client, namespace),
        watch.clone().any_semantic(),
    )
    .owns(scoped::<Deployment>(&client, namespace), managed.clone())
    .owns(scoped::<Service>(&client, namespace), managed.clone())
    .owns(scoped::<ConfigMap>(&client, namespace), managed)
    .trigger_backoff(crate::watches::TriggerBackoff::default())
    .with_config(
        ControllerConfig::default()
            .debounce(Duration::from_millis(200))
            .concurrency(concurrency),
    );
    crate::telemetry::run_until_shutdown(
        controller,
        "pooler",
        crate::telemetry::traced(reconcile::reconcile),
        error_policy,
        ctx,
        shutdown,
    )
    .await;
}
