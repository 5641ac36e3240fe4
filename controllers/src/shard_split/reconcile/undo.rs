//! Undoing a split before its cut-over (a refusal, a deleted job): ranges back to what they were,
//! replication and copied rows gone, a target cluster it provisioned deleted.

use super::*;

impl<'a> Split<'a> {
    /// Undoes a split that has not cut over: replication objects, fence, copied rows on the
    /// target, and the two ranges merged back into the source range. Ends RolledBack.
    pub(super) async fn roll_back(
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

    pub(super) async fn undo(&self, world: &World) -> Result<(), Error> {
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
    pub(super) async fn delete_provisioned_target(&self) -> Result<(), Error> {
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
    pub(super) async fn on_delete(&self) -> Result<Action, Error> {
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
