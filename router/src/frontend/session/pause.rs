//! The router's part of a split's cut-over. While a ShardRange is `WritePaused`, statements that
//! write to (or lock) its rows wait for the next topology in which the range is active again,
//! wherever it now is, then run there; reads go on to the current shard. A shard's fence (the
//! source refusing writes to a range that moved, SQLSTATE 40001) means this router has not seen
//! the new epoch yet: it reads its topology again at once, and a lone autocommit write is
//! retried once on the new place; inside a transaction the client gets the retryable error.
//!
//! Reads are never held, not even in a transaction that already wrote to the range: those writes
//! were made on the source before the pause, commit there, and reach the target with the
//! catch-up. A fence installed with CREATE TRIGGER waits for them (its lock conflicts with the
//! one their writes hold), so they cannot commit on the source after the flip.

use super::*;

/// Is `error` a source shard's fence: a serialization failure (40001) saying the range moved?
pub(in crate::frontend) fn is_fence(error: &RouterError) -> bool {
    let RouterError::Backend(crate::backend::connection::BackendError::Server { error, .. }) =
        error
    else {
        return false;
    };
    error.code == "40001" && error.message.contains("moved")
}

/// A key of `scope` as a value (`None`: a parameter the statement itself will reject).
fn key_value(
    topology: &Topology,
    group: usize,
    key: &KeyExpr,
    params: &Params,
) -> Option<KeyValue> {
    match key {
        KeyExpr::Literal(value) => Some(value.clone()),
        KeyExpr::Param(param) => {
            key_from_param(params, *param, topology.groups[group].key_type).ok()
        }
    }
}

/// The paused range `scopes` write to in `topology`, if any.
fn paused_range<'t>(
    topology: &'t Topology,
    scopes: &[plan::WriteScope],
    params: &Params,
) -> Option<&'t crate::topology::PausedRange> {
    scopes.iter().find_map(|scope| match &scope.keys {
        plan::KeyScope::All => topology.paused.iter().find(|r| r.group == scope.group),
        plan::KeyScope::Keys(keys) => keys.iter().find_map(|key| {
            let value = key_value(topology, scope.group, key, params)?;
            topology.paused_range(scope.group, &value)
        }),
    })
}

/// Did a row `scopes` write change shard between `before` and `after`? (For a write to any
/// row of a group: did the routing epoch grow?) Names the table group.
fn moved(
    before: &Topology,
    after: &Topology,
    scopes: &[plan::WriteScope],
    params: &Params,
) -> Option<String> {
    scopes.iter().find_map(|scope| {
        let group = after.groups.get(scope.group)?.name.clone();
        let changed = match &scope.keys {
            plan::KeyScope::All => after.epoch > before.epoch,
            plan::KeyScope::Keys(keys) => keys.iter().any(|key| {
                let Some(value) = key_value(after, scope.group, key, params) else {
                    return false;
                };
                let shard_name = |topology: &Topology| {
                    plan::shard_of(topology, scope.group, &value)
                        .ok()
                        .and_then(|shard| topology.shards.get(shard))
                        .map(|endpoint| endpoint.name.clone())
                };
                shard_name(before) != shard_name(after)
            }),
        };
        changed.then_some(group)
    })
}

/// `planned` made again for `topology` when its plan fixed shards at plan time (a key written
/// as a literal): after a hold the range may live elsewhere. Plans that resolve their keys when
/// they run (parameters, split inserts, COPY) route by the topology they run on anyway.
fn replanned(topology: &Topology, planned: &Planned) -> Option<Planned> {
    if !matches!(
        planned.plan,
        Plan::Single(Target::Shard(_))
            | Plan::Scatter {
                shards: Some(_),
                write: true,
                ..
            }
    ) {
        return None;
    }
    let mut plans = plan::plan_sql(topology, &planned.sql).ok()?;
    (plans.len() == 1).then(|| plans.remove(0))
}

impl Session {
    /// A transaction that has not touched a shard yet routes by the newest topology (it may
    /// have begun before a cut-over).
    pub(super) fn adopt_current_topology(&mut self) {
        if let Some(transaction) = self.transaction.as_mut()
            && transaction.participants.is_empty()
            && transaction.runtime.version != self.state.versions.load(Ordering::SeqCst)
        {
            transaction.runtime = self.state.runtime();
        }
    }

