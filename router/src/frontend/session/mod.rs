//! A client session: its transaction (the shards it joined), its settings (replayed on pooled
//! backends) and the execution of planned statements.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::Mutex;

use crate::backend::connection::CopyOutData;
use crate::backend::pool::{Leased, Pools};
use crate::error::RouterError;
use crate::exec::cursor::{BackendHandle, ShardCursor};
use crate::exec::merge::{self, RowStream};
use crate::exec::twophase::{self, GxidSource};
use crate::metrics::Metrics;
use crate::plan::{
    self, InsertSplit, KeyExpr, LookupValue, MergeSpec, ParamSource, Plan, Planned, SavepointOp,
    Target, TransactionControl,
};
use crate::plan::{CopyDestination, SubqueryKind};
use crate::protocol::copy_data::{CopyFormat, Piece, RowSplitter};
use crate::protocol::messages::{Column, split_fields};
use crate::protocol::messages::{Params, Row, tag_command, tag_rows};
use crate::topology::{BackendConfig, KeyType, Topology};
use crate::vindex::KeyValue;

mod copy;
mod execute;
mod forward;
mod pause;
mod settings;
mod stages;
mod state;
mod transaction;
use copy::*;
pub use execute::*;
pub(in crate::frontend) use pause::is_fence;
use stages::*;
pub use state::*;
use transaction::*;

/// Settings tag of a connection whose session settings are unknown: every session resets and
/// replays its own on checkout.
const DIRTY_SETTINGS: u64 = u64::MAX;

/// What a statement produced.
pub enum Outcome {
    /// Rows (streamed).
    Rows {
        /// Columns.
        columns: Vec<Column>,
        /// Rows.
        rows: RowStream,
        /// Command word for the tag (`SELECT`, `INSERT 0`, ...).
        command: String,
    },
    /// A command without rows, with its full tag.
    Command(String),
    /// The transaction began.
    Begin,
    /// The transaction ended with this tag (`COMMIT` or `ROLLBACK`).
    End(String),
    /// An empty query.
    Empty,
    /// COPY FROM STDIN started; the client sends rows in this format (0 text or CSV, 1
    /// binary), of this many columns.
    CopyIn {
        /// Overall format.
        format: i8,
        /// Columns.
        columns: i16,
    },
    /// COPY TO STDOUT: the overall format (0 text, 1 binary), column formats, and the rows of
    /// each shard in turn, ending with the total count.
    CopyOut {
        /// Overall format.
        format: i8,
        /// Column formats.
        formats: Vec<i16>,
        /// CopyData payloads, then `Done`.
        data: futures::stream::BoxStream<'static, Result<CopyOutData, RouterError>>,
    },
}

/// One client's session.
pub struct Session {
    state: Arc<RouterState>,
    settings: Vec<String>,
    settings_tag: u64,
    /// The client's startup settings (kept by RESET ALL and DISCARD ALL).
    startup_settings: Vec<String>,
    /// The client's startup settings by lower-case name: what `RESET name` goes back to.
    startup_values: Vec<(String, String)>,
    /// ParameterStatus values sent at startup.
    reported_defaults: HashMap<String, String>,
    transaction: Option<Transaction>,
    /// Set by a row stream that failed after it was handed to the client.
    stream_failed: Arc<AtomicBool>,
    /// Backends running this session's statement, for cancel requests.
    cancel: Option<Arc<crate::backend::cancel::SessionCancel>>,
    /// Notices from the shards for the client, sent before the statement's result.
    notices: Vec<crate::protocol::messages::ServerError>,
    /// Notices of the shards while rows stream.
    stream_notices: Arc<crate::exec::cursor::NoticeSink>,
    /// Settings changes the shards reported, not yet passed to the client.
    reports: Vec<(String, String)>,
    /// A COPY FROM STDIN in progress.
    copy: Option<CopyIn>,
}

fn command_for(sql: &str) -> String {
    let keyword = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    match keyword.as_str() {
        "INSERT" => "INSERT 0".into(),
        "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" => keyword,
        _ => "SELECT".into(),
    }
}

impl Session {
    /// A new session.
    pub fn new(state: Arc<RouterState>) -> Self {
        Self {
            state,
            settings: Vec::new(),
            settings_tag: 0,
            transaction: None,
            stream_failed: Arc::new(AtomicBool::new(false)),
            cancel: None,
            notices: Vec::new(),
            stream_notices: Default::default(),
            reports: Vec::new(),
            startup_settings: Vec::new(),
            startup_values: Vec::new(),
            reported_defaults: HashMap::new(),
            copy: None,
        }
    }

    /// Describes `sql` (parameter types, result columns) on a shard, with this session's
    /// settings (and inside its transaction, if one is open).
    pub async fn describe(
        &mut self,
        sql: &str,
        param_types: &[u32],
    ) -> Result<crate::backend::connection::Description, RouterError> {
        let runtime = match &self.transaction {
            Some(transaction) => transaction.runtime.clone(),
            None => self.state.runtime(),
        };
        // Inside a transaction, a shard it already uses (its uncommitted DDL is visible there);
        // otherwise a pooled connection to the first shard, without joining a transaction.
        let joined = self
            .transaction
            .as_ref()
            .and_then(|t| t.participants.values().next().cloned());
        let mut handle = match joined {
            Some(connection) => BackendHandle::transaction(&connection).await?,
            None => BackendHandle::pooled(self.checkout(&runtime, 0).await?),
        };
        let result = handle.describe(sql, param_types).await;
        if let Err(error) = &result
            && error.is_connection_lost()
        {
            handle.discard();
        }
        Ok(result?)
    }

    /// Notices collected while running the last statement.
    pub fn take_notices(&mut self) -> Vec<crate::protocol::messages::ServerError> {
        std::mem::take(&mut self.notices)
    }

    /// Notices the shards sent since the rows of the last statement began to stream.
    pub fn take_stream_notices(&self) -> Vec<crate::protocol::messages::ServerError> {
        self.stream_notices.take()
    }

    /// Settings changed by the last statements that clients are told about (ParameterStatus:
    /// `TimeZone`, `DateStyle`, `application_name`, ...), taken.
    pub fn take_reports(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.reports)
    }

    /// Makes this session's statements cancellable through `cancel`.
    pub fn set_cancel(&mut self, cancel: Arc<crate::backend::cancel::SessionCancel>) {
        self.cancel = Some(cancel);
    }

    /// Is a transaction open?
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// Transaction status for ReadyForQuery: idle (`I`), in a transaction (`T`), or in a
    /// failed one (`E`).
    pub fn transaction_status(&self) -> u8 {
        match &self.transaction {
            None => b'I',
            Some(transaction)
                if transaction.failed || self.stream_failed.load(Ordering::Relaxed) =>
            {
                b'E'
            }
            Some(_) => b'T',
        }
    }
}

#[cfg(test)]
mod tests {
    use super::settings::reset_name;

    #[test]
    fn reset_names_fold_like_postgresql() {
        assert_eq!(
            reset_name("RESET application_name;").as_deref(),
            Some("application_name")
        );
        assert_eq!(reset_name("reset TimeZone").as_deref(), Some("timezone"));
        assert_eq!(
            reset_name("RESET \"Odd\"\"Name\"").as_deref(),
            Some("Odd\"Name")
        );
        assert_eq!(reset_name("RESET SESSION AUTHORIZATION"), None);
        assert_eq!(reset_name("RESET"), None);
    }
}
