//! The steps that build the target: provision its shard cluster, copy a snapshot of the moving
//! range, and let logical replication catch up. Apart from the driver because they are the long,
//! restartable part of a split, each idempotent against what a previous attempt left.

use super::*;

impl<'a> Split<'a> {
    /// Step 2: the target shard (its child cluster when new) and the moving tables on it.
    pub(super) async fn provision_target(&self, world: &World) -> Result<Action, Error> {
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
    pub(super) async fn endpoints(
        &self,
        world: &World,
        step: SplitStep,
    ) -> Result<Option<(Endpoint, Endpoint)>, Error> {
        let source = self.endpoint(&world.source_cluster(), step).await?;
        let target = self.endpoint(&self.target_cluster(), step).await?;
        Ok(source.zip(target))
    }

    /// Both shards' primaries, connected; `Err` with the action to wait while one has none.
    pub(super) async fn connected(
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
    pub(super) async fn copy_snapshot(&self, world: &World) -> Result<Action, Error> {
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
    pub(super) async fn catch_up(&self, world: &World) -> Result<Action, Error> {
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
}
