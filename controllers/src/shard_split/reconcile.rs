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

    /// Step 2: the target shard (its child cluster when new) and the moving tables on it.
    async fn provision_target(&self, world: &World) -> Result<Action, Error> {
        let target = self.target_cluster();
        let clusters = self.api::<PostgresCluster>();
        let existing = clusters
            .get_opt(&target)
            .await
            .map_err(|source| Error::Dereference {
                what: format!("PostgresCluster {target}"),
                source,
            })?;
        if existing.is_none() {
            let index = self
                .job
                .spec
                .target_shard
                .trim_start_matches("shard-")
                .parse::<i32>()
                .unwrap_or_default();
            crate::sharded_cluster::reconcile::ensure_credentials(
                &world.cluster,
                self.ctx,
                self.namespace,
                [index],
            )
            .await
            .map_err(|e| Error::Provision(Box::new(e)))?;
            let mut child = child_cluster(&world.cluster, index);
            child
                .annotations_mut()
                .insert(ANNOTATION_PROVISIONED_BY.to_string(), self.uid.clone());
            match clusters.create(&PostParams::default(), &child).await {
                Ok(_) => {
                    self.publish(
                        EventType::Normal,
                        "TargetProvisioned",
                        format!("created PostgresCluster {target} for the new shard"),
                    )
                    .await
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(source) => {
                    return Err(Error::Ranges {
                        what: format!("creating PostgresCluster {target}"),
                        source,
                    });
                }
            }
        }
        let step = SplitStep::ProvisionTarget;
        let Some(target_endpoint) = self.endpoint(&target, step).await? else {
            return self
                .wait(
                    "WaitingForTarget",
                    format!("shard cluster {target} has no primary yet; waiting"),
                )
                .await;
        };
        let Some(source_endpoint) = self.endpoint(&world.source_cluster(), step).await? else {
            return self
                .wait(
                    "WaitingForSource",
                    "the source shard has no primary; waiting".into(),
                )
                .await;
        };
        let source = source_endpoint.connect().await.map_err(shard_step(step))?;
        let target_client = target_endpoint.connect().await.map_err(shard_step(step))?;
        for table in &world.tables {
            let on_source = shards::table_exists(&source, &source_endpoint, &table.name)
                .await
                .map_err(shard_step(step))?;
            let on_target = shards::table_exists(&target_client, &target_endpoint, &table.name)
                .await
                .map_err(shard_step(step))?;
            if on_source && !on_target {
                for statement in shards::table_ddl(&source, &source_endpoint, &table.name)
                    .await
                    .map_err(shard_step(step))?
                {
                    target_client
                        .batch_execute(&statement)
                        .await
                        .map_err(shards::sql_error(
                            &target_endpoint,
                            format!("creating table {}", table.name),
                        ))
                        .map_err(shard_step(step))?;
                }
            }
        }
        self.enter(
            self.status(),
            SplitStep::CopySnapshot,
            "TargetReady",
            format!("shard {target} is up with the moving tables"),
        )
        .await
    }

    /// Both primaries of a step, or a wait.
    async fn endpoints(
        &self,
        world: &World,
        step: SplitStep,
    ) -> Result<Option<(Endpoint, Endpoint)>, Error> {
        let source = self.endpoint(&world.source_cluster(), step).await?;
        let target = self.endpoint(&self.target_cluster(), step).await?;
        Ok(source.zip(target))
    }

    /// Both shards' primaries, connected; `Err` with the action to wait while one has none.
    async fn connected(
        &self,
        world: &World,
        step: SplitStep,
    ) -> Result<Result<Connected, Action>, Error> {
        let Some((source_endpoint, target_endpoint)) = self.endpoints(world, step).await? else {
            return self
                .wait("WaitingForShards", "a shard has no primary; waiting".into())
                .await
                .map(Err);
        };
        let source = source_endpoint.connect().await.map_err(shard_step(step))?;
        let target = target_endpoint.connect().await.map_err(shard_step(step))?;
        Ok(Ok(Connected {
            source_endpoint,
            source,
            target_endpoint,
            target,
        }))
    }

    /// Step 3: slot with an exported snapshot, then the moving rows of every table copied in
    /// that snapshot (binary COPY, tables in parallel). Starts over cleanly when repeated.
    async fn copy_snapshot(&self, world: &World) -> Result<Action, Error> {
        let step = SplitStep::CopySnapshot;
        let Some((source_endpoint, target_endpoint)) = self.endpoints(world, step).await? else {
            return self
                .wait("WaitingForShards", "a shard has no primary; waiting".into())
                .await;
        };
        let name = plan::replication_name(&self.uid);
        let barrier = plan::barrier_table(&self.uid);
        let started = Instant::now();
        let source = source_endpoint.connect().await.map_err(shard_step(step))?;
        let target = target_endpoint.connect().await.map_err(shard_step(step))?;
        let tables: Vec<&MovingTable> = {
            let mut present = Vec::new();
            for table in &world.tables {
                if shards::table_exists(&source, &source_endpoint, &table.name)
                    .await
                    .map_err(shard_step(step))?
                {
                    present.push(table);
                }
            }
            present
        };
        // A repeated step: whatever an interrupted attempt left goes first.
        shards::drop_subscription(&target, &target_endpoint, &name)
            .await
            .map_err(shard_step(step))?;
        shards::drop_slot_and_publication(&source, &source_endpoint, &name)
            .await
            .map_err(shard_step(step))?;
        for table in &tables {
            shards::delete_rows(
                &target,
                &target_endpoint,
                &table.name,
                &world.predicate(&table.key),
                false,
            )
            .await
            .map_err(shard_step(step))?;
        }
        // The publication exists before the slot, so decoding from the slot's start finds it.
        shards::create_barrier(&source, &source_endpoint, &barrier)
            .await
            .map_err(shard_step(step))?;
        shards::create_barrier(&target, &target_endpoint, &barrier)
            .await
            .map_err(shard_step(step))?;
        let members: Vec<(String, String)> = tables
            .iter()
            .map(|t| (t.name.clone(), world.predicate(&t.key)))
            .collect();
        shards::create_publication(&source, &source_endpoint, &name, &members, &barrier)
            .await
            .map_err(shard_step(step))?;
        let mut replication = shards::ReplicationConnection::connect(&source_endpoint)
            .await
            .map_err(shard_step(step))?;
        let snapshot = replication
            .create_slot_exporting_snapshot(&name)
            .await
            .map_err(shard_step(step))?;
        let predicates: Vec<String> = tables.iter().map(|t| world.predicate(&t.key)).collect();
        let copies = tables.iter().zip(&predicates).map(|(table, predicate)| {
            shards::copy_table(
                &source_endpoint,
                &target_endpoint,
                &snapshot,
                &table.name,
                predicate,
            )
        });
        let copied = futures::future::try_join_all(copies).await;
        replication.close().await;
        let rows: u64 = copied.map_err(shard_step(step))?.into_iter().sum();
        let mut status = self.status();
        status.rows_copied = Some(rows as i64);
        self.enter(
            status,
            SplitStep::CatchUp,
            "SnapshotCopied",
            format!(
                "{rows} rows of {} tables copied in {} ms",
                tables.len(),
                started.elapsed().as_millis()
            ),
        )
        .await
    }

    /// Step 4: the subscription streams the range's changes since the snapshot; the step ends
    /// when the target applies a fresh barrier quickly.
    async fn catch_up(&self, world: &World) -> Result<Action, Error> {
        let step = SplitStep::CatchUp;
        let Connected {
            source_endpoint,
            source,
            target_endpoint,
            target,
        } = match self.connected(world, step).await? {
            Ok(connected) => connected,
            Err(wait) => return Ok(wait),
        };
        let name = plan::replication_name(&self.uid);
        shards::create_subscription(&target, &target_endpoint, &source_endpoint, &name)
            .await
            .map_err(shard_step(step))?;
        let within = CATCH_UP_LAG.max(self.max_pause() / 2);
        let caught_up = shards::caught_up_within(
            &source,
            &source_endpoint,
            &target,
            &target_endpoint,
            &plan::barrier_table(&self.uid),
            within,
        )
        .await
        .map_err(shard_step(step))?;
        if !caught_up {
            return self
                .wait(
                    "CatchingUp",
                    format!(
                        "the target applies the range's changes more than {} ms behind the source; waiting",
                        within.as_millis()
                    ),
                )
                .await;
        }
        let next = if self.job.spec.verify {
            SplitStep::Verify
        } else {
            SplitStep::CutOver
        };
        self.enter(
            self.status(),
            next,
            "CaughtUp",
            format!("the target is less than {} ms behind", within.as_millis()),
        )
        .await
    }

    fn max_pause(&self) -> Duration {
        Duration::from_millis(self.job.spec.max_write_pause_millis.max(1) as u64)
    }

    /// Counts and checksums of every moving table on both shards; the first table that differs.
    async fn compare(
        &self,
        world: &World,
        source: (&tokio_postgres::Client, &Endpoint),
        target: (&tokio_postgres::Client, &Endpoint),
        step: SplitStep,
    ) -> Result<Option<String>, Error> {
        for table in &world.tables {
            if !shards::table_exists(source.0, source.1, &table.name)
                .await
                .map_err(shard_step(step))?
            {
                continue;
            }
            let columns = shards::columns(source.0, source.1, &table.name)
                .await
                .map_err(shard_step(step))?;
            let predicate = world.predicate(&table.key);
            let on_source = shards::checksum(source.0, source.1, &table.name, &columns, &predicate)
                .await
                .map_err(shard_step(step))?;
            let on_target = shards::checksum(target.0, target.1, &table.name, &columns, &predicate)
                .await
                .map_err(shard_step(step))?;
            if on_source != on_target {
                return Ok(Some(format!(
                    "table {}: {} rows (checksum {}) on the source, {} rows (checksum {}) on the target",
                    table.name, on_source.0, on_source.1, on_target.0, on_target.1
                )));
            }
        }
        Ok(None)
    }

    /// Step 5: the decisive comparison. Source and target are equal only while no write to the
    /// range is in flight, so the range is frozen as for a cut-over (paused, caught up, fenced,
    /// caught up; within `maxWritePauseMillis` or retried), a snapshot is taken on each side,
    /// writes resume, and the counts and checksums are compared in the two snapshots, however
    /// long that takes: the pause does not grow with the range's size. A mismatch rolls back.
    async fn verify(&self, world: &World) -> Result<Action, Error> {
        let step = SplitStep::Verify;
        let mut connected = match self.connected(world, step).await? {
            Ok(connected) => connected,
            Err(wait) => return Ok(wait),
        };
        if world.moving.spec.state == ShardRangeState::WritePaused {
            // A freeze interrupted by a restart: undo it first.
            self.unpause(world, &connected.source, &connected.source_endpoint, step)
                .await?;
        }
        // The snapshot sessions, connected before the pause.
        let source_snapshot = connected
            .source_endpoint
            .connect()
            .await
            .map_err(shard_step(step))?;
        let target_snapshot = connected
            .target_endpoint
            .connect()
            .await
            .map_err(shard_step(step))?;
        let message = plan::verify_fence_message(
            world.moving.spec.start,
            world.moving.spec.end,
            &world.group.name,
        );
        let Some(paused_at) = self.freeze(world, &mut connected, &message, step).await? else {
            return Ok(Action::requeue(RETRY_CUT_OVER));
        };
        let snapshot = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT 1";
        let taken = async {
            source_snapshot
                .batch_execute(snapshot)
                .await
                .map_err(shards::sql_error(
                    &connected.source_endpoint,
                    "taking a snapshot",
                ))?;
            target_snapshot
                .batch_execute(snapshot)
                .await
                .map_err(shards::sql_error(
                    &connected.target_endpoint,
                    "taking a snapshot",
                ))
        }
        .await;
        self.unpause(world, &connected.source, &connected.source_endpoint, step)
            .await?;
        let pause = paused_at.elapsed();
        taken.map_err(shard_step(step))?;
        let difference = self
            .compare(
                world,
                (&source_snapshot, &connected.source_endpoint),
                (&target_snapshot, &connected.target_endpoint),
                step,
            )
            .await?;
        if let Some(difference) = difference {
            return self
                .roll_back(
                    world,
                    "VerifyFailed",
                    format!(
                        "source and target differ over the moving range: {difference}; rolled back"
                    ),
                )
                .await;
        }
        self.enter(
            self.status(),
            SplitStep::CutOver,
            "Verified",
            format!(
                "row counts and checksums of {} tables match in snapshots of both shards (writes paused {} ms to take them)",
                world.tables.len(),
                pause.as_millis()
            ),
        )
        .await
    }

    async fn patch_moving(&self, world: &World, spec: serde_json::Value) -> Result<(), Error> {
        let name = world.moving.name_any();
        self.api::<ShardRange>()
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .map_err(|source| Error::Ranges {
                what: format!("updating ShardRange {name}"),
                source,
            })?;
        Ok(())
    }

    /// Undoes a paused, fenced attempt: writes go to the source again.
    async fn unpause(
        &self,
        world: &World,
        source: &tokio_postgres::Client,
        source_endpoint: &Endpoint,
        step: SplitStep,
    ) -> Result<(), Error> {
        shards::drop_fence(
            source,
            source_endpoint,
            &plan::fence_name(&self.uid),
            &world.tables,
        )
        .await
        .map_err(shard_step(step))?;
        self.patch_moving(world, json!({"state": "Active"})).await
    }

    /// Pauses the moving range (routers hold its writes), waits for the target to catch up,
    /// fences the source's range (refusing writes with `message`) and waits again: afterwards
    /// the range is equal on both sides and cannot change. Returns when the pause began; `None`
    /// when this did not fit `maxWritePauseMillis`: the pause and the fence are undone (writes
    /// resume on the source) and the condition says so.
    async fn freeze(
        &self,
        world: &World,
        connected: &mut Connected,
        message: &str,
        step: SplitStep,
    ) -> Result<Option<Instant>, Error> {
        let Connected {
            source_endpoint,
            source,
            target_endpoint,
            target,
        } = connected;
        let barrier = plan::barrier_table(&self.uid);
        let fence = plan::fence_name(&self.uid);
        let max_pause = self.max_pause();
        let paused_at = Instant::now();
        self.patch_moving(world, json!({"state": "WritePaused"}))
            .await?;
        let remaining = || max_pause.saturating_sub(paused_at.elapsed());
        let mut fits = shards::caught_up_within(
            source,
            source_endpoint,
            target,
            target_endpoint,
            &barrier,
            remaining(),
        )
        .await
        .map_err(shard_step(step))?;
        if fits {
            let function = plan::fence_function_sql(
                &fence,
                world.key_type(),
                world.group.vindex,
                (world.moving.spec.start, world.moving.spec.end),
                message,
            );
            match shards::install_fence(
                source,
                source_endpoint,
                &function,
                &fence,
                &world.tables,
                remaining().max(Duration::from_millis(1)),
            )
            .await
            {
                Ok(()) => {}
                // The lock behind long writes did not come within the budget.
                Err(ShardError::Sql { source: error, .. })
                    if error.code()
                        == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    fits = false
                }
                Err(error) => {
                    self.unpause(world, source, source_endpoint, step).await?;
                    return Err(shard_step(step)(error));
                }
            }
        }
        if fits {
            fits = shards::caught_up_within(
                source,
                source_endpoint,
                target,
                target_endpoint,
                &barrier,
                remaining(),
            )
            .await
            .map_err(shard_step(step))?;
        }
        if fits {
            return Ok(Some(paused_at));
        }
        self.unpause(world, source, source_endpoint, step).await?;
        let mut status = self.status();
        let what = if step == SplitStep::CutOver {
            status.aborted_cut_overs = Some(status.aborted_cut_overs.unwrap_or(0) + 1);
            "the cut-over"
        } else {
            "the pause for the verification snapshots"
        };
        let message = format!(
            "the target did not catch up within maxWritePauseMillis ({} ms), so {what} was aborted: writes resumed on {}; retrying",
            max_pause.as_millis(),
            world.source_shard
        );
        set_progress(self.job, &mut status, "CutOverAborted", message.clone());
        self.write_status(status).await?;
        self.publish(EventType::Warning, "CutOverAborted", message)
            .await;
        Ok(None)
    }

    /// Step 6: freeze the range (pause, catch up, fence, catch up), flip it to the target with
    /// a higher routing epoch. The fence stays: a router that has not seen the flip is refused.
    async fn cut_over(&self, world: &World) -> Result<Action, Error> {
        let step = SplitStep::CutOver;
        let target_shard = &self.job.spec.target_shard;
        if &world.moving.spec.shard == target_shard {
            // Flipped before a restart: only forward from here.
            return self
                .enter(
                    self.status(),
                    SplitStep::CleanUp,
                    "CutOver",
                    format!("the range lives on {target_shard}"),
                )
                .await;
        }
        let mut connected = match self.connected(world, step).await? {
            Ok(connected) => connected,
            Err(wait) => return Ok(wait),
        };
        if world.moving.spec.state == ShardRangeState::WritePaused {
            // An attempt interrupted by a restart: undo it, then try afresh.
            self.unpause(world, &connected.source, &connected.source_endpoint, step)
                .await?;
        }
        let epoch = world.moving.spec.epoch + 1;
        let message = plan::fence_message(
            world.moving.spec.start,
            world.moving.spec.end,
            &world.group.name,
            target_shard,
            epoch,
        );
        let Some(paused_at) = self.freeze(world, &mut connected, &message, step).await? else {
            return Ok(Action::requeue(RETRY_CUT_OVER));
        };
        self.patch_moving(
            world,
            json!({"shard": target_shard, "state": "Active", "epoch": epoch}),
        )
        .await?;
        let pause = paused_at.elapsed();
        let mut status = self.status();
        status.write_pause_millis = Some(pause.as_millis() as i64);
        self.enter(
            status,
            SplitStep::CleanUp,
            "CutOver",
            format!(
                "ShardRange {} now names {target_shard} (epoch {epoch}); writes paused {} ms",
                world.moving.name_any(),
                pause.as_millis()
            ),
        )
        .await
    }

    /// Drops the replication objects on both shards (either direction of the job's end).
    async fn drop_replication(
        &self,
        source: Option<(&tokio_postgres::Client, &Endpoint)>,
        target: Option<(&tokio_postgres::Client, &Endpoint)>,
        step: SplitStep,
    ) -> Result<(), Error> {
        let name = plan::replication_name(&self.uid);
        let barrier = plan::barrier_table(&self.uid);
        if let Some((target, endpoint)) = target {
            shards::drop_subscription(target, endpoint, &name)
                .await
                .map_err(shard_step(step))?;
            shards::drop_barrier(target, endpoint, &barrier)
                .await
                .map_err(shard_step(step))?;
        }
        if let Some((source, endpoint)) = source {
            shards::drop_slot_and_publication(source, endpoint, &name)
                .await
                .map_err(shard_step(step))?;
            shards::drop_barrier(source, endpoint, &barrier)
                .await
                .map_err(shard_step(step))?;
        }
        Ok(())
    }

    /// Step 7: replication objects away, moved rows deleted on the source (the fence stays:
    /// a router on an old epoch is still refused there).
    async fn clean_up(&self, world: &World) -> Result<Action, Error> {
        let step = SplitStep::CleanUp;
        let Connected {
            source_endpoint,
            source,
            target_endpoint,
            target,
        } = match self.connected(world, step).await? {
            Ok(connected) => connected,
            Err(wait) => return Ok(wait),
        };
        self.drop_replication(
            Some((&source, &source_endpoint)),
            Some((&target, &target_endpoint)),
            step,
        )
        .await?;
        let mut deleted = 0;
        for table in &world.tables {
            if shards::table_exists(&source, &source_endpoint, &table.name)
                .await
                .map_err(shard_step(step))?
            {
                deleted += shards::delete_rows(
                    &source,
                    &source_endpoint,
                    &table.name,
                    &world.predicate(&table.key),
                    true,
                )
                .await
                .map_err(shard_step(step))?;
            }
        }
        let mut status = self.status();
        status.phase = Some(phase::SUCCEEDED.into());
        status.step = Some(step);
        let message = format!(
            "split done: ShardRange {} lives on {}; {deleted} moved rows deleted from {}",
            world.moving.name_any(),
            self.job.spec.target_shard,
            world.source_shard
        );
        set_progress(self.job, &mut status, "Succeeded", message.clone());
        self.write_status(status).await?;
        self.publish(EventType::Normal, "Succeeded", message).await;
        Ok(Action::await_change())
    }

    /// Undoes a split that has not cut over: replication objects, fence, copied rows on the
    /// target, and the two ranges merged back into the source range. Ends RolledBack.
    async fn roll_back(
        &self,
        world: &World,
        reason: &str,
        message: String,
    ) -> Result<Action, Error> {
        self.undo(world).await?;
        let mut status = self.status();
        status.phase = Some(phase::ROLLED_BACK.into());
        set_progress(self.job, &mut status, reason, message.clone());
        self.write_status(status).await?;
        self.publish(EventType::Warning, reason, message).await;
        Ok(Action::await_change())
    }

    async fn undo(&self, world: &World) -> Result<(), Error> {
        let step = self.status().step.unwrap_or(SplitStep::Plan);
        let source_endpoint = self.endpoint(&world.source_cluster(), step).await?;
        let target_endpoint = if step >= SplitStep::CopySnapshot {
            self.endpoint(&self.target_cluster(), step).await?
        } else {
            None
        };
        let source = match &source_endpoint {
            Some(endpoint) => Some(endpoint.connect().await.map_err(shard_step(step))?),
            None => None,
        };
        let target = match &target_endpoint {
            Some(endpoint) => Some(endpoint.connect().await.map_err(shard_step(step))?),
            None => None,
        };
        self.drop_replication(
            source.as_ref().zip(source_endpoint.as_ref()),
            target.as_ref().zip(target_endpoint.as_ref()),
            step,
        )
        .await?;
        if let (Some(source), Some(endpoint)) = (&source, &source_endpoint) {
            shards::drop_fence(
                source,
                endpoint,
                &plan::fence_name(&self.uid),
                &world.tables,
            )
            .await
            .map_err(shard_step(step))?;
        }
        if let (Some(target), Some(endpoint)) = (&target, &target_endpoint) {
            for table in &world.tables {
                if shards::table_exists(target, endpoint, &table.name)
                    .await
                    .map_err(shard_step(step))?
                {
                    shards::delete_rows(
                        target,
                        endpoint,
                        &table.name,
                        &world.predicate(&table.key),
                        false,
                    )
                    .await
                    .map_err(shard_step(step))?;
                }
            }
        }
        // Merge: the source range grows back first (an overlap, which routers skip), then the
        // moving half goes.
        let ranges = self.api::<ShardRange>();
        let source_range = &self.job.spec.source_range;
        if self.range(source_range).await?.is_some() {
            ranges
                .patch(
                    source_range,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"end": world.moving.spec.end}})),
                )
                .await
                .map_err(|source| Error::Ranges {
                    what: format!("merging ShardRange {source_range} back"),
                    source,
                })?;
        }
        match ranges
            .delete(&world.moving.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(Error::Ranges {
                    what: format!("deleting ShardRange {}", world.moving.name_any()),
                    source,
                });
            }
        }
        self.delete_provisioned_target().await
    }

    /// Deletes the target shard's cluster (and its superuser Secret) when this job created it
    /// in step 2; a shard that existed before the job is left alone.
    async fn delete_provisioned_target(&self) -> Result<(), Error> {
        let target = self.target_cluster();
        let clusters = self.api::<PostgresCluster>();
        let provisioned = clusters
            .get_opt(&target)
            .await
            .map_err(|source| Error::Dereference {
                what: format!("PostgresCluster {target}"),
                source,
            })?
            .is_some_and(|child| {
                child.annotations().get(ANNOTATION_PROVISIONED_BY) == Some(&self.uid)
            });
        if !provisioned {
            return Ok(());
        }
        fn gone<T>(result: Result<T, kube::Error>, what: String) -> Result<(), Error> {
            match result {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(source) => Err(Error::Ranges { what, source }),
            }
        }
        gone(
            clusters.delete(&target, &DeleteParams::default()).await,
            format!("deleting PostgresCluster {target}, which this job provisioned"),
        )?;
        let secret = api::contract::superuser_secret(&target);
        gone(
            self.api::<k8s_openapi::api::core::v1::Secret>()
                .delete(&secret, &DeleteParams::default())
                .await,
            format!("deleting Secret {secret}"),
        )?;
        self.publish(
            EventType::Normal,
            "TargetDeleted",
            format!("deleted PostgresCluster {target}, which this job had provisioned"),
        )
        .await;
        Ok(())
    }

    /// The job is being deleted: an unfinished split rolls back, one past its cut-over
    /// finishes its clean-up first.
    async fn on_delete(&self) -> Result<Action, Error> {
        let status = self.status();
        if matches!(
            status.phase.as_deref(),
            Some(phase::SUCCEEDED | phase::FAILED | phase::ROLLED_BACK)
        ) || status.step.unwrap_or(SplitStep::Plan) == SplitStep::Plan
        {
            return Ok(Action::await_change());
        }
        let Some(world) = self.world().await? else {
            return Ok(Action::await_change());
        };
        if world.moving.spec.shard == self.job.spec.target_shard {
            self.clean_up(&world).await?;
        } else {
            self.undo(&world).await?;
            self.publish(
                EventType::Normal,
                "RolledBack",
                "the job was deleted before its cut-over: the split is undone".into(),
            )
            .await;
        }
        Ok(Action::await_change())
    }
}

/// Storage size of a cluster's volumes in bytes (the default when unreadable).
fn cluster_size(cluster: &PostgresCluster) -> f64 {
    crate::postgres_cluster::volumes::quantity_bytes(&cluster.spec.storage.size).unwrap_or(0.0)
}
