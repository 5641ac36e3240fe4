//! ShardSplitJob reconciler: moves the upper part of one ShardRange to another shard online, in
//! the seven steps of [`api::sharding::SplitStep`], each recorded in `status.step` before the
//! next starts so that an operator restart resumes where it stopped (every step can run again).
//!
//! 1. Plan: validate, pre-flight (replica identity of every moving table, target capacity),
//!    split the source ShardRange into two objects that both still name the source shard.
//! 2. ProvisionTarget: the target's child PostgresCluster (the sharded cluster's builder) and
//!    the moving tables' schema on it.
//! 3. CopySnapshot: a logical slot with an exported snapshot, the moving rows copied in that
//!    snapshot with binary COPY, tables in parallel.
//! 4. CatchUp: a publication filtered to the range, a subscription on the target from the slot.
//! 5. Verify: freeze the range as for a cut-over (pause, catch up, fence, catch up), take a
//!    snapshot on each shard, resume writes, then compare counts and checksums in the two
//!    snapshots (the pause does not grow with the range's size).
//! 6. CutOver: the same freeze, then flip the range to the target with a higher epoch; a
//!    freeze that does not fit `maxWritePauseMillis` is undone and retried.
//! 7. CleanUp: drop the replication objects, delete the moved rows on the source (the fence
//!    stays, refusing stale routers).
//!
//! Before the cut-over a failure or a deletion rolls back; after it the job only goes forward.
//! [`plan`] is pure; [`shards`] runs the SQL; [`reconcile`] drives the steps.

pub mod plan;
pub mod reconcile;
pub mod shards;

use std::sync::Arc;
use std::time::Duration;

use api::sharding::{ShardSplitJob, SplitStep};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::{Api, ResourceExt};

use crate::postgres_cluster::Context;

/// Name of this controller in logs.
pub const CONTROLLER: &str = "shardsplitjob";
/// Finalizer that rolls back an unfinished split when its job is deleted.
pub const FINALIZER: &str = "postgres.keiailab.io/shard-split";
/// Annotation on a target shard's child PostgresCluster that a job created (its value: the
/// job's uid): a rollback deletes that cluster, and leaves a shard that existed before alone.
pub const ANNOTATION_PROVISIONED_BY: &str = "postgres.keiailab.io/provisioned-by-shard-split";

/// Errors of a reconciliation, one per stage. What the user must fix (an unknown range, a table
/// without a primary key) is not an error: it fails the job with a condition and an event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the cluster, the ranges or the job failed.
    #[error("reading {what} failed: {source}")]
    Dereference {
        /// What was read.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Writing a ShardRange (split, pause, flip, merge) failed.
    #[error("{what} failed: {source}")]
    Ranges {
        /// What was written.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Creating the target shard's cluster failed.
    #[error("provisioning the target shard failed: {0}")]
    Provision(#[source] Box<crate::postgres_cluster::Error>),
    /// SQL on a shard failed during a step (retried).
    #[error("step {step:?}: {source}")]
    Shard {
        /// The step.
        step: SplitStep,
        /// The failure.
        #[source]
        source: shards::ShardError,
    },
    /// Writing the job's status failed.
    #[error("updating the status of ShardSplitJob {name} failed: {source}")]
    UpdateStatus {
        /// Job name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object has no namespace (ShardSplitJob is namespaced, so this is a bug).
    #[error("ShardSplitJob {0} has no namespace")]
    NoNamespace(String),
}

/// Retry after an error (shards unreachable, API conflicts): steps are idempotent.
pub fn error_policy(job: Arc<ShardSplitJob>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job.name_any(), %error, "shard split reconcile failed; retrying");
    Action::requeue(Duration::from_secs(3))
}

/// Runs the ShardSplitJob controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let jobs: Api<ShardSplitJob> =
        crate::postgres_cluster::scoped(&ctx.client, namespace.as_deref());
    let controller = Controller::new(jobs, ctx.settings.watch_config())
        .trigger_backoff(crate::watches::TriggerBackoff::default())
        .with_config(ControllerConfig::default().concurrency(4));
    crate::telemetry::run_until_shutdown(
        controller,
        "shardsplitjob",
        crate::telemetry::traced_and_measured(reconcile::reconcile),
        error_policy,
        ctx,
        shutdown,
    )
    .await;
}
