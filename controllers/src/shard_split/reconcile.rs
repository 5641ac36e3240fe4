//! The acting part of the ShardSplitJob reconciler: dereference (cluster, ranges, shards) →
//! the current step → status (step, phase, one condition, events). Each step ends by writing
//! the next step into the status, so a restart repeats at most the step it was in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::common::{new_condition, set_condition};
use api::postgres_cluster::{PostgresCluster, ShardKeyType, TableGroupSpec};
use api::sharding::{ShardRange, ShardRangeState, ShardSplitJob, ShardSplitJobStatus, SplitStep};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::plan::{self, lower, upper};
use super::shards::{self, Endpoint, MovingTable, ShardError};
use super::{ANNOTATION_PROVISIONED_BY, Error, FINALIZER};

mod copy;
mod cut_over;
mod undo;

/// The source and target primaries of a step, and a connection to each.
struct Connected {
    source_endpoint: Endpoint,
    source: tokio_postgres::Client,
    target_endpoint: Endpoint,
    target: tokio_postgres::Client,
}
use crate::postgres_cluster::{Context, FIELD_MANAGER};
use crate::sharded_cluster::builders::{child_cluster, shard_cluster_name};

/// Condition type of a ShardSplitJob: True once the range lives on the target shard and the
/// source is clean; its reason says where the job is otherwise.
pub const CONDITION_COMPLETED: &str = "Completed";
/// Phases.
pub mod phase {
    /// Working through the steps.
    pub const RUNNING: &str = "Running";
    /// The range lives on the target shard.
    pub const SUCCEEDED: &str = "Succeeded";
    /// Refused before anything changed; the condition says why.
    pub const FAILED: &str = "Failed";
    /// Undone before the cut-over: the ranges and the target are as before.
    pub const ROLLED_BACK: &str = "RolledBack";
}

/// Requeue while waiting (for a shard, for catch-up).
const WAIT: Duration = Duration::from_secs(2);
/// Requeue after an aborted cut-over.
const RETRY_CUT_OVER: Duration = Duration::from_secs(3);
/// How far behind the target may be to leave CatchUp (when the pause budget is larger).
const CATCH_UP_LAG: Duration = Duration::from_millis(500);