    /// Runs `planned` as a split's cut-over needs: held while it writes to a paused range,
    /// refused when its rows moved since its transaction began, retried once on the new place
    /// when a source's fence refused it in autocommit.
    pub(super) async fn execute_in_cut_over(
        &mut self,
        planned: &Planned,
        params: &Params,
        result_formats: &[i16],
        cache: bool,
    ) -> Result<Outcome, RouterError> {
        self.adopt_current_topology();
        let scopes = self.write_scopes_now(planned);
        let held = self.hold_while_paused(planned, params, &scopes).await?;
        let planned = held.as_ref().unwrap_or(planned);
        self.refuse_moved_in_transaction(params, &scopes)?;
        let before = self.state.runtime();
        let result = self
            .execute_plan(planned, params, result_formats, cache)
            .await;
        match &result {
            Err(error) if is_fence(error) => {
                let Some(retry) = self.after_fence(planned, params, &before).await else {
                    return result;
                };
                let scopes = self.write_scopes_now(&retry);
                let held = self.hold_while_paused(&retry, params, &scopes).await?;
                self.execute_plan(
                    held.as_ref().unwrap_or(&retry),
                    params,
                    result_formats,
                    cache,
                )
                .await
            }
            _ => result,
        }
    }

    /// The tables and keys `planned` writes, when the current topology pauses a range or this
    /// transaction routes by an older topology (empty otherwise, without parsing anything).
    pub(super) fn write_scopes_now(&self, planned: &Planned) -> Vec<plan::WriteScope> {
        let stale_transaction = self.transaction.as_ref().is_some_and(|transaction| {
            transaction.runtime.topology.epoch != self.state.epoch.load(Ordering::SeqCst)
        });
        if !self.state.any_paused.load(Ordering::SeqCst) && !stale_transaction {
            return Vec::new();
        }
        plan::write_scopes(&self.state.runtime().topology, &planned.sql)
    }

