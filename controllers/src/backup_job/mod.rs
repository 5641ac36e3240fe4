//! BackupJob reconciler: asks one instance manager of the cluster (a healthy replica when
//! `preferReplica`, else the primary) to take a base backup over its HTTP API (no `kubectl
//! exec`), follows the run, and reports phase, backup id, LSNs, times, size and an actionable
//! failure reason. A run lost with its instance manager (killed, restarted) fails the job; the
//! next BackupJob starts afresh.
//!
//! A cluster takes one base backup to its store at a time: such a job waits (Pending, reason
//! `BackupRunning` or `Queued`) while another one of its cluster runs or an older one waits
//! ([`decide::turn`]). Backups to a volume go each into a claim of their own and do not queue.
//!
//! Stages: dereference (the cluster) → validate (`spec.backup`, a volume's claim name: problems
//! are said at once, not after the queue) → wait for its turn → start (pick the instance,
//! `POST /backups/{name}`) → follow (`GET /backups/{name}`) → update status. [`decide`] is pure.

pub mod decide;
pub mod reconcile;
mod volume;

use std::sync::Arc;
use std::time::Duration;

use api::BackupJob;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::{Api, ResourceExt};

use crate::postgres_cluster::Context;

/// Name of this controller in logs.
pub const CONTROLLER: &str = "backupjob";

/// Errors of a reconciliation, one per stage. Problems the user can fix (no cluster, no
/// `spec.backup`, a failing store) are not errors: they end the job as Failed with a reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the cluster or its pods failed.
    #[error("reading {what} failed: {source}")]
    Dereference {
        /// What was read.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Writing the BackupJob's status failed.
    #[error("updating the status of BackupJob {name} failed: {source}")]
    UpdateStatus {
        /// Job name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The object has no namespace (BackupJob is namespaced, so this is a bug).
    #[error("BackupJob {0} has no namespace")]
    NoNamespace(String),
}

/// Retry after an error.
pub fn error_policy(job: Arc<BackupJob>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job.name_any(), %error, "backup job reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the BackupJob controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let jobs: Api<BackupJob> = crate::postgres_cluster::scoped(&ctx.client, namespace.as_deref());
    let controller = Controller::new(jobs, ctx.settings.watch_config())
        .trigger_backoff(crate::watches::TriggerBackoff::default())
        .with_config(ControllerConfig::default().concurrency(8));
    crate::telemetry::run_until_shutdown(
        controller,
        "backupjob",
        crate::telemetry::traced_and_measured(reconcile::reconcile),
        error_policy,
        ctx,
        shutdown,
    )
    .await;
}
