//! The shard connections' row cursors: runs statements on backend connections and exposes each
//! shard's result as a cursor of raw rows (the shard's bytes, passed through).

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::backend::connection::{BackendConnection, BackendError, BackendMessage, Execution};
use crate::backend::pool::Leased;
use crate::error::RouterError;
use crate::protocol::messages::Column;
use crate::protocol::messages::{Params, Row};

/// A backend connection a statement runs on: from the pool (autocommit) or the one a
/// transaction holds.
#[derive(Debug)]
pub struct BackendHandle(Option<HandleInner>);

#[derive(Debug)]
enum HandleInner {
    Pooled(Leased),
    Transaction(OwnedMutexGuard<Leased>),
}

impl BackendHandle {
    /// A pooled connection.
    pub fn pooled(leased: Leased) -> Self {
        Self(Some(HandleInner::Pooled(leased)))
    }

    /// A transaction's connection (locked while the statement runs). A result still being
    /// read on it (a suspended portal) makes this wait; after 30 s it is an error, not a hang.
    pub async fn transaction(connection: &Arc<Mutex<Leased>>) -> Result<Self, RouterError> {
        match tokio::time::timeout(
            std::time::Duration::from_secs(30),
            connection.clone().lock_owned(),
        )
        .await
        {
            Ok(guard) => Ok(Self(Some(HandleInner::Transaction(guard)))),
            Err(_) => Err(RouterError::session(
                "55000",
                "another result of this transaction is still open on the same shard; \
                 read it to the end or close its portal first",
            )),
        }
    }

    /// Shard index.
    pub fn shard_index(&self) -> usize {
        match self.0.as_ref().expect("handle") {
            HandleInner::Pooled(l) => l.shard_index(),
            HandleInner::Transaction(l) => l.shard_index(),
        }
    }

    fn leased(&mut self) -> &mut Leased {
        match self.0.as_mut().expect("handle") {
            HandleInner::Pooled(l) => l,
            HandleInner::Transaction(l) => l,
        }
    }

    /// Marks the connection broken so it is not reused.
    pub fn discard(&mut self) {
        self.leased().discard();
    }
}

impl std::ops::Deref for BackendHandle {
    type Target = BackendConnection;
    fn deref(&self) -> &BackendConnection {
        match self.0.as_ref().expect("handle") {
            HandleInner::Pooled(l) => l,
            HandleInner::Transaction(l) => l,
        }
    }
}

impl std::ops::DerefMut for BackendHandle {
    fn deref_mut(&mut self) -> &mut BackendConnection {
        self.leased()
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        let Some(inner) = self.0.take() else { return };
        let pending = match &inner {
            HandleInner::Pooled(l) => l.pending,
            HandleInner::Transaction(l) => l.pending,
        };
        if pending && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // The client stopped reading (LIMIT reached, connection closed): read the rest of
            // the result in the background so the connection can be reused.
            runtime.spawn(async move {
                let mut inner = inner;
                let leased: &mut Leased = match &mut inner {
                    HandleInner::Pooled(l) => l,
                    HandleInner::Transaction(l) => l,
                };
                if leased.drain().await.is_err() {
                    leased.discard();
                }
            });
        }
    }
}

/// Notices the shards send while rows stream, for the client before the next row (as
/// PostgreSQL interleaves them).
#[derive(Debug, Default)]
pub struct NoticeSink {
    pending: std::sync::atomic::AtomicBool,
    notices: std::sync::Mutex<Vec<crate::protocol::messages::ServerError>>,
}