    /// Holds a statement that writes to a paused range until a topology in which that range is
    /// active again (a split's cut-over: the operator flips it to its new shard), up to the
    /// `write_pause_hold_ms` bound, then fails it with 40001 (the connection stays usable).
    /// Returns the plan to run when the statement was held and its plan fixed shards.
    ///
    /// The bound matters inside a transaction: one that already holds row locks on the source
    /// and then writes to the paused range waits here while the operator waits for those locks
    /// (its fence cannot be installed past them). Neither would ever give way; the bound ends
    /// the wait, the transaction fails, its locks go, and the cut-over proceeds.
    pub(super) async fn hold_while_paused(
        &mut self,
        planned: &Planned,
        params: &Params,
        scopes: &[plan::WriteScope],
    ) -> Result<Option<Planned>, RouterError> {
        if scopes.is_empty() {
            return Ok(None);
        }
        let mut versions = self.state.versions_seen.subscribe();
        versions.borrow_and_update();
        let runtime = self.state.runtime();
        let Some(range) = paused_range(&runtime.topology, scopes, params) else {
            return Ok(None);
        };
        let range = range.name.clone();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.state.write_pause_hold();
        tracing::debug!(%range, "write held: the range is paused for a split");
        let cancel = self.cancel.clone();
        let interrupted = async {
            match &cancel {
                Some(cancel) => cancel.interrupted().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(interrupted);
        let runtime = loop {
            let changed = tokio::select! {
                changed = tokio::time::timeout_at(deadline, versions.changed()) => changed,
                () = &mut interrupted => {
                    self.state
                        .metrics
                        .observe_write_pause_hold(started.elapsed().as_secs_f64());
                    return Err(RouterError::session(
                        "57014",
                        "canceling statement due to user request",
                    ));
                }
            };
            if !matches!(changed, Ok(Ok(()))) {
                let waited = started.elapsed();
                self.state
                    .metrics
                    .observe_write_pause_hold(waited.as_secs_f64());
                tracing::info!(%range, waited_ms = waited.as_millis() as u64, "write held past the bound; the client retries");
                return Err(RouterError::session(
                    "40001",
                    format!("range {range} is paused for a split; retry"),
                ));
            }
            versions.borrow_and_update();
            let runtime = self.state.runtime();
            if paused_range(&runtime.topology, scopes, params).is_none() {
                break runtime;
            }
        };
        let waited = started.elapsed();
        self.state
            .metrics
            .observe_write_pause_hold(waited.as_secs_f64());
        tracing::info!(%range, epoch = runtime.topology.epoch, waited_ms = waited.as_millis() as u64, "held write released");
        Ok(replanned(&runtime.topology, planned))
    }

    /// Inside a transaction that routes by an older topology: fails a write whose rows moved
    /// since the transaction began (its earlier statements ran where they were; this one cannot
    /// go to the new place in the same transaction, and the old place refuses it).
    pub(super) fn refuse_moved_in_transaction(
        &self,
        params: &Params,
        scopes: &[plan::WriteScope],
    ) -> Result<(), RouterError> {
        let Some(transaction) = &self.transaction else {
            return Ok(());
        };
        let current = self.state.runtime();
        if scopes.is_empty() || transaction.runtime.version == current.version {
            return Ok(());
        }
        match moved(
            &transaction.runtime.topology,
            &current.topology,
            scopes,
            params,
        ) {
            Some(group) => Err(RouterError::session(
                "40001",
                format!(
                    "rows of table group {group} moved to another shard during this transaction \
                     (a split's cut-over); retry the transaction"
                ),
            )),
            None => Ok(()),
        }
    }

    /// After a fence error: reads the topology again now (instead of waiting for the watch),
    /// and, for an autocommit statement whose rows did move, returns the plan to retry it with
    /// on the new topology (once; nothing of the failed attempt was committed or sent).
    pub(super) async fn after_fence(
        &mut self,
        planned: &Planned,
        params: &Params,
        before: &Runtime,
    ) -> Option<Planned> {
        let ticket = self.state.request_refresh();
        if self.transaction.is_some() || !self.state.has_refresher() {
            return None;
        }
        let mut done = self.state.refreshes_done.subscribe();
        let waited = tokio::time::timeout(self.state.write_pause_hold(), async {
            while *done.borrow_and_update() < ticket {
                if done.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if waited.is_err() {
            return None;
        }
        let current = self.state.runtime();
        let scopes = plan::write_scopes(&current.topology, &planned.sql);
        let group = moved(&before.topology, &current.topology, &scopes, params)?;
        tracing::info!(
            group,
            epoch = current.topology.epoch,
            "a shard's fence refused a write to a moved range; retrying it on the new topology"
        );
        Some(replanned(&current.topology, planned).unwrap_or_else(|| planned.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{PausedRange, RouterConfig};
    use crate::vindex::{HashRanges, Vindex, key_hash};

    /// Two shards, `t` sharded by `id`; the upper half of the signed space (shard b's
    /// non-negative positions) is paused.
    fn topology() -> Topology {
        let config = RouterConfig::from_toml(
            "[[shards]]\nname='a'\nport=1\n[[shards]]\nname='b'\nport=2\n[[table_groups]]\n\
             name='g'\n[[sharded_tables]]\nname='t'\ntable_group='g'\nshard_key='id'\n",
        )
        .unwrap();
        let mut topology = Topology::from_config(&config).unwrap();
        topology.paused = vec![PausedRange {
            name: "db-g-1".into(),
            group: 0,
            start: Some(0),
            end: None,
        }];
        topology
    }

    fn key(paused: bool) -> i64 {
        (1..)
            .find(|k| (key_hash(&KeyValue::Int(*k)) as i64 >= 0) == paused)
            .unwrap()
    }

    #[test]
    fn only_writes_to_keys_of_the_paused_range_are_held() {
        let topology = topology();
        let scopes = |sql: &str| plan::write_scopes(&topology, sql);
        let none = Params::default();
        let held = scopes(&format!("UPDATE t SET v = 1 WHERE id = {}", key(true)));
        assert_eq!(
            paused_range(&topology, &held, &none).map(|r| r.name.as_str()),
            Some("db-g-1")
        );
        let free = scopes(&format!("UPDATE t SET v = 1 WHERE id = {}", key(false)));
        assert!(paused_range(&topology, &free, &none).is_none());
        let scatter = scopes("DELETE FROM t");
        assert!(paused_range(&topology, &scatter, &none).is_some());
        // A parameter key is read from the bound values.
        let param = scopes("INSERT INTO t (id) VALUES ($1)");
        let bound = |k: i64| Params {
            types: vec![0],
            values: vec![Some(bytes::Bytes::from(k.to_string()))],
            formats: vec![0],
        };
        assert!(paused_range(&topology, &param, &bound(key(true))).is_some());
        assert!(paused_range(&topology, &param, &bound(key(false))).is_none());
    }

    #[test]
    fn a_flip_moves_the_keys_and_replans_literal_routes() {
        let before = topology();
        let mut after = before.clone();
        // Everything on shard b now, one epoch later.
        after.groups[0].vindex = Vindex::Hash(HashRanges {
            starts: vec![(0, 1)],
        });
        after.paused.clear();
        after.epoch = 1;
        let on_a = (1..)
            .find(|k| plan::shard_of(&before, 0, &KeyValue::Int(*k)).unwrap() == 0)
            .unwrap();
        let sql = format!("UPDATE t SET v = 1 WHERE id = {on_a}");
        let scopes = plan::write_scopes(&before, &sql);
        assert_eq!(
            moved(&before, &after, &scopes, &Params::default()).as_deref(),
            Some("g")
        );
        assert_eq!(moved(&before, &before, &scopes, &Params::default()), None);
        let planned = plan::plan_sql(&before, &sql).unwrap().remove(0);
        assert_eq!(planned.plan, Plan::Single(Target::Shard(0)));
        assert_eq!(
            replanned(&after, &planned).map(|p| p.plan),
            Some(Plan::Single(Target::Shard(1)))
        );
    }
}
