//! What the session decides for the forwarding fast path (`frontend/forward.rs`): whether a
//! statement may take it, and the pooled connection it runs on. The rules are the general
//! path's, narrowed to the case where they do nothing: outside a transaction and a COPY, while no
//! split pauses a range, when no span is exported, a statement routed to one shard by its text
//! or its parameters runs on a connection checked out as [`Session::checkout`] does (the session's
//! settings replayed), registered for cancel requests.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::backend::cancel::CancelGuard;
use crate::error::RouterError;
use crate::exec::cursor::BackendHandle;
use crate::plan::{Plan, Planned, Target};
use crate::protocol::messages::Params;

use super::Session;

impl Session {
    /// A pooled connection to run `planned` on by forwarding, or `None` when the statement must
    /// take the general path: in a transaction (participants, savepoints, 2PC), during a COPY,
    /// while a split pauses a range (writes are held there), when its span is exported, or for
    /// a plan other than one shard known from the statement and its parameters (a lookup needs
    /// a query first).
    pub async fn forward_handle(
        &mut self,
        planned: &Planned,
        params: &Params,
    ) -> Result<Option<BackendHandle>, RouterError> {
        let target = match &planned.plan {
            Plan::Single(target @ (Target::Shard(_) | Target::Param { .. } | Target::Any)) => {
                target
            }
            _ => return Ok(None),
        };
        if self.transaction.is_some()
            || self.copy.is_some()
            || self.state.any_paused.load(Ordering::SeqCst)
            || crate::telemetry::routed_query_spans_enabled()
        {
            return Ok(None);
        }
        let runtime = self.state.runtime();
        let shard = self.resolve_target(&runtime, target, params)?;
        let leased = self.checkout(&runtime, shard).await?;
        Ok(Some(BackendHandle::pooled(leased)))
    }

    /// Registers `handle`'s backend for this session's cancel requests while the guard lives.
    pub fn cancel_guard(&self, handle: &BackendHandle) -> Option<CancelGuard> {
        match (&self.cancel, handle.cancel_target.clone()) {
            (Some(session), Some(target)) => Some(session.register(target)),
            _ => None,
        }
    }

    /// Counts a forwarded statement in the metrics, as [`Session::execute`] counts the others.
    pub fn observe_forwarded(&self, planned: &Planned, started: Instant, error: Option<&str>) {
        let metrics = &self.state.metrics;
        metrics.observe_query(planned.plan.kind(), started.elapsed().as_secs_f64());
        metrics.observe_forwarded();
        if let Some(code) = error {
            metrics.observe_error(code);
        }
    }
}