impl NoticeSink {
    /// Keeps a notice for the client.
    pub fn push(&self, notice: crate::protocol::messages::ServerError) {
        self.notices.lock().expect("notice lock").push(notice);
        self.pending
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The notices kept so far (without locking when there are none, once per row).
    pub fn take(&self) -> Vec<crate::protocol::messages::ServerError> {
        if !self
            .pending
            .swap(false, std::sync::atomic::Ordering::Acquire)
        {
            return Vec::new();
        }
        std::mem::take(&mut *self.notices.lock().expect("notice lock"))
    }
}

/// The result of one statement on one shard, read row by row.
#[derive(Debug)]
pub struct ShardCursor {
    handle: BackendHandle,
    /// Result columns; `None` for a statement without rows.
    pub columns: Option<Vec<Column>>,
    /// Command tag, once the statement completed.
    pub tag: Option<String>,
    finished: bool,
    cancel: Option<crate::backend::cancel::CancelGuard>,
    /// Notices the shard sent so far (those before the first row reach the client).
    pub notices: Vec<crate::protocol::messages::ServerError>,
    /// Settings the shard reported as changed (ParameterStatus), in order.
    pub reports: Vec<(String, String)>,
    /// Where notices go once rows stream.
    sink: Option<Arc<NoticeSink>>,
}

impl ShardCursor {
    /// Starts `sql` on `handle` and reads up to the first row (or the end, without rows).
    pub async fn open(
        cancel: Option<&Arc<crate::backend::cancel::SessionCancel>>,
        mut handle: BackendHandle,
        sql: &str,
        params: &Params,
        result_formats: &[i16],
        cache: bool,
    ) -> Result<Self, RouterError> {
        let execution = Execution {
            sql,
            param_types: &params.types,
            params: &params.values,
            param_formats: &params.formats,
            result_formats,
            cache,
        };
        if let Err(error) = handle.send_execution(&execution).await {
            handle.discard();
            return Err(error.into());
        }
        let guard = match (cancel, handle.cancel_target.clone()) {
            (Some(session), Some(target)) => Some(session.register(target)),
            _ => None,
        };
        let mut cursor = Self {
            handle,
            columns: None,
            tag: None,
            finished: false,
            cancel: guard,
            notices: Vec::new(),
            reports: Vec::new(),
            sink: None,
        };
        loop {
            match cursor.read().await? {
                BackendMessage::RowDescription(columns) => {
                    cursor.columns = Some(columns);
                    return Ok(cursor);
                }
                BackendMessage::NoData => {
                    // No rows: read to the end now so the tag is known.
                    while cursor.next_row().await?.is_some() {}
                    return Ok(cursor);
                }
                BackendMessage::Error(error) => return Err(cursor.fail(error, sql, cache).await),
                // The simple protocol has no NoData: a statement without rows completes here.
                BackendMessage::CommandComplete(tag) => cursor.tag = Some(tag),
                BackendMessage::EmptyQuery => cursor.tag = Some(String::new()),
                BackendMessage::Notice(notice) => cursor.notices.push(notice),
                BackendMessage::ParameterStatus { name, value } => {
                    cursor.reports.push((name, value));
                }
                BackendMessage::ReadyForQuery(_) => {
                    cursor.finished = true;
                    cursor.cancel = None;
                    return Ok(cursor);
                }
                _ => {}
            }
        }
    }

    async fn read(&mut self) -> Result<BackendMessage, RouterError> {
        match self.handle.next_message().await {
            Ok(message) => Ok(message),
            Err(error) => {
                self.handle.discard();
                self.finished = true;
                Err(error.into())
            }
        }
    }

    async fn fail(
        &mut self,
        error: crate::protocol::messages::ServerError,
        sql: &str,
        cache: bool,
    ) -> RouterError {
        if cache {
            self.handle.forget_statement(sql);
        }
        if self.handle.drain().await.is_err() {
            self.handle.discard();
        }
        self.finished = true;
        // Done: the backend may serve someone else now, it must not be cancelled for us.
        self.cancel = None;
        RouterError::Backend(BackendError::Server {
            shard: self.handle.shard().to_string(),
            error: Box::new(error),
        })
    }

    /// The next row, or `None` at the end.
    pub async fn next_row(&mut self) -> Result<Option<Row>, RouterError> {
        while !self.finished {
            match self.read().await? {
                BackendMessage::DataRow(fields, data) => return Ok(Some(Row { fields, data })),
                BackendMessage::CommandComplete(tag) => self.tag = Some(tag),
                BackendMessage::EmptyQuery => self.tag = Some(String::new()),
                BackendMessage::Notice(notice) => match &self.sink {
                    Some(sink) => sink.push(notice),
                    None => self.notices.push(notice),
                },
                BackendMessage::ParameterStatus { name, value } => {
                    self.reports.push((name, value));
                }
                BackendMessage::Error(error) => return Err(self.fail(error, "", false).await),
                BackendMessage::ReadyForQuery(_) => self.finished = true,
                _ => {}
            }
        }
        self.cancel = None;
        Ok(None)
    }

    /// Sends the notices that come while rows stream to `sink`.
    pub fn stream_notices_to(&mut self, sink: Arc<NoticeSink>) {
        self.sink = Some(sink);
    }

    /// Reads all remaining rows.
    pub async fn collect(&mut self) -> Result<Vec<Row>, RouterError> {
        let mut rows = Vec::new();
        while let Some(row) = self.next_row().await? {
            rows.push(row);
        }
        Ok(rows)
    }

    /// Shard index.
    pub fn shard_index(&self) -> usize {
        self.handle.shard_index()
    }

    /// Records which session settings the connection now carries.
    pub fn set_settings_tag(&mut self, tag: u64) {
        self.handle.settings_tag = tag;
    }
}
