//! The forwarding fast path. A statement routed to one shard, outside a transaction, runs on a
//! pooled connection as the general path would run it (same plan, same shard, prepared the same
//! way), but the shard's answer goes to the client as the shard wrote it: RowDescription,
//! DataRows and CommandComplete are copied message by message, never decoded into rows and
//! encoded again, and none of the general executor's layers (cut-over checks, row streams,
//! merge) run. Key lookups and single-row writes are the hot statements of OLTP workloads, and
//! on a machine whose cores PostgreSQL needs, the router's CPU per query is what it takes from
//! the database; this path is what brings it near a plain pooler's.
//!
//! Both protocols take it: a simple query the plan cache routed (auto-prepared or not), and an
//! extended-protocol Execute that reads its portal to the end. What the session decides
//! (whether a statement may take this path, its connection) is in `session/forward.rs`.
//! Anything unusual leaves this path before a byte reaches the client: a statement that does
//! not qualify, and a write a split's fence refused (the general path then retries it on the
//! range's new shard).

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::connection::{BackendError, Execution, Header, Relayed};
use crate::error::RouterError;
use crate::plan::Planned;
use crate::plan::cache::AutoPrepared;
use crate::protocol::messages::Params;

use super::{Closed, Connection, FLUSH_AT};

/// What [`Connection::forward`] did with a statement.
pub(super) enum Forward {
    /// Answered (rows or an error are in the output).
    Done,
    /// Not on this path: run it in full.
    Declined,
}

/// A statement to forward.
pub(super) struct Forwarding<'a> {
    pub statement: &'a Planned,
    pub params: &'a Params,
    pub result_formats: &'a [i16],
    /// Keep the statement prepared on the shard connection.
    pub cache: bool,
    /// An auto-prepared simple query with the client's text: a shard's error position moves
    /// back into it.
    pub auto_prepared: Option<(&'a AutoPrepared, &'a str)>,
    /// Which description of the result the client gets.
    pub header: Header,
    /// Errors end the extended protocol's batch (skip to Sync).
    pub extended: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Runs a statement on the fast path when it qualifies, writing its answer, up to but not
    /// including ReadyForQuery, to the output.
    pub(super) async fn forward(&mut self, run: &Forwarding<'_>) -> Result<Forward, Closed> {
        let started = Instant::now();
        let mut handle = match self.session.forward_handle(run.statement, run.params).await {
            Ok(Some(handle)) => handle,
            Ok(None) => return Ok(Forward::Declined),
            Err(error) => {
                self.forward_failed(run, started, error);
                return Ok(Forward::Done);
            }
        };
        let execution = Execution {
            sql: &run.statement.sql,
            param_types: &run.params.types,
            params: &run.params.values,
            param_formats: &run.params.formats,
            result_formats: run.result_formats,
            cache: run.cache,
        };
        if let Err(error) = handle.send_execution(&execution).await {
            handle.discard();
            self.forward_failed(run, started, error.into());
            return Ok(Forward::Done);
        }
        let cancel = self.session.cancel_guard(&handle);
        let start = self.output.len();
        let mut flushed = false;
        loop {
            match handle.relay(&mut self.output, FLUSH_AT, run.header).await {
                Ok(Relayed::Ready) => break,
                // Rows already written stay written; the rest follows.
                Ok(Relayed::Full) => {
                    self.flush().await?;
                    flushed = true;
                }
                Ok(Relayed::Error(error)) => {
                    if run.cache {
                        handle.forget_statement(&run.statement.sql);
                    }
                    if handle.drain().await.is_err() {
                        handle.discard();
                    }
                    drop(cancel);
                    let error = RouterError::Backend(BackendError::Server {
                        shard: handle.shard().to_string(),
                        error: Box::new(error),
                    });
                    if !flushed && super::session::is_fence(&error) {
                        // Nothing ran and nothing was sent: the general path retries it on the
                        // split's new shard.
                        self.output.truncate(start);
                        return Ok(Forward::Declined);
                    }
                    self.forward_failed(run, started, error);
                    return Ok(Forward::Done);
                }
                Err(error) => {
                    handle.discard();
                    self.forward_failed(run, started, error.into());
                    return Ok(Forward::Done);
                }
            }
        }
        self.session.observe_forwarded(run.statement, started, None);
        Ok(Forward::Done)
    }

    /// Sends a forwarded statement's error (at the client's position) and counts it.
    fn forward_failed(&mut self, run: &Forwarding<'_>, started: Instant, mut error: RouterError) {
        if let Some((prepared, sql)) = run.auto_prepared {
            super::at_client_position(&mut error, Some(prepared), &run.statement.sql, sql);
        }
        let code = error.to_server_error().code;
        self.session
            .observe_forwarded(run.statement, started, Some(&code));
        if run.extended {
            self.extended_error(error);
        } else {
            self.send_error(error);
        }
    }
}
