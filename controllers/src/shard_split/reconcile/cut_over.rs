//! The steps that move the range: verify the copy against the source, freeze writes (pause and
//! fence), flip the ShardRanges to the target, then drop replication and the moved rows from the
//! source. Apart from the driver because their order is what keeps every acknowledged write.

use super::*;

impl<'a> Split<'a> {
    pub(super) fn max_pause(&self) -> Duration {
        Duration::from_millis(self.job.spec.max_write_pause_millis.max(1) as u64)
    }

    /// Counts and checksums of every moving table on both shards; the first table that differs.
    pub(super) async fn compare(
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
    pub(super) async fn verify(&self, world: &World) -> Result<Action, Error> {
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

    pub(super) async fn patch_moving(
        &self,
        world: &World,
        spec: serde_json::Value,
    ) -> Result<(), Error> {
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
    pub(super) async fn unpause(
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
    pub(super) async fn freeze(
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
    pub(super) async fn cut_over(&self, world: &World) -> Result<Action, Error> {
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
    pub(super) async fn drop_replication(
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
    pub(super) async fn clean_up(&self, world: &World) -> Result<Action, Error> {
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
}