/// One reconciliation: the finalizer wraps the steps (apply) and the rollback (cleanup).
pub async fn reconcile(job: Arc<ShardSplitJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = job.name_any();
    let namespace = job
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<ShardSplitJob> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, job, |event| async {
        match event {
            Finalizer::Apply(job) => {
                let split = Split::new(&job, &ctx, &namespace);
                let result = split.advance().await;
                if let Err(Error::Shard { step, source }) = &result {
                    // Transient SQL failures are retried; the condition shows the last one.
                    let mut status = split.status();
                    set_progress(
                        &job,
                        &mut status,
                        "Retrying",
                        format!("step {step:?}: {source}; retrying"),
                    );
                    let _ = split.write_status(status).await;
                }
                result
            }
            Finalizer::Cleanup(job) => Split::new(&job, &ctx, &namespace).on_delete().await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

/// Sets the job's one condition (False while it works, with the reason where it is).
fn set_progress(
    job: &ShardSplitJob,
    status: &mut ShardSplitJobStatus,
    reason: &str,
    message: String,
) {
    let done = status.phase.as_deref() == Some(phase::SUCCEEDED);
    set_condition(
        &mut status.conditions,
        new_condition(
            CONDITION_COMPLETED,
            done,
            reason,
            message,
            job.metadata.generation,
        ),
    );
}

/// What a reconciliation works on: the job, and the cluster and ranges it names.
struct Split<'a> {
    job: &'a ShardSplitJob,
    ctx: &'a Context,
    namespace: &'a str,
    uid: String,
}

/// The dereferenced world of a job past its Plan step.
struct World {
    cluster: PostgresCluster,
    group: TableGroupSpec,
    tables: Vec<MovingTable>,
    /// The moving range as it is now.
    moving: ShardRange,
    source_shard: String,
}

impl World {
    fn key_type(&self) -> ShardKeyType {
        self.group.key_type
    }

    fn predicate(&self, key: &str) -> String {
        plan::range_predicate(
            &router::plan::quote_ident(key),
            self.key_type(),
            self.group.vindex,
            self.moving.spec.start,
            self.moving.spec.end,
        )
    }

    fn source_cluster(&self) -> String {
        shard_cluster_name(&self.cluster.name_any(), &self.source_shard)
    }
}

fn shard_step(step: SplitStep) -> impl FnOnce(ShardError) -> Error {
    move |source| Error::Shard { step, source }
}

impl<'a> Split<'a> {
    fn new(job: &'a ShardSplitJob, ctx: &'a Context, namespace: &'a str) -> Self {
        Self {
            job,
            ctx,
            namespace,
            uid: job.uid().unwrap_or_default(),
        }
    }

    fn status(&self) -> ShardSplitJobStatus {
        self.job.status.clone().unwrap_or_default()
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), self.namespace)
    }

    fn target_cluster(&self) -> String {
        shard_cluster_name(&self.job.spec.cluster.name, &self.job.spec.target_shard)
    }

    async fn write_status(&self, mut status: ShardSplitJobStatus) -> Result<(), Error> {
        let name = self.job.name_any();
        status.observed_generation = self.job.metadata.generation;
        let patch = json!({
            "apiVersion": ShardSplitJob::api_version(&()),
            "kind": ShardSplitJob::kind(&()),
            "status": status,
        });
        self.api::<ShardSplitJob>()
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| Error::UpdateStatus { name, source })?;
        Ok(())
    }

    async fn publish(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Split".to_string(),
            secondary: None,
        };
        if let Err(error) = self
            .ctx
            .recorder
            .publish(&event, &self.job.object_ref(&()))
            .await
        {
            tracing::warn!(job = %self.job.name_any(), %error, "publishing an event failed");
        }
    }

    /// Moves to `step` (persisted before the step runs), with a condition and an event.
    async fn enter(
        &self,
        mut status: ShardSplitJobStatus,
        step: SplitStep,
        reason: &str,
        message: String,
    ) -> Result<Action, Error> {
        status.step = Some(step);
        status.phase = Some(phase::RUNNING.into());
        set_progress(self.job, &mut status, reason, message.clone());
        self.write_status(status).await?;
        self.publish(EventType::Normal, reason, message).await;
        Ok(Action::requeue(Duration::from_millis(100)))
    }

    /// Waits in the current step with a condition saying for what.
    async fn wait(&self, reason: &str, message: String) -> Result<Action, Error> {
        let mut status = self.status();
        set_progress(self.job, &mut status, reason, message);
        self.write_status(status).await?;
        Ok(Action::requeue(WAIT))
    }

    /// Refuses the job before anything changed.
    async fn refuse(&self, reason: &str, message: String) -> Result<Action, Error> {
        let mut status = self.status();
        status.phase = Some(phase::FAILED.into());
        set_progress(self.job, &mut status, reason, message.clone());
        self.write_status(status).await?;
        self.publish(EventType::Warning, reason, message).await;
        Ok(Action::await_change())
    }

    async fn range(&self, name: &str) -> Result<Option<ShardRange>, Error> {
        self.api::<ShardRange>()
            .get_opt(name)
            .await
            .map_err(|source| Error::Dereference {
                what: format!("ShardRange {}/{name}", self.namespace),
                source,
            })
    }

    async fn cluster(&self) -> Result<Option<PostgresCluster>, Error> {
        let name = &self.job.spec.cluster.name;
        self.api::<PostgresCluster>()
            .get_opt(name)
            .await
            .map_err(|source| Error::Dereference {
                what: format!("PostgresCluster {}/{name}", self.namespace),
                source,
            })
    }

    async fn endpoint(&self, cluster: &str, step: SplitStep) -> Result<Option<Endpoint>, Error> {
        shards::endpoint(&self.ctx.client, self.namespace, cluster)
            .await
            .map_err(shard_step(step))
    }

    /// The cluster, group, tables and moving range of a planned job; `None` when one is gone.
    async fn world(&self) -> Result<Option<World>, Error> {
        let status = self.status();
        let (Some(moving_name), Some(source_shard)) = (status.moving_range, status.source_shard)
        else {
            return Ok(None);
        };
        let Some(cluster) = self.cluster().await? else {
            return Ok(None);
        };
        let Some(moving) = self.range(&moving_name).await? else {
            return Ok(None);
        };
        let Some(sharding) = cluster.spec.sharding.clone() else {
            return Ok(None);
        };
        let Some(group) = sharding
            .table_groups
            .iter()
            .find(|g| g.name == moving.spec.table_group)
            .cloned()
        else {
            return Ok(None);
        };
        let tables = sharding
            .sharded_tables
            .iter()
            .filter(|t| t.table_group == group.name)
            .map(|t| MovingTable {
                name: t.name.clone(),
                key: t.shard_key.clone(),
            })
            .collect();
        Ok(Some(World {
            cluster,
            group,
            tables,
            moving,
            source_shard,
        }))
    }

    /// Runs the current step.
    async fn advance(&self) -> Result<Action, Error> {
        let status = self.status();
        if let Some(phase::SUCCEEDED | phase::FAILED | phase::ROLLED_BACK) = status.phase.as_deref()
        {
            return Ok(Action::await_change());
        }
        let step = status.step.unwrap_or(SplitStep::Plan);
        if step == SplitStep::Plan {
            return self.plan().await;
        }
        let Some(world) = self.world().await? else {
            return self
                .wait(
                    "Dereferencing",
                    "the cluster, its sharding spec or the moving ShardRange is missing; waiting"
                        .into(),
                )
                .await;
        };
        match step {
            SplitStep::Plan => unreachable!("handled above"),
            SplitStep::ProvisionTarget => self.provision_target(&world).await,
            SplitStep::CopySnapshot => self.copy_snapshot(&world).await,
            SplitStep::CatchUp => self.catch_up(&world).await,
            SplitStep::Verify => self.verify(&world).await,
            SplitStep::CutOver => self.cut_over(&world).await,
            SplitStep::CleanUp => self.clean_up(&world).await,
        }
    }

    /// Step 1: validate, pre-flight, split the source range in two (routing unchanged).
    async fn plan(&self) -> Result<Action, Error> {
        let spec = &self.job.spec;
        let Some(cluster) = self.cluster().await? else {
            return self
                .refuse(
                    "ClusterNotFound",
                    format!(
                        "PostgresCluster {} does not exist: fix spec.cluster.name",
                        spec.cluster.name
                    ),
                )
                .await;
        };
        let Some(sharding) = cluster.spec.sharding.clone() else {
            return self
                .refuse(
                    "NotSharded",
                    format!(
                        "PostgresCluster {} has no spec.sharding: only a sharded cluster's ranges can be split",
                        spec.cluster.name
                    ),
                )
                .await;
        };
        let Some(source) = self.range(&spec.source_range).await? else {
            return self
                .refuse(
                    "SourceRangeNotFound",
                    format!(
                        "ShardRange {} does not exist in namespace {}: set spec.sourceRange to one of the cluster's ShardRanges (kubectl get shardranges)",
                        spec.source_range, self.namespace
                    ),
                )
                .await;
        };
        if source.spec.cluster.name != spec.cluster.name {
            return self
                .refuse(
                    "SourceRangeOfAnotherCluster",
                    format!(
                        "ShardRange {} belongs to cluster {}, not {}",
                        spec.source_range, source.spec.cluster.name, spec.cluster.name
                    ),
                )
                .await;
        }
        let moving_name = plan::moving_range_name(&self.job.name_any());
        // A restart after the ranges were split: the moving half holds the original end.
        let existing_moving = self.range(&moving_name).await?;
        let end = existing_moving
            .as_ref()
            .map_or(source.spec.end, |moving| moving.spec.end);
        if source.spec.state != ShardRangeState::Active {
            return self
                .refuse(
                    "SourceRangeNotActive",
                    format!(
                        "ShardRange {} is {:?}: only an Active range can be split",
                        spec.source_range, source.spec.state
                    ),
                )
                .await;
        }
        let Some(_target_index) = spec
            .target_shard
            .strip_prefix("shard-")
            .and_then(|n| n.parse::<i32>().ok())
        else {
            return self
                .refuse(
                    "InvalidTargetShard",
                    format!(
                        "spec.targetShard {} is not a shard name: use shard-<n>, an existing shard or a new one",
                        spec.target_shard
                    ),
                )
                .await;
        };
        if spec.target_shard == source.spec.shard {
            return self
                .refuse(
                    "TargetIsSource",
                    format!(
                        "spec.targetShard {} already owns ShardRange {}: choose another shard",
                        spec.target_shard, spec.source_range
                    ),
                )
                .await;
        }
        let split = match existing_moving.as_ref().and_then(|m| m.spec.start) {
            Some(start) => start,
            None => match plan::split_point(source.spec.start, end, spec.split_point) {
                Ok(split) => split,
                Err(message) => return self.refuse("SplitPointOutsideRange", message).await,
            },
        };
        let Some(group) = sharding
            .table_groups
            .iter()
            .find(|g| g.name == source.spec.table_group)
        else {
            return self
                .refuse(
                    "UnknownTableGroup",
                    format!(
                        "ShardRange {} names table group {}, which the cluster does not declare",
                        spec.source_range, source.spec.table_group
                    ),
                )
                .await;
        };
        let tables: Vec<MovingTable> = sharding
            .sharded_tables
            .iter()
            .filter(|t| t.table_group == group.name)
            .map(|t| MovingTable {
                name: t.name.clone(),
                key: t.shard_key.clone(),
            })
            .collect();

        // Pre-flight on the source primary: every moving table can be replicated.
        let source_cluster = shard_cluster_name(&spec.cluster.name, &source.spec.shard);
        let Some(source_endpoint) = self.endpoint(&source_cluster, SplitStep::Plan).await? else {
            return self
                .wait(
                    "WaitingForSource",
                    format!("shard {source_cluster} has no primary yet; waiting"),
                )
                .await;
        };
        let step = shard_step(SplitStep::Plan);
        let client = source_endpoint.connect().await.map_err(step)?;
        if let Some(refusal) = shards::logical_decoding_refusal(&client, &source_endpoint)
            .await
            .map_err(shard_step(SplitStep::Plan))?
        {
            return self.refuse("LogicalDecodingOff", refusal).await;
        }
        let mut source_bytes = 0f64;
        for table in &tables {
            if let Some(refusal) = shards::preflight_refusal(&client, &source_endpoint, table)
                .await
                .map_err(shard_step(SplitStep::Plan))?
            {
                return self.refuse("TableNotReplicable", refusal).await;
            }
            let size: Option<i64> = client
                .query_one(
                    "SELECT pg_total_relation_size(to_regclass($1))",
                    &[&plan::table_sql(&table.name)],
                )
                .await
                .map_err(shards::sql_error(&source_endpoint, "measuring the tables"))
                .map_err(shard_step(SplitStep::Plan))?
                .get(0);
            source_bytes += size.unwrap_or(0) as f64;
        }
        // Capacity: an existing target must have at least the source's volume size and room
        // for its share of the source's tables (estimated by the share of the hash space).
        let clusters = self.api::<PostgresCluster>();
        let read = |what: String| move |source| Error::Dereference { what, source };
        let source_child = clusters
            .get_opt(&source_cluster)
            .await
            .map_err(read(format!("PostgresCluster {source_cluster}")))?;
        let target_child = clusters
            .get_opt(&self.target_cluster())
            .await
            .map_err(read(format!("PostgresCluster {}", self.target_cluster())))?;
        let size_of = |c: &PostgresCluster| {
            crate::postgres_cluster::volumes::quantity_bytes(&c.spec.storage.size)
        };
        if let Some(target_child) = &target_child {
            let target_size = size_of(target_child).unwrap_or(f64::MAX);
            let source_size = source_child
                .as_ref()
                .and_then(size_of)
                .unwrap_or(cluster_size(&cluster));
            let share = (upper(end) - i128::from(split)) as f64
                / (upper(end) - lower(source.spec.start)) as f64;
            let moving_bytes = source_bytes * share;
            if target_size < source_size || target_size < moving_bytes {
                return self
                    .refuse(
                        "TargetTooSmall",
                        format!(
                            "shard {} has {} of storage, less than the source shard's {} or the ~{} bytes that move: grow spec.storage.size of {} first",
                            spec.target_shard,
                            target_child.spec.storage.size,
                            source_child
                                .as_ref()
                                .map_or(cluster.spec.storage.size.clone(), |c| c.spec.storage.size.clone()),
                            moving_bytes as i64,
                            self.target_cluster()
                        ),
                    )
                    .await;
            }
        }

        // Split the range in two objects on the source shard: routing does not change, but
        // the moving half can now be paused and moved alone. The upper half is created first:
        // until the lower one shrinks the layout overlaps, and routers keep the previous one.
        let ranges = self.api::<ShardRange>();
        if existing_moving.is_none() {
            let mut moving = ShardRange::new(&moving_name, source.spec.clone());
            moving.spec.start = Some(split);
            moving.spec.end = end;
            moving.metadata.namespace = Some(self.namespace.to_string());
            moving.metadata.labels = source.metadata.labels.clone();
            moving.metadata.owner_references = cluster.controller_owner_ref(&()).map(|o| vec![o]);
            match ranges.create(&PostParams::default(), &moving).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(source) => {
                    return Err(Error::Ranges {
                        what: format!("creating ShardRange {moving_name}"),
                        source,
                    });
                }
            }
        }
        ranges
            .patch(
                &spec.source_range,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"end": split}})),
            )
            .await
            .map_err(|source| Error::Ranges {
                what: format!("shrinking ShardRange {}", spec.source_range),
                source,
            })?;
        let mut status = self.status();
        status.split_point = Some(split);
        status.source_shard = Some(source.spec.shard.clone());
        status.moving_range = Some(moving_name.clone());
        status.started_at = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        self.enter(
            status,
            SplitStep::ProvisionTarget,
            "Planned",
            format!(
                "hashes from {split} of ShardRange {} (now ShardRange {moving_name}) move from {} to {}; {} tables",
                spec.source_range,
                source.spec.shard,
                spec.target_shard,
                tables.len()
            ),
        )
        .await
    }
}

/// Storage size of a cluster's volumes in bytes (the default when unreadable).
fn cluster_size(cluster: &PostgresCluster) -> f64 {
    crate::postgres_cluster::volumes::quantity_bytes(&cluster.spec.storage.size).unwrap_or(0.0)
}
