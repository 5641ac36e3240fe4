//! A client session: its transaction (the shards it joined), its settings (replayed on pooled
//! backends) and the execution of planned statements.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// A topology with the pools that reach its shards (swapped together on reload).
#[derive(Debug)]
pub struct Runtime {
    /// The topology.
    pub topology: Arc<Topology>,
    /// Pools by shard index.
    pub pools: Arc<Pools>,
    /// Bumped on every reload (cached plans of prepared statements are re-made).
    pub version: u64,
    /// Plans of simple-protocol statement shapes, for this topology.
    pub plan_cache: crate::plan::cache::PlanCache,
}

/// State shared by all sessions of a router process.
#[derive(Debug)]
pub struct RouterState {
    runtime: std::sync::RwLock<Arc<Runtime>>,
    backend: BackendConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Global transaction ids.
    pub gxids: GxidSource,
    versions: AtomicU64,
    round_robin: AtomicUsize,
    /// Client sessions by BackendKeyData, for cancel requests.
    pub cancels: crate::backend::cancel::CancelRegistry,
}

impl RouterState {
    /// State for `topology`.
    pub fn new(topology: Topology, backend: BackendConfig, metrics: Arc<Metrics>) -> Self {
        let pools = Arc::new(Pools::new(&topology.shards, &backend, metrics.clone()));
        Self {
            runtime: std::sync::RwLock::new(Arc::new(Runtime {
                topology: Arc::new(topology),
                pools,
                version: 0,
                plan_cache: Default::default(),
            })),
            backend,
            metrics,
            gxids: GxidSource::default(),
            versions: AtomicU64::new(0),
            round_robin: AtomicUsize::new(0),
            cancels: crate::backend::cancel::CancelRegistry::default(),
        }
    }

    /// Whether simple-protocol statements may be auto-prepared on the shards.
    pub fn auto_prepare(&self) -> bool {
        self.backend.auto_prepare
    }

    /// The current topology and pools.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.read().expect("runtime lock").clone()
    }

    /// Reads the aggregates the shards define (`CREATE AGGREGATE`, from the first shard's
    /// catalog) and, when they changed, swaps in the topology with them (plans made without
    /// them are dropped).
    pub async fn refresh_aggregates(&self) {
        let runtime = self.runtime();
        let Some(pool) = runtime.pools.shards.first() else {
            return;
        };
        let Ok(mut connection) = pool.get().await else {
            return;
        };
        let rows = match connection
            .query_text(
                "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p \
                 WHERE p.prokind = 'a' AND p.pronamespace <> 'pg_catalog'::regnamespace \
                 ORDER BY 1",
            )
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::debug!(%error, "reading user-defined aggregates");
                return;
            }
        };
        drop(connection);
        let names: Vec<String> = rows
            .into_iter()
            .filter_map(|row| row.into_iter().next().flatten())
            .collect();
        if names != runtime.topology.aggregates {
            let mut topology = (*runtime.topology).clone();
            tracing::info!(aggregates = ?names, "user-defined aggregates changed");
            topology.aggregates = names;
            self.swap(topology);
        }
    }

    /// Swaps in a new topology (from the config file, or the Kubernetes source); pools are kept
    /// when the shard endpoints did not change. The shards' aggregates, which a configuration
    /// does not list, are kept as last read.
    pub fn reload(&self, mut topology: Topology) {
        if topology.aggregates.is_empty() {
            topology.aggregates = self.runtime().topology.aggregates.clone();
        }
        self.swap(topology);
    }

    fn swap(&self, topology: Topology) {
        let current = self.runtime();
        let pools = if current.topology.shards == topology.shards {
            current.pools.clone()
        } else {
            Arc::new(Pools::new(
                &topology.shards,
                &self.backend,
                self.metrics.clone(),
            ))
        };
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        *self.runtime.write().expect("runtime lock") = Arc::new(Runtime {
            topology: Arc::new(topology),
            pools,
            version,
            plan_cache: Default::default(),
        });
        tracing::info!(version, "topology reloaded");
    }
}

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

/// A running COPY FROM STDIN.
struct CopyIn {
    destination: CopyDestination,
    shards: Vec<usize>,
    implicit: bool,
    /// Cuts the stream into rows when they go to their keys' shards; otherwise the bytes go
    /// through as they come.
    splitter: Option<RowSplitter>,
    buffers: BTreeMap<usize, Vec<u8>>,
    failure: Option<(&'static str, String)>,
}

/// Rows buffered per shard before they are sent.
const COPY_CHUNK: usize = 64 * 1024;

/// A COPY row's shard key: text (the text and CSV formats) or PostgreSQL's binary form of
/// `bigint`, `integer`, `smallint` or `text`.
fn copy_key(field: &[u8], key_type: KeyType, binary: bool) -> Result<KeyValue, RouterError> {
    let invalid = |code: &'static str| {
        let shown = if binary {
            format!(
                "of {} bytes (a bigint, integer or smallint was expected)",
                field.len()
            )
        } else {
            format!("{:?}", String::from_utf8_lossy(field))
        };
        RouterError::session(code, format!("invalid shard key {shown} in COPY row"))
    };
    match (key_type, binary) {
        (KeyType::Bigint, true) => match field.len() {
            8 => Ok(KeyValue::Int(i64::from_be_bytes(
                field.try_into().expect("8 bytes"),
            ))),
            4 => Ok(KeyValue::Int(
                i32::from_be_bytes(field.try_into().expect("4 bytes")).into(),
            )),
            2 => Ok(KeyValue::Int(
                i16::from_be_bytes(field.try_into().expect("2 bytes")).into(),
            )),
            _ => Err(invalid("22P03")),
        },
        (KeyType::Bigint, false) => std::str::from_utf8(field)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .map(KeyValue::Int)
            .ok_or_else(|| invalid("22P02")),
        (KeyType::Text, _) => String::from_utf8(field.to_vec())
            .map(KeyValue::Text)
            .map_err(|_| RouterError::session("22021", "COPY shard key is not valid UTF-8")),
    }
}

struct Transaction {
    runtime: Arc<Runtime>,
    begin_sql: String,
    /// Open savepoints, oldest first (replayed on shards that join later).
    savepoints: Vec<String>,
    participants: BTreeMap<usize, Arc<Mutex<Leased>>>,
    failed: bool,
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

/// Fingerprint of a session's settings (0 for none).
fn settings_tag(settings: &[String]) -> u64 {
    if settings.is_empty() {
        return 0;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    settings.hash(&mut hasher);
    hasher.finish() | 1
}

/// The setting a `RESET name` names, as PostgreSQL folds it (lower case unless quoted).
fn reset_name(sql: &str) -> Option<String> {
    let rest = sql.trim().trim_end_matches(';').trim();
    let name = rest.get(5..)?.trim();
    if name.is_empty() || name.contains(char::is_whitespace) && !name.starts_with('"') {
        return None;
    }
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => Some(quoted.replace("\"\"", "\"")),
        None => Some(name.to_ascii_lowercase()),
    }
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

fn non_transactional(sql: &str) -> bool {
    let upper = sql.to_ascii_uppercase();
    upper.starts_with("VACUUM")
        || upper.starts_with("CLUSTER")
        || upper.starts_with("REINDEX")
        || upper.starts_with("CHECKPOINT")
        || upper.contains("CONCURRENTLY")
        || upper.starts_with("CREATE DATABASE")
        || upper.starts_with("DROP DATABASE")
        || upper.starts_with("ALTER SYSTEM")
}

/// Decodes a shard-key parameter.
pub fn key_from_param(
    params: &Params,
    param: usize,
    key_type: KeyType,
) -> Result<KeyValue, RouterError> {
    let index = param
        .checked_sub(1)
        .ok_or_else(|| RouterError::session("08P01", "parameter $0"))?;
    let value = params.values.get(index).ok_or_else(|| {
        RouterError::session(
            "08P01",
            format!("the shard key parameter ${param} was not bound"),
        )
    })?;
    let Some(bytes) = value else {
        return Err(RouterError::session(
            "22004",
            format!("the shard key parameter ${param} is NULL; it must have a value"),
        ));
    };
    let bad = || RouterError::session("22P02", format!("invalid shard key in parameter ${param}"));
    match (params.format_of(index), key_type) {
        (1, KeyType::Bigint) => match bytes.len() {
            2 => Ok(KeyValue::Int(
                i16::from_be_bytes([bytes[0], bytes[1]]) as i64
            )),
            4 => Ok(KeyValue::Int(
                i32::from_be_bytes(bytes[..4].try_into().unwrap()) as i64,
            )),
            8 => Ok(KeyValue::Int(i64::from_be_bytes(
                bytes[..8].try_into().unwrap(),
            ))),
            _ => Err(bad()),
        },
        (_, KeyType::Bigint) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .map(KeyValue::Int)
            .ok_or_else(bad),
        (_, KeyType::Text) => std::str::from_utf8(bytes)
            .map(|t| KeyValue::Text(t.to_string()))
            .map_err(|_| bad()),
    }
}

async fn rows_outcome(
    mut cursor: ShardCursor,
    sql: &str,
    failed: Arc<AtomicBool>,
) -> Result<Outcome, RouterError> {
    match cursor.columns.take() {
        Some(columns) => {
            let rows = futures::stream::unfold(Some(cursor), |state| async move {
                let mut cursor = state?;
                match cursor.next_row().await {
                    Ok(Some(row)) => Some((Ok(row), Some(cursor))),
                    Ok(None) => None,
                    Err(error) => Some((Err(error), None)),
                }
            })
            .boxed();
            Ok(Outcome::Rows {
                columns,
                rows: watch_failures(rows, failed),
                command: command_for(sql),
            })
        }
        None => match cursor.tag.take() {
            Some(tag) if tag.is_empty() => Ok(Outcome::Empty),
            Some(tag) => Ok(Outcome::Command(tag)),
            None => Ok(Outcome::Empty),
        },
    }
}

/// The merge with `LIMIT $n` / `OFFSET $n` read from the parameters (NULL: no limit, offset 0).
fn resolve_paging(merge: &MergeSpec, params: &Params) -> Result<MergeSpec, RouterError> {
    let mut merge = merge.clone();
    let read = |param: usize, what: &str, code: &'static str| -> Result<Option<u64>, RouterError> {
        let index = param - 1;
        let Some(Some(bytes)) = params.values.get(index) else {
            return Ok(None);
        };
        let value = if params.format_of(index) == 1 {
            match bytes.len() {
                8 => Some(i64::from_be_bytes(bytes[..].try_into().expect("8 bytes"))),
                4 => Some(i32::from_be_bytes(bytes[..].try_into().expect("4 bytes")) as i64),
                2 => Some(i16::from_be_bytes(bytes[..].try_into().expect("2 bytes")) as i64),
                _ => None,
            }
        } else {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
        };
        match value {
            Some(n) if n < 0 => Err(RouterError::session(
                code,
                format!("{what} must not be negative"),
            )),
            Some(n) => Ok(Some(n as u64)),
            None => Err(RouterError::session(
                "22P02",
                format!("invalid input syntax for type bigint in {what}"),
            )),
        }
    };
    if let Some(param) = merge.limit_param {
        merge.limit = read(param, "LIMIT", "2201W")?;
    }
    if let Some(param) = merge.offset_param {
        merge.offset = read(param, "OFFSET", "2201X")?.unwrap_or(0);
    }
    Ok(merge)
}

/// `CREATE [OR REPLACE] AGGREGATE` or `DROP AGGREGATE`?
fn defines_aggregate(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(4)
        .map(str::to_ascii_uppercase)
        .collect();
    matches!(
        words
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["CREATE", "AGGREGATE", ..]
            | ["CREATE", "OR", "REPLACE", "AGGREGATE"]
            | ["DROP", "AGGREGATE", ..]
    )
}

/// The most an intermediate result (merged groups, a WITH query's or a pulled table's rows) may
/// take in the router, as text arrays.
const MAX_INTERMEDIATE_BYTES: usize = 256 << 20;

/// `name AS (SELECT ... FROM unnest(<arrays>) AS name(<columns>))`: a stage's result in a
/// WITH; columns that came as text (`casts`) are cast back to their types.
fn stage_definition(
    stage: &plan::Stage,
    columns: &[Column],
    arrays: &[String],
    casts: &[Option<String>],
) -> String {
    let names: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| plan::quote_ident(stage.columns.get(i).unwrap_or(&column.name)))
        .collect();
    let name = plan::quote_ident(&stage.name);
    let items: Vec<String> = names
        .iter()
        .zip(casts)
        .map(|(column, cast)| match cast {
            Some(cast) => format!("{name}.{column}::{cast} AS {column}"),
            None => format!("{name}.{column}"),
        })
        .collect();
    format!(
        "{name} AS (SELECT {} FROM unnest({}) AS {name}({}))",
        items.join(", "),
        arrays.join(", "),
        names.join(", ")
    )
}

/// The rows of a result (text format), as one text-format array literal per column.
async fn collect_arrays(
    width: usize,
    mut rows: RowStream,
) -> Result<Vec<bytes::Bytes>, RouterError> {
    let mut arrays: Vec<Vec<u8>> = vec![b"{".to_vec(); width];
    let mut first = true;
    let mut total = 0;
    while let Some(row) = rows.next().await {
        let row = row?;
        total += row.data.len();
        if total > MAX_INTERMEDIATE_BYTES {
            return Err(RouterError::session(
                "54000",
                format!(
                    "the intermediate result of this statement exceeds {} MiB in pg-router \
                     (rows read from the shards to finish it on one shard); restrict it \
                     with WHERE, or run it per shard key",
                    MAX_INTERMEDIATE_BYTES >> 20
                ),
            ));
        }
        for (array, field) in arrays.iter_mut().zip(split_fields(&row.data)) {
            if !first {
                array.push(b',');
            }
            array_element(array, field);
        }
        first = false;
    }
    Ok(arrays
        .into_iter()
        .map(|mut array| {
            array.push(b'}');
            bytes::Bytes::from(array)
        })
        .collect())
}

/// The rows of a query as COPY TO STDOUT data, in text or CSV (with a header if asked).
fn copy_query_stream(
    copy: &plan::CopyQuery,
    columns: &[Column],
    rows: RowStream,
) -> futures::stream::BoxStream<'static, Result<CopyOutData, RouterError>> {
    let csv = copy.csv;
    let delimiter = copy
        .delimiter
        .map(|c| c as u8)
        .unwrap_or(if csv { b',' } else { b'\t' });
    let null = copy
        .null
        .clone()
        .unwrap_or_else(|| if csv { String::new() } else { "\\N".into() })
        .into_bytes();
    let header = (csv && copy.header).then(|| {
        let mut line = Vec::new();
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                line.push(delimiter);
            }
            csv_field(&mut line, column.name.as_bytes(), delimiter, false);
        }
        line.push(b'\n');
        Ok(CopyOutData::Row(bytes::Bytes::from(line)))
    });
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    let lines = rows.map(move |row| {
        let row = row?;
        let mut line = Vec::new();
        for (i, field) in split_fields(&row.data).into_iter().enumerate() {
            if i > 0 {
                line.push(delimiter);
            }
            match field {
                None => line.extend_from_slice(&null),
                Some(value) if csv => csv_field(&mut line, value, delimiter, value == null),
                Some(value) => text_field(&mut line, value, delimiter),
            }
        }
        line.push(b'\n');
        counted.fetch_add(1, Ordering::Relaxed);
        Ok(CopyOutData::Row(bytes::Bytes::from(line)))
    });
    let done =
        futures::stream::once(async move { Ok(CopyOutData::Done(count.load(Ordering::Relaxed))) });
    futures::stream::iter(header)
        .chain(lines)
        .chain(done)
        .boxed()
}

/// A CSV field: quoted when it holds the delimiter, a quote, a line break, or would read as
/// the NULL marker (`force`: an empty string against the default empty NULL); quotes doubled.
fn csv_field(line: &mut Vec<u8>, value: &[u8], delimiter: u8, force: bool) {
    let quote = force
        || value
            .iter()
            .any(|b| *b == delimiter || matches!(b, b'"' | b'\n' | b'\r'));
    if !quote {
        line.extend_from_slice(value);
        return;
    }
    line.push(b'"');
    for byte in value {
        if *byte == b'"' {
            line.push(b'"');
        }
        line.push(*byte);
    }
    line.push(b'"');
}

/// A text-format field with COPY's backslash escapes.
fn text_field(line: &mut Vec<u8>, value: &[u8], delimiter: u8) {
    for byte in value {
        match byte {
            b'\\' => line.extend_from_slice(b"\\\\"),
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            b'\t' => line.extend_from_slice(b"\\t"),
            b if *b == delimiter => {
                line.push(b'\\');
                line.push(*b);
            }
            other => line.push(*other),
        }
    }
}

/// Appends a row (its fields in text format) as a line of COPY's text format.
fn copy_text_row(data: &mut Vec<u8>, row: &Row) {
    for (i, field) in split_fields(&row.data).into_iter().enumerate() {
        if i > 0 {
            data.push(b'\t');
        }
        match field {
            Some(value) => text_field(data, value, b'\t'),
            None => data.extend_from_slice(b"\\N"),
        }
    }
    data.push(b'\n');
}

/// Appends one element to a text-format array literal: `NULL`, or the value double-quoted with
/// `"` and `\` escaped (any type's text form reads back through its input function).
fn array_element(array: &mut Vec<u8>, field: Option<&[u8]>) {
    let Some(value) = field else {
        array.extend_from_slice(b"NULL");
        return;
    };
    array.push(b'"');
    for byte in value {
        if matches!(byte, b'"' | b'\\') {
            array.push(b'\\');
        }
        array.push(*byte);
    }
    array.push(b'"');
}

/// The rows of a COPY TO STDOUT from each shard in turn (a CSV header from the first only),
/// then the total row count.
fn copy_out_stream(
    first: BackendHandle,
    rest: std::collections::VecDeque<BackendHandle>,
    sql: String,
    header: bool,
) -> futures::stream::BoxStream<'static, Result<CopyOutData, RouterError>> {
    struct State {
        current: BackendHandle,
        rest: std::collections::VecDeque<BackendHandle>,
        sql: String,
        header: bool,
        skip_header: bool,
        total: u64,
    }
    let state = State {
        current: first,
        rest,
        sql,
        header,
        skip_header: false,
        total: 0,
    };
    futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            match state.current.copy_out_data().await {
                Ok(CopyOutData::Row(_)) if state.skip_header => state.skip_header = false,
                Ok(row @ CopyOutData::Row(_)) => return Some((Ok(row), Some(state))),
                Ok(CopyOutData::Done(rows)) => {
                    state.total += rows;
                    let Some(mut next) = state.rest.pop_front() else {
                        return Some((Ok(CopyOutData::Done(state.total)), None));
                    };
                    if let Err(error) = next.start_copy_out(&state.sql).await {
                        return Some((Err(error.into()), None));
                    }
                    state.current = next;
                    state.skip_header = state.header;
                }
                Err(error) => {
                    if error.is_connection_lost() {
                        state.current.discard();
                    }
                    return Some((Err(error.into()), None));
                }
            }
        }
    })
    .boxed()
}

fn watch_failures(rows: RowStream, failed: Arc<AtomicBool>) -> RowStream {
    rows.inspect(move |row| {
        if row.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
    })
    .boxed()
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

    async fn start_copy(
        &mut self,
        runtime: &Runtime,
        destination: &CopyDestination,
        format: &CopyFormat,
        sql: &str,
    ) -> Result<Outcome, RouterError> {
        let shards: Vec<usize> = match destination {
            CopyDestination::FirstShard => vec![0],
            _ => (0..runtime.topology.shards.len()).collect(),
        };
        let mut destination = destination.clone();
        if let CopyDestination::ByKey {
            key_position: key_position @ None,
            table,
            key_column,
            ..
        } = &mut destination
        {
            // COPY without a column list: rows carry every column in table order.
            let sql = format!(
                "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass({}) \
                 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                plan::quote_literal(&plan::quote_ident(table))
            );
            // In the client's transaction if there is one (the table may be new in it).
            let rows = if self.transaction.is_some() {
                let connection = self.participant(runtime, 0).await?;
                let mut guard = connection.lock().await;
                guard.query_text(&sql).await?
            } else {
                self.checkout(runtime, 0).await?.query_text(&sql).await?
            };
            let position = rows
                .iter()
                .position(|r| r.first().cloned().flatten().as_deref() == Some(key_column.as_str()))
                .ok_or_else(|| {
                    RouterError::session(
                        "42703",
                        format!("column {key_column} of table {table} not found"),
                    )
                })?;
            *key_position = Some(position);
        }
        let destination = &destination;
        // COPY always runs in a transaction: the client's, or an implicit one committed (with
        // 2PC across shards) when the rows are in.
        let implicit = self.transaction.is_none();
        if implicit {
            self.transaction = Some(Transaction {
                runtime: self.state.runtime(),
                begin_sql: "BEGIN".into(),
                savepoints: Vec::new(),
                participants: BTreeMap::new(),
                failed: false,
            });
        }
        let mut columns = 0;
        for shard in &shards {
            let started = async {
                let connection = self.participant(runtime, *shard).await?;
                let mut guard = connection.lock().await;
                Ok::<_, RouterError>(guard.start_copy_in(sql).await?)
            }
            .await;
            match started {
                Ok(n) => columns = n,
                Err(error) => {
                    // Shards where COPY started are ended with CopyFail by the rollback.
                    for connection in self
                        .transaction
                        .as_ref()
                        .map(|t| t.participants.values().cloned().collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        let mut guard = connection.lock().await;
                        if guard.pending {
                            let _ = guard.finish_copy(Some("COPY aborted by the router")).await;
                        }
                    }
                    if implicit && let Some(transaction) = self.transaction.take() {
                        rollback(transaction.participants).await;
                    }
                    return Err(error);
                }
            }
        }
        let splitter = match destination {
            CopyDestination::ByKey { key_position, .. } => {
                Some(RowSplitter::new(format.clone(), key_position.unwrap_or(0)))
            }
            _ => None,
        };
        self.copy = Some(CopyIn {
            destination: destination.clone(),
            shards,
            implicit,
            splitter,
            buffers: BTreeMap::new(),
            failure: None,
        });
        Ok(Outcome::CopyIn {
            format: format.code(),
            columns,
        })
    }

    /// Puts one piece of a COPY cut into rows in the buffer of its shard (a prefix: of every
    /// shard).
    fn route_piece(&mut self, piece: Piece) -> Result<(), RouterError> {
        let runtime = self
            .transaction
            .as_ref()
            .map(|t| t.runtime.clone())
            .unwrap_or_else(|| self.state.runtime());
        let copy = self.copy.as_mut().expect("copy in progress");
        let (bytes, key) = match piece {
            Piece::Prefix(bytes) => {
                for shard in &copy.shards {
                    copy.buffers
                        .entry(*shard)
                        .or_default()
                        .extend_from_slice(&bytes);
                }
                return Ok(());
            }
            Piece::Row { bytes, key } => (bytes, key),
        };
        let CopyDestination::ByKey { group, .. } = &copy.destination else {
            return Err(RouterError::session("XX000", "COPY rows cut without a key"));
        };
        let Some(key) = key else {
            return Err(RouterError::session(
                "22004",
                "COPY row has a NULL shard key",
            ));
        };
        let binary = matches!(
            copy.splitter.as_ref().map(RowSplitter::format),
            Some(CopyFormat::Binary)
        );
        let key = copy_key(&key, runtime.topology.groups[*group].key_type, binary)?;
        let shard = plan::shard_of(&runtime.topology, *group, &key)?;
        copy.buffers
            .entry(shard)
            .or_default()
            .extend_from_slice(&bytes);
        Ok(())
    }

    async fn flush_copy(&mut self, all: bool) -> Result<(), RouterError> {
        let ready: Vec<(usize, Vec<u8>)> = {
            let copy = self.copy.as_mut().expect("copy in progress");
            let shards: Vec<usize> = copy
                .buffers
                .iter()
                .filter(|(_, b)| !b.is_empty() && (all || b.len() >= COPY_CHUNK))
                .map(|(s, _)| *s)
                .collect();
            shards
                .into_iter()
                .map(|s| (s, std::mem::take(copy.buffers.get_mut(&s).expect("buffer"))))
                .collect()
        };
        for (shard, data) in ready {
            let connection = self
                .transaction
                .as_ref()
                .and_then(|t| t.participants.get(&shard).cloned())
                .ok_or_else(|| RouterError::session("XX000", "COPY lost its shard connection"))?;
            connection.lock().await.copy_data(&data).await?;
        }
        Ok(())
    }

    /// Takes rows of a running COPY FROM STDIN. Errors are kept for the end of the COPY (the
    /// protocol reports them after CopyDone).
    pub async fn copy_data(&mut self, data: &[u8]) {
        let Some(copy) = self.copy.as_mut() else {
            return;
        };
        if copy.failure.is_some() {
            return;
        }
        let mut result = Ok(());
        match copy.splitter.as_mut() {
            Some(splitter) => {
                splitter.push(data);
                let mut pieces = Vec::new();
                loop {
                    match splitter.next_piece() {
                        Ok(Some(piece)) => pieces.push(piece),
                        Ok(None) => break,
                        Err(error) => {
                            result = Err(RouterError::session(error.code, error.message));
                            break;
                        }
                    }
                }
                for piece in pieces {
                    if result.is_err() {
                        break;
                    }
                    result = self.route_piece(piece);
                }
            }
            None => {
                for shard in &copy.shards {
                    copy.buffers
                        .entry(*shard)
                        .or_default()
                        .extend_from_slice(data);
                }
            }
        }
        if result.is_ok() {
            result = self.flush_copy(false).await;
        }
        if let Err(error) = result {
            let info = error.to_server_error();
            let code = match info.code.as_str() {
                "22004" => "22004",
                "22P02" => "22P02",
                "22P03" => "22P03",
                "22P04" => "22P04",
                "22021" => "22021",
                _ => "XX000",
            };
            if let Some(copy) = self.copy.as_mut() {
                copy.failure = Some((code, info.message));
            }
        }
    }

    /// Ends a COPY FROM STDIN: the client sent CopyDone (`failure` None) or CopyFail. Returns
    /// the number of rows copied.
    pub async fn finish_copy(&mut self, failure: Option<String>) -> Result<u64, RouterError> {
        let Some(mut copy) = self.copy.take() else {
            return Err(RouterError::session("08P01", "no COPY in progress"));
        };
        if failure.is_none()
            && copy.failure.is_none()
            && let Some(splitter) = copy.splitter.as_mut()
        {
            // The last row (without its newline), and what ends every shard's stream.
            let last = splitter.finish();
            let trailer = splitter.trailer();
            for shard in &copy.shards {
                copy.buffers
                    .entry(*shard)
                    .or_default()
                    .extend_from_slice(trailer);
            }
            self.copy = Some(copy);
            let routed = match last {
                Ok(Some(piece)) => self.route_piece(piece),
                Ok(None) => Ok(()),
                Err(error) => Err(RouterError::session(error.code, error.message)),
            };
            copy = self.copy.take().expect("copy in progress");
            if let Err(error) = routed {
                let info = error.to_server_error();
                copy.failure = Some((
                    match info.code.as_str() {
                        "22004" => "22004",
                        "22P02" => "22P02",
                        "22P03" => "22P03",
                        _ => "22P04",
                    },
                    info.message,
                ));
            }
        }
        let shards = copy.shards.clone();
        let implicit = copy.implicit;
        // A reference table gets every row on every shard: report them once.
        let everywhere = copy.destination == CopyDestination::Everywhere;
        let mut failure = failure
            .map(|m| ("57014", format!("COPY from stdin failed: {m}")))
            .or(copy.failure.take());
        if failure.is_none() {
            self.copy = Some(copy);
            let flushed = self.flush_copy(true).await;
            self.copy = None;
            if let Err(error) = flushed {
                failure = Some(("XX000", error.to_string()));
            }
        }
        let mut total = 0u64;
        let mut first: Option<u64> = None;
        let mut shard_error = None;
        for shard in &shards {
            let Some(connection) = self
                .transaction
                .as_ref()
                .and_then(|t| t.participants.get(shard).cloned())
            else {
                continue;
            };
            let mut guard = connection.lock().await;
            match guard
                .finish_copy(failure.as_ref().map(|(_, m)| m.as_str()))
                .await
            {
                Ok(tag) => {
                    let rows = tag_rows(&tag).unwrap_or(0);
                    total += rows;
                    first.get_or_insert(rows);
                }
                Err(error) => {
                    if shard_error.is_none() {
                        shard_error = Some(error);
                    }
                }
            }
        }
        let outcome = match (failure, shard_error) {
            (Some((code, message)), _) => Err(RouterError::session(code, message)),
            (None, Some(error)) => Err(error.into()),
            (None, None) => Ok(if everywhere {
                first.unwrap_or(0)
            } else {
                total
            }),
        };
        if implicit && let Some(transaction) = self.transaction.take() {
            match &outcome {
                Ok(_) => {
                    let participants: Vec<_> = transaction.participants.into_iter().collect();
                    twophase::commit(participants, &self.state.gxids, &self.state.metrics).await?;
                }
                Err(_) => rollback(transaction.participants).await,
            }
        } else if outcome.is_err()
            && let Some(transaction) = self.transaction.as_mut()
        {
            transaction.failed = true;
        }
        outcome
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

    /// Applies the client's startup settings (name and value pairs) as session settings,
    /// checked on a shard now. A client that names no application gets an empty
    /// `application_name` on the shards, as PostgreSQL would show it, not the router's own.
    pub async fn apply_startup_settings(
        &mut self,
        settings: &[(String, String)],
    ) -> Result<(), RouterError> {
        let mut settings = settings.to_vec();
        let unnamed = !settings
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("application_name"));
        if unnamed {
            settings.push(("application_name".into(), String::new()));
        }
        let sql = settings
            .iter()
            .map(|(name, value)| {
                format!(
                    "SET {} TO {}",
                    plan::quote_ident(name),
                    plan::quote_literal(value)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        if unnamed && settings.len() == 1 {
            // Nothing to check: remembered, and applied with the first statement's checkout.
            self.settings = vec![sql];
            self.settings_tag = settings_tag(&self.settings);
        } else {
            let runtime = self.state.runtime();
            self.apply_setting(&runtime, &sql).await?;
        }
        self.startup_settings = self.settings.clone();
        self.startup_values = settings
            .into_iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value))
            .collect();
        // The client learns these from the startup's own ParameterStatus messages.
        self.reports.clear();
        Ok(())
    }

    /// The settings as the client was told at startup (ParameterStatus): what a reset reports.
    pub fn set_reported_defaults(&mut self, defaults: HashMap<String, String>) {
        self.reported_defaults = defaults;
    }

    /// Runs one planned statement.
    #[tracing::instrument(
        level = "debug",
        name = "routed_query",
        skip_all,
        fields(
            otel.kind = "server",
            db.system.name = "postgresql",
            db.query.text = crate::telemetry::query_text(&planned.sql),
            pg_router.plan = planned.plan.kind(),
            pg_router.shards = tracing::field::Empty,
            db.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    )]
    pub async fn execute(
        &mut self,
        planned: &Planned,
        params: &Params,
        result_formats: &[i16],
        cache: bool,
    ) -> Result<Outcome, RouterError> {
        let started = Instant::now();
        if !tracing::Span::current().is_disabled() {
            let runtime = match &self.transaction {
                Some(transaction) => transaction.runtime.clone(),
                None => self.state.runtime(),
            };
            let shards =
                crate::telemetry::shards_touched(&planned.plan, runtime.topology.shards.len());
            tracing::Span::current().record("pg_router.shards", shards);
        }
        if self.stream_failed.swap(false, Ordering::Relaxed)
            && let Some(transaction) = self.transaction.as_mut()
        {
            transaction.failed = true;
        }
        let result = self
            .execute_plan(planned, params, result_formats, cache)
            .await;
        let metrics = &self.state.metrics;
        metrics.observe_query(planned.plan.kind(), started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            let code = error.to_server_error().code;
            metrics.observe_error(&code);
            crate::telemetry::record_error(&code);
            if let Some(transaction) = self.transaction.as_mut() {
                transaction.failed = true;
            }
        }
        result
    }

    async fn execute_plan(
        &mut self,
        planned: &Planned,
        params: &Params,
        result_formats: &[i16],
        cache: bool,
    ) -> Result<Outcome, RouterError> {
        let cancel = self.cancel.clone();
        if let Some(transaction) = &self.transaction
            && transaction.failed
            && !matches!(
                planned.plan,
                Plan::Transaction(TransactionControl::Commit | TransactionControl::Rollback)
                    | Plan::Savepoint(SavepointOp::RollbackTo(_))
            )
        {
            return Err(RouterError::session(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        let runtime = match &self.transaction {
            Some(transaction) => transaction.runtime.clone(),
            None => self.state.runtime(),
        };
        match &planned.plan {
            Plan::Transaction(TransactionControl::Begin) => {
                if self.transaction.is_none() {
                    self.transaction = Some(Transaction {
                        runtime,
                        begin_sql: planned.sql.clone(),
                        savepoints: Vec::new(),
                        participants: BTreeMap::new(),
                        failed: false,
                    });
                }
                Ok(Outcome::Begin)
            }
            Plan::Transaction(TransactionControl::Commit) => match self.transaction.take() {
                None => Ok(Outcome::End("COMMIT".into())),
                Some(transaction) if transaction.failed => {
                    rollback(transaction.participants).await;
                    Ok(Outcome::End("ROLLBACK".into()))
                }
                Some(transaction) => {
                    let participants: Vec<_> = transaction.participants.into_iter().collect();
                    twophase::commit(participants, &self.state.gxids, &self.state.metrics).await?;
                    Ok(Outcome::End("COMMIT".into()))
                }
            },
            Plan::Transaction(TransactionControl::Rollback) => {
                if let Some(transaction) = self.transaction.take() {
                    rollback(transaction.participants).await;
                }
                Ok(Outcome::End("ROLLBACK".into()))
            }
            Plan::Setting => self.apply_setting(&runtime, &planned.sql).await,
            Plan::Savepoint(op) => self.savepoint(op, &planned.sql).await,
            Plan::CopyIn(destination, format) => {
                self.start_copy(&runtime, destination, format, &planned.sql)
                    .await
            }
            Plan::CopyOut(copy) => {
                let shards: Vec<usize> = match &copy.shard {
                    Some(target) => vec![self.resolve_target(&runtime, target, params)?],
                    None => (0..runtime.topology.shards.len()).collect(),
                };
                let mut handles = std::collections::VecDeque::with_capacity(shards.len());
                for shard in shards {
                    handles.push_back(self.handle_for(&runtime, shard).await?);
                }
                let mut first = handles.pop_front().expect("at least one shard");
                // The first shard starts now: a bad statement fails before any data is sent.
                let (format, formats) = match first.start_copy_out(&planned.sql).await {
                    Ok(started) => started,
                    Err(error) => {
                        if error.is_connection_lost() {
                            first.discard();
                        }
                        return Err(error.into());
                    }
                };
                Ok(Outcome::CopyOut {
                    format,
                    formats,
                    data: copy_out_stream(first, handles, planned.sql.clone(), copy.header),
                })
            }
            Plan::Deallocate => Ok(Outcome::Command(
                if planned.sql.to_ascii_uppercase().contains("ALL") {
                    "DEALLOCATE ALL"
                } else {
                    "DEALLOCATE"
                }
                .into(),
            )),
            Plan::Single(target) => {
                let shard = match target {
                    Target::Lookup {
                        lookup_table,
                        value,
                        group,
                    } => {
                        self.lookup_shard(&runtime, lookup_table, value, *group, params)
                            .await?
                    }
                    other => self.resolve_target(&runtime, other, params)?,
                };
                let handle = self.handle_for(&runtime, shard).await?;
                let cursor = ShardCursor::open(
                    cancel.as_ref(),
                    handle,
                    &planned.sql,
                    params,
                    result_formats,
                    cache,
                )
                .await?;
                let mut cursor = cursor;
                self.notices.append(&mut cursor.notices);
                cursor.stream_notices_to(self.stream_notices.clone());
                rows_outcome(cursor, &planned.sql, self.stream_failed.clone()).await
            }
            Plan::Scatter {
                shards,
                merge,
                write,
            } => {
                let shards: Vec<usize> = shards
                    .clone()
                    .unwrap_or_else(|| (0..runtime.topology.shards.len()).collect());
                if *write {
                    let parts = shards
                        .iter()
                        .map(|s| (*s, planned.sql.clone(), params.clone()))
                        .collect();
                    return self
                        .run_parts(&runtime, parts, true, false, result_formats)
                        .await;
                }
                let mut handles = Vec::with_capacity(shards.len());
                for shard in &shards {
                    handles.push(self.handle_for(&runtime, *shard).await?);
                }
                // Merged groups go to a final statement as text arrays: the shards answer in
                // text, the final statement in the client's formats.
                let shard_formats = match merge.finalize {
                    Some(_) => &[][..],
                    None => result_formats,
                };
                let shard_params = match (&merge.finalize, &merge.shard_params) {
                    (Some(finalize), _) => &params.subset(&finalize.shard_params),
                    (None, Some(used)) => &params.subset(used),
                    (None, None) => params,
                };
                let opens = handles.into_iter().map(|handle| {
                    ShardCursor::open(
                        cancel.as_ref(),
                        handle,
                        &planned.sql,
                        shard_params,
                        shard_formats,
                        cache,
                    )
                });
                let mut cursors = futures::future::try_join_all(opens).await?;
                for cursor in &mut cursors {
                    self.notices.append(&mut cursor.notices);
                    cursor.stream_notices_to(self.stream_notices.clone());
                }
                let columns = cursors
                    .iter_mut()
                    .find_map(|c| c.columns.clone())
                    .unwrap_or_default();
                let output = merge::output_columns(&columns, merge);
                let rows = merge::merge(cursors, columns, resolve_paging(merge, params)?);
                if let Some(finalize) = &merge.finalize {
                    return self
                        .finalize(
                            &runtime,
                            shards[0],
                            finalize,
                            &output,
                            rows,
                            params,
                            result_formats,
                        )
                        .await;
                }
                Ok(Outcome::Rows {
                    columns: output,
                    rows: watch_failures(rows, self.stream_failed.clone()),
                    command: "SELECT".into(),
                })
            }
            Plan::InsertSelect(insert) => self.insert_select(&runtime, insert, params).await,
            Plan::CopyQuery(copy) => {
                let outcome = Box::pin(self.execute_plan(&copy.query, params, &[], cache)).await?;
                let Outcome::Rows { columns, rows, .. } = outcome else {
                    return Err(RouterError::session(
                        "0A000",
                        "COPY (query) TO STDOUT of a statement without rows",
                    ));
                };
                Ok(Outcome::CopyOut {
                    format: 0,
                    formats: vec![0; columns.len()],
                    data: copy_query_stream(copy, &columns, rows),
                })
            }
            Plan::Explain(explain) => {
                let shard = explain
                    .shards
                    .as_ref()
                    .and_then(|s| s.first().copied())
                    .unwrap_or(0);
                let handle = self.handle_for(&runtime, shard).await?;
                let mut cursor =
                    ShardCursor::open(cancel.as_ref(), handle, &explain.sql, params, &[], false)
                        .await?;
                let plan = cursor.collect().await?;
                let name = &runtime.topology.shards[shard].name;
                let mut lines = explain.summary.clone();
                lines.push(format!("  Plan on shard {name}:"));
                for row in &plan {
                    if let Some(Some(line)) = split_fields(&row.data).first() {
                        lines.push(format!("    {}", String::from_utf8_lossy(line)));
                    }
                }
                let format = result_formats.first().copied().unwrap_or(0);
                let column = Column {
                    name: "QUERY PLAN".into(),
                    table_oid: 0,
                    column_id: 0,
                    type_oid: crate::protocol::values::oid::TEXT,
                    type_size: -1,
                    type_modifier: -1,
                    format,
                };
                let rows: Vec<Result<Row, RouterError>> = lines
                    .into_iter()
                    .map(|line| Ok(merge::build_row(&[Some(line.as_bytes())])))
                    .collect();
                Ok(Outcome::Rows {
                    columns: vec![column],
                    rows: futures::stream::iter(rows).boxed(),
                    command: "EXPLAIN".into(),
                })
            }
            Plan::DrawKeys(draw) => {
                self.draw_keys(&runtime, draw, params, result_formats, cache)
                    .await
            }
            Plan::BoundSubqueries(bound) => {
                self.bound_subqueries(&runtime, bound, params, result_formats, cache)
                    .await
            }
            Plan::MultiStage(multi) => {
                self.multi_stage(&runtime, multi, params, result_formats)
                    .await
            }
            Plan::Broadcast => {
                let mut parts: Vec<_> = (0..runtime.topology.shards.len())
                    .map(|s| (s, planned.sql.clone(), params.clone()))
                    .collect();
                let table = plan::sharded_table_of_ddl(&runtime.topology, &planned.sql);
                if let Some(table) = &table {
                    for shard in 1..runtime.topology.shards.len() {
                        parts.push((shard, spread_sequences_sql(table, shard), Params::default()));
                    }
                }
                let atomic = !non_transactional(&planned.sql);
                let outcome = self
                    .run_parts(&runtime, parts, atomic, true, result_formats)
                    .await?;
                if let Some(table) = &table {
                    self.warn_narrow_sequences(&runtime, table).await;
                }
                if defines_aggregate(&planned.sql) {
                    self.state.refresh_aggregates().await;
                }
                Ok(outcome)
            }
            Plan::Insert(split) => {
                let parts = split_insert(&runtime.topology, split, params)?;
                self.run_parts(&runtime, parts, true, false, result_formats)
                    .await
            }
        }
    }

    /// Runs an aggregate query's final statement on `shard` over the merged groups (`rows`,
    /// text format, described by `columns`), one text array parameter per column.
    #[allow(clippy::too_many_arguments)]
    async fn finalize(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        finalize: &plan::Finalize,
        columns: &[Column],
        rows: RowStream,
        params: &Params,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let arrays = collect_arrays(columns.len(), rows).await?;
        let mut types = Vec::with_capacity(columns.len() + finalize.client_params.len());
        for column in columns {
            types.push(self.array_type(runtime, shard, column.type_oid).await?);
        }
        let mut values: Vec<Option<bytes::Bytes>> = arrays.into_iter().map(Some).collect();
        let mut formats = vec![0; values.len()];
        let client = params.subset(&finalize.client_params);
        types.extend(client.types);
        values.extend(client.values);
        formats.extend(client.formats);
        let params = Params {
            types,
            values,
            formats,
        };
        self.rows_on_shard(runtime, shard, &finalize.sql, &params, result_formats)
            .await
    }

    /// Runs a statement the router wrote (a final or outer statement) on `shard`, its rows
    /// going to the client.
    async fn rows_on_shard(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        sql: &str,
        params: &Params,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let handle = self.handle_for(runtime, shard).await?;
        let cancel = self.cancel.clone();
        let mut cursor =
            ShardCursor::open(cancel.as_ref(), handle, sql, params, result_formats, true).await?;
        self.notices.append(&mut cursor.notices);
        cursor.stream_notices_to(self.stream_notices.clone());
        rows_outcome(cursor, "SELECT", self.stream_failed.clone()).await
    }

    /// A multi-stage statement whose outer statement reads sharded tables: the stages' rows go
    /// to every shard it runs on as array literals, in a WITH in front of its statement.
    async fn multi_stage_distributed(
        &mut self,
        runtime: &Runtime,
        multi: &plan::MultiStage,
        outer: &Planned,
        params: &Params,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let mut definitions = Vec::with_capacity(multi.stages.len() + multi.kept.len());
        for stage in &multi.stages {
            let (columns, arrays) = self.run_stage(stage, params).await?;
            let mut literals = Vec::with_capacity(columns.len());
            let mut casts = Vec::with_capacity(columns.len());
            for (column, array) in columns.iter().zip(arrays) {
                let (array_oid, cast) = self.stage_transport(runtime, column).await?;
                let array_type = match cast {
                    Some(_) => "pg_catalog.text[]".to_string(),
                    None => {
                        self.array_type_name(runtime, column.type_oid, array_oid)
                            .await?
                    }
                };
                literals.push(format!(
                    "{}::{array_type}",
                    plan::quote_literal(&String::from_utf8_lossy(&array))
                ));
                casts.push(cast);
            }
            definitions.push(stage_definition(stage, &columns, &literals, &casts));
        }
        definitions.extend(multi.kept.iter().cloned());
        let mut planned = outer.clone();
        planned.sql = format!("WITH {} {}", definitions.join(", "), outer.sql);
        let outer_params = params.subset(&multi.outer_params);
        // A statement text made for this execution: not kept prepared on the shards.
        self.execute_plan(&planned, &outer_params, result_formats, false)
            .await
    }

    /// Runs one stage: its result columns and their values as text arrays.
    async fn run_stage(
        &mut self,
        stage: &plan::Stage,
        params: &Params,
    ) -> Result<(Vec<Column>, Vec<bytes::Bytes>), RouterError> {
        let stage_params = params.subset(&stage.params);
        let outcome = self
            .execute_plan(&stage.planned, &stage_params, &[], true)
            .await?;
        let Outcome::Rows { columns, rows, .. } = outcome else {
            return Err(RouterError::session(
                "0A000",
                format!("the WITH query or subquery {} returns no rows", stage.name),
            ));
        };
        if columns.is_empty() || stage.columns.len() > columns.len() {
            return Err(RouterError::session(
                "42P10",
                format!(
                    "WITH query \"{}\" has {} columns available but {} columns specified",
                    stage.name,
                    columns.len(),
                    stage.columns.len()
                ),
            ));
        }
        let arrays = collect_arrays(columns.len(), rows).await?;
        Ok((columns, arrays))
    }

    /// The SQL name of `array`, the array type of `element` (for a cast), without a typmod.
    async fn array_type_name(
        &mut self,
        runtime: &Runtime,
        element: u32,
        array: u32,
    ) -> Result<String, RouterError> {
        match crate::protocol::values::oid::builtin_name(element) {
            Some(name) => Ok(format!("pg_catalog.{name}[]")),
            None => self.type_name(runtime, array).await,
        }
    }

    /// Runs a multi-stage statement: each stage's rows become text arrays, read by the outer
    /// statement on the first shard as `WITH name AS (SELECT * FROM unnest($k, ...) AS name(...))`.
    fn multi_stage<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        multi: &'a plan::MultiStage,
        params: &'a Params,
        result_formats: &'a [i16],
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            if let Some(outer) = &multi.distributed {
                return self
                    .multi_stage_distributed(runtime, multi, outer, params, result_formats)
                    .await;
            }
            let outer = params.subset(&multi.outer_params);
            let (mut types, mut values, mut formats) = (outer.types, outer.values, outer.formats);
            let mut definitions = Vec::with_capacity(multi.stages.len() + multi.kept.len());
            for stage in &multi.stages {
                let (columns, arrays) = self.run_stage(stage, params).await?;
                let mut placeholders = Vec::with_capacity(columns.len());
                let mut casts = Vec::with_capacity(columns.len());
                for (column, array) in columns.iter().zip(arrays) {
                    let (array_type, cast) = self.stage_transport(runtime, column).await?;
                    types.push(array_type);
                    values.push(Some(array));
                    formats.push(0);
                    placeholders.push(format!("${}", values.len()));
                    casts.push(cast);
                }
                definitions.push(stage_definition(stage, &columns, &placeholders, &casts));
            }
            definitions.extend(multi.kept.iter().cloned());
            let sql = format!("WITH {} {}", definitions.join(", "), multi.outer);
            let params = Params {
                types,
                values,
                formats,
            };
            self.rows_on_shard(runtime, 0, &sql, &params, result_formats)
                .await
        })
    }

    /// Runs a statement's WHERE subqueries first and then the statement, their answers bound
    /// as its parameters.
    fn bound_subqueries<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        bound: &'a plan::BoundSubqueries,
        params: &'a Params,
        result_formats: &'a [i16],
        cache: bool,
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            let mut answers: Vec<(u32, Option<bytes::Bytes>)> = Vec::new();
            for subquery in &bound.subqueries {
                let stage = &subquery.stage;
                let stage_params = params.subset(&stage.params);
                let outcome = self
                    .execute_plan(&stage.planned, &stage_params, &[], true)
                    .await?;
                let Outcome::Rows { columns, rows, .. } = outcome else {
                    return Err(RouterError::session(
                        "42601",
                        "a subquery used as an expression returns no rows",
                    ));
                };
                let answer = match subquery.kind {
                    SubqueryKind::Exists => {
                        // Read to the end (the shard's LIMIT 1 keeps it to one row at most).
                        let mut rows = rows;
                        let mut any = false;
                        while let Some(row) = rows.next().await {
                            row?;
                            any = true;
                        }
                        (
                            crate::protocol::values::oid::BOOL,
                            Some(bytes::Bytes::from_static(if any { b"t" } else { b"f" })),
                        )
                    }
                    _ if columns.len() != 1 => {
                        return Err(RouterError::session(
                            "42601",
                            "subquery must return only one column",
                        ));
                    }
                    SubqueryKind::List => {
                        let array = collect_arrays(1, rows).await?.remove(0);
                        let oid = self.array_type(runtime, 0, columns[0].type_oid).await?;
                        (oid, Some(array))
                    }
                    SubqueryKind::Scalar => {
                        let mut rows = rows;
                        let mut value = None;
                        let mut count = 0;
                        while let Some(row) = rows.next().await {
                            let row = row?;
                            count += 1;
                            if count > 1 {
                                return Err(RouterError::session(
                                    "21000",
                                    "more than one row returned by a subquery used as an \
                                     expression",
                                ));
                            }
                            value = split_fields(&row.data)
                                .first()
                                .copied()
                                .flatten()
                                .map(bytes::Bytes::copy_from_slice);
                        }
                        (columns[0].type_oid, value)
                    }
                };
                answers.push(answer);
            }
            let mut outer = Params::default();
            for source in &bound.outer_params {
                match source {
                    ParamSource::Client(index) => {
                        let client = params.subset(&[*index]);
                        outer.types.extend(client.types);
                        outer.values.extend(client.values);
                        outer.formats.extend(client.formats);
                    }
                    ParamSource::Subquery(index) => {
                        let (oid, value) = answers[*index].clone();
                        outer.types.push(oid);
                        outer.values.push(value);
                        outer.formats.push(0);
                    }
                }
            }
            self.execute_plan(&bound.outer, &outer, result_formats, cache)
                .await
        })
    }

    /// A NOTICE for integer (not bigint) sequences of a sharded table: each shard draws the
    /// same values from its own.
    async fn warn_narrow_sequences(&mut self, runtime: &Runtime, table: &str) {
        let sql = format!(
            "SELECT d.objid::regclass::text FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_sequence s ON s.seqrelid = d.objid \
             WHERE d.classid = 'pg_catalog.pg_class'::regclass \
             AND d.refobjid = pg_catalog.to_regclass({}) AND d.deptype IN ('a', 'i') \
             AND s.seqtypid <> 'pg_catalog.int8'::regtype",
            plan::quote_literal(table)
        );
        let names = self
            .first_column(runtime, 0, &sql)
            .await
            .unwrap_or_default();
        for name in names.into_iter().flatten() {
            self.notices.push(crate::protocol::messages::ServerError {
                severity: "NOTICE".into(),
                code: "01000".into(),
                message: format!(
                    "sequence {} of sharded table {table} is not bigint: each shard draws the \
                     same values from its own copy",
                    String::from_utf8_lossy(&name)
                ),
                detail: None,
                hint: Some(
                    "use bigserial or a bigint identity column: pg-router gives each shard its \
                     own range of those"
                        .into(),
                ),
                position: None,
            });
        }
    }

    /// Draws the shard keys of an INSERT from the key column's sequence on the first shard,
    /// then runs the INSERT with them as parameters.
    fn draw_keys<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        draw: &'a plan::DrawKeys,
        params: &'a Params,
        result_formats: &'a [i16],
        cache: bool,
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT pg_catalog.nextval(s) FROM pg_catalog.pg_get_serial_sequence({}, {}) s, \
                 pg_catalog.generate_series(1, {}) WHERE s IS NOT NULL",
                plan::quote_literal(&plan::quote_ident(&draw.table)),
                plan::quote_literal(&draw.key),
                draw.count
            );
            // In the client's transaction if there is one (the table may be new in it).
            let keys = self.first_column(runtime, 0, &sql).await?;
            if keys.len() != draw.count {
                return Err(RouterError::session(
                    "0A000",
                    format!(
                        "INSERT into sharded table {} without its shard key column {}, which has \
                         no sequence (serial or identity) to draw keys from: name the key",
                        draw.table, draw.key
                    ),
                ));
            }
            let mut params = params.clone();
            // The client's parameters up to the first drawn key (Bind may leave types out).
            let first = draw.first_param - 1;
            params.types.resize(first, 0);
            params.values.resize(first, None);
            let formats: Vec<i16> = (0..first).map(|i| params.format_of(i)).collect();
            params.formats = formats;
            for key in keys {
                params.types.push(crate::protocol::values::oid::INT8);
                params.values.push(key);
                params.formats.push(0);
            }
            self.execute_plan(&draw.inner, &params, result_formats, cache)
                .await
        })
    }

    /// Runs an INSERT ... SELECT: reads the SELECT's rows (text), then copies them in as COPY
    /// FROM STDIN text, each row to its shard.
    fn insert_select<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        insert: &'a plan::InsertSelect,
        params: &'a Params,
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            let source_params = params.subset(&insert.source_params);
            let outcome = self
                .execute_plan(&insert.source, &source_params, &[], true)
                .await?;
            let Outcome::Rows { mut rows, .. } = outcome else {
                return Err(RouterError::session(
                    "42601",
                    "the source of INSERT ... SELECT returns no rows",
                ));
            };
            // Read whole before writing: the rows may come from the connections the COPY uses.
            let mut data = Vec::new();
            while let Some(row) = rows.next().await {
                let row = row?;
                copy_text_row(&mut data, &row);
                if data.len() > MAX_INTERMEDIATE_BYTES {
                    return Err(RouterError::session(
                        "54000",
                        format!(
                            "INSERT ... SELECT reads more than {} MiB in pg-router; insert in \
                             batches (restrict the SELECT with WHERE)",
                            MAX_INTERMEDIATE_BYTES >> 20
                        ),
                    ));
                }
            }
            drop(rows);
            self.start_copy(
                runtime,
                &insert.destination,
                &insert.format,
                &insert.copy_sql,
            )
            .await?;
            for chunk in data.chunks(COPY_CHUNK) {
                self.copy_data(chunk).await;
            }
            let inserted = self.finish_copy(None).await?;
            Ok(Outcome::Command(format!("INSERT 0 {inserted}")))
        })
    }

    /// The array type of a column type: built-in ones from a table, others from the shard's
    /// catalog. A column that is an array itself has none (`unnest` would flatten it).
    async fn array_type(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        element: u32,
    ) -> Result<u32, RouterError> {
        match self.array_type_of(runtime, shard, element).await? {
            0 => Err(RouterError::session(
                "0A000",
                "an expression over aggregates across shards whose groups or aggregates are \
                 arrays (or of a type without an array type) is not supported",
            )),
            array => Ok(array),
        }
    }

    /// The first column of each row of a statement the router runs for itself on `shard`
    /// (catalog reads, sequence draws), without parameters, in text.
    async fn first_column(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        sql: &str,
    ) -> Result<Vec<Option<bytes::Bytes>>, RouterError> {
        let handle = self.handle_for(runtime, shard).await?;
        let mut cursor =
            ShardCursor::open(None, handle, sql, &Params::default(), &[], false).await?;
        Ok(cursor
            .collect()
            .await?
            .iter()
            .map(|row| {
                split_fields(&row.data)
                    .first()
                    .copied()
                    .flatten()
                    .map(bytes::Bytes::copy_from_slice)
            })
            .collect())
    }

    /// `pg_type.typarray` of `element`: 0 for an array type itself.
    async fn array_type_of(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        element: u32,
    ) -> Result<u32, RouterError> {
        if let Some(array) = crate::protocol::values::oid::array_of(element) {
            return Ok(array);
        }
        let sql = format!(
            "SELECT typarray FROM pg_catalog.pg_type WHERE oid = {}",
            plan::quote_literal(&element.to_string())
        );
        Ok(self
            .first_column(runtime, shard, &sql)
            .await?
            .first()
            .cloned()
            .flatten()
            .and_then(|field| std::str::from_utf8(&field).ok()?.parse::<u32>().ok())
            .unwrap_or(0))
    }

    /// The SQL name of a type (`format_type`), for a cast.
    async fn type_name(&mut self, runtime: &Runtime, oid: u32) -> Result<String, RouterError> {
        let sql = format!(
            "SELECT pg_catalog.format_type({}::pg_catalog.oid, NULL)",
            plan::quote_literal(&oid.to_string())
        );
        self.first_column(runtime, 0, &sql)
            .await?
            .first()
            .cloned()
            .flatten()
            .map(|name| String::from_utf8_lossy(&name).into_owned())
            .ok_or_else(|| RouterError::session("XX000", "no name for a column type"))
    }

    /// How a stage's column travels to the outer statement: as an array of its type, or (an
    /// array column itself, which `unnest` would flatten) as text cast back to its type.
    async fn stage_transport(
        &mut self,
        runtime: &Runtime,
        column: &Column,
    ) -> Result<(u32, Option<String>), RouterError> {
        match self.array_type_of(runtime, 0, column.type_oid).await? {
            0 => {
                let name = self.type_name(runtime, column.type_oid).await?;
                Ok((crate::protocol::values::oid::TEXT_ARRAY, Some(name)))
            }
            array => Ok((array, None)),
        }
    }

    fn resolve_target(
        &self,
        runtime: &Runtime,
        target: &Target,
        params: &Params,
    ) -> Result<usize, RouterError> {
        match target {
            Target::Shard(shard) => Ok(*shard),
            Target::Param { param, group } => {
                let key_type = runtime.topology.groups[*group].key_type;
                let key = key_from_param(params, *param, key_type)?;
                Ok(plan::shard_of(&runtime.topology, *group, &key)?)
            }
            Target::Lookup { .. } => Err(RouterError::session(
                "XX000",
                "a lookup target needs a lookup",
            )),
            Target::Any => {
                if let Some(transaction) = &self.transaction
                    && let Some(shard) = transaction.participants.keys().next()
                {
                    return Ok(*shard);
                }
                let n = runtime.topology.shards.len();
                Ok(self.state.round_robin.fetch_add(1, Ordering::Relaxed) % n)
            }
        }
    }

    /// Reads a shard key from a lookup table (on shard 0) and returns its shard. A value that is
    /// not in the lookup table has no row anywhere: any shard answers (with no rows).
    async fn lookup_shard(
        &mut self,
        runtime: &Runtime,
        lookup_table: &str,
        value: &LookupValue,
        group: usize,
        params: &Params,
    ) -> Result<usize, RouterError> {
        let cancel = self.cancel.clone();
        let lookup_params = match value {
            LookupValue::Literal(text) => Params {
                types: vec![0],
                values: vec![Some(bytes::Bytes::from(text.clone().into_bytes()))],
                formats: vec![0],
            },
            LookupValue::Param(n) => params.subset(&[n - 1]),
        };
        let handle = self.handle_for(runtime, 0).await?;
        let sql = plan::lookup_query(lookup_table);
        let mut cursor =
            ShardCursor::open(cancel.as_ref(), handle, &sql, &lookup_params, &[], true).await?;
        let rows = cursor.collect().await?;
        let Some(row) = rows.first() else {
            return Ok(0);
        };
        let key_text = crate::protocol::values::split_text_row(&row.data)
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| {
                RouterError::session("22004", format!("NULL key in lookup table {lookup_table}"))
            })?;
        let key = match runtime.topology.groups[group].key_type {
            KeyType::Bigint => KeyValue::Int(key_text.trim().parse().map_err(|_| {
                RouterError::session(
                    "22P02",
                    format!("lookup table {lookup_table} holds a non-integer key"),
                )
            })?),
            KeyType::Text => KeyValue::Text(key_text),
        };
        Ok(plan::shard_of(&runtime.topology, group, &key)?)
    }

    async fn replay_settings(&self, leased: &mut Leased) -> Result<(), RouterError> {
        if leased.settings_tag == self.settings_tag {
            return Ok(());
        }
        let mut sql = String::from("RESET ALL");
        for setting in &self.settings {
            sql.push_str("; ");
            sql.push_str(setting);
        }
        leased.query_text(&sql).await?;
        leased.settings_tag = self.settings_tag;
        Ok(())
    }

    async fn checkout(&self, runtime: &Runtime, shard: usize) -> Result<Leased, RouterError> {
        let pool = runtime
            .pools
            .shards
            .get(shard)
            .ok_or_else(|| RouterError::session("XX000", format!("no shard {shard}")))?;
        let mut leased = pool.get().await?;
        if let Err(error) = self.replay_settings(&mut leased).await {
            leased.discard();
            return Err(error);
        }
        Ok(leased)
    }

    async fn participant(
        &mut self,
        runtime: &Runtime,
        shard: usize,
    ) -> Result<Arc<Mutex<Leased>>, RouterError> {
        let transaction = self.transaction.as_ref().expect("in a transaction");
        if let Some(connection) = transaction.participants.get(&shard) {
            return Ok(connection.clone());
        }
        let mut begin = transaction.begin_sql.clone();
        for savepoint in &transaction.savepoints {
            begin.push_str("; SAVEPOINT ");
            begin.push_str(&plan::quote_ident(savepoint));
        }
        let commands = 1 + transaction.savepoints.len() as u32;
        let mut leased = self.checkout(runtime, shard).await?;
        // Sent in front of the first statement on this shard (no extra round trip).
        leased.begin_pending = Some((begin, commands));
        let connection = Arc::new(Mutex::new(leased));
        self.transaction
            .as_mut()
            .expect("in a transaction")
            .participants
            .insert(shard, connection.clone());
        Ok(connection)
    }

    async fn handle_for(
        &mut self,
        runtime: &Runtime,
        shard: usize,
    ) -> Result<BackendHandle, RouterError> {
        if self.transaction.is_some() {
            let connection = self.participant(runtime, shard).await?;
            BackendHandle::transaction(&connection).await
        } else {
            Ok(BackendHandle::pooled(self.checkout(runtime, shard).await?))
        }
    }

    async fn savepoint(&mut self, op: &SavepointOp, sql: &str) -> Result<Outcome, RouterError> {
        let Some(transaction) = self.transaction.as_mut() else {
            return Err(RouterError::session(
                "25P01",
                "SAVEPOINT can only be used in transaction blocks",
            ));
        };
        let position = |name: &str, list: &Vec<String>| list.iter().rposition(|s| s == name);
        let tag = match op {
            SavepointOp::Create(name) => {
                transaction.savepoints.push(name.clone());
                "SAVEPOINT"
            }
            SavepointOp::Release(name) | SavepointOp::RollbackTo(name) => {
                let Some(index) = position(name, &transaction.savepoints) else {
                    return Err(RouterError::session(
                        "3B001",
                        format!("savepoint \"{name}\" does not exist"),
                    ));
                };
                if matches!(op, SavepointOp::Release(_)) {
                    transaction.savepoints.truncate(index);
                    "RELEASE"
                } else {
                    transaction.savepoints.truncate(index + 1);
                    transaction.failed = false;
                    "ROLLBACK"
                }
            }
        };
        let participants: Vec<_> = transaction.participants.values().cloned().collect();
        for connection in participants {
            let mut guard = connection.lock().await;
            guard.query_text(sql).await?;
        }
        Ok(Outcome::Command(tag.into()))
    }

    async fn apply_setting(
        &mut self,
        runtime: &Runtime,
        sql: &str,
    ) -> Result<Outcome, RouterError> {
        let cancel = self.cancel.clone();
        let upper = sql.trim().to_ascii_uppercase();
        let discard_all = upper.starts_with("DISCARD ALL");
        let clears = upper.starts_with("RESET ALL") || discard_all;
        // DISCARD ALL would also deallocate the statements the router keeps prepared on the
        // backend connection; its session part is RESET ALL (the rest does not outlive a
        // pooled transaction anyway).
        let startup_value = if clears || !upper.starts_with("RESET ") {
            None
        } else {
            reset_name(sql).and_then(|name| {
                self.startup_values
                    .iter()
                    .rev()
                    .find(|(startup, _)| *startup == name)
                    .map(|(_, value)| (name, value.clone()))
            })
        };
        // `RESET name` of a setting the client started with goes back to that value, as in
        // PostgreSQL (on a shard it would go back to the router's own connection defaults).
        let restore = startup_value.map(|(name, value)| {
            format!(
                "SET {} TO {}",
                plan::quote_ident(&name),
                plan::quote_literal(&value)
            )
        });
        let sql = match &restore {
            Some(restore) => restore.as_str(),
            None if discard_all => "RESET ALL",
            None => sql,
        };
        let mut settings = self.settings.clone();
        if clears {
            // Back to the session's start, as in PostgreSQL: the client's startup settings stay.
            settings = self.startup_settings.clone();
        } else if !upper.starts_with("DISCARD") {
            settings.push(sql.trim().trim_end_matches(';').to_string());
        }
        let settings_tag = settings_tag(&settings);
        let mut tag = None;
        // Every participant reports the same changes: the client gets them once.
        let mut reports = Vec::new();
        if let Some(transaction) = &self.transaction {
            let participants: Vec<_> = transaction.participants.values().cloned().collect();
            for connection in participants {
                // A rollback would undo the SET on this connection: make the next checkout
                // reset and replay whatever happens.
                connection.lock().await.settings_tag = DIRTY_SETTINGS;
                let handle = BackendHandle::transaction(&connection).await?;
                let mut cursor =
                    ShardCursor::open(cancel.as_ref(), handle, sql, &Params::default(), &[], false)
                        .await?;
                cursor.collect().await?;
                tag = cursor.tag.take();
                reports = std::mem::take(&mut cursor.reports);
            }
        }
        if tag.is_none() {
            let shard = self.resolve_target(runtime, &Target::Any, &Params::default())?;
            let mut leased = self.checkout(runtime, shard).await?;
            // Until it succeeds, the connection's settings are unknown.
            leased.settings_tag = DIRTY_SETTINGS;
            let handle = BackendHandle::pooled(leased);
            let mut cursor =
                ShardCursor::open(cancel.as_ref(), handle, sql, &Params::default(), &[], false)
                    .await?;
            cursor.collect().await?;
            if !clears || settings.is_empty() {
                // After RESET ALL the connection lacks the startup settings: it stays dirty, and
                // the next checkout replays them.
                cursor.set_settings_tag(settings_tag);
            }
            tag = cursor.tag.take();
            reports = std::mem::take(&mut cursor.reports);
        }
        // The router speaks for the shards about its own version; after a reset the client's
        // values are those it started with (the shard's would be the router's own defaults).
        reports.retain(|(name, _)| name != "server_version");
        if upper.starts_with("RESET") || discard_all {
            for (name, value) in &mut reports {
                if let Some(default) = self.reported_defaults.get(name.as_str()) {
                    value.clone_from(default);
                }
            }
        }
        if discard_all {
            tag = Some("DISCARD ALL".into());
        } else if restore.is_some() {
            tag = Some("RESET".into());
        }
        self.reports.extend(reports);
        self.settings = settings;
        self.settings_tag = settings_tag;
        Ok(Outcome::Command(tag.unwrap_or_else(|| "SET".into())))
    }

    /// Runs statement parts on several shards: inside the client's transaction, or (if `atomic`
    /// and several shards) in an implicit two-phase transaction, or one by one.
    async fn run_parts(
        &mut self,
        runtime: &Runtime,
        parts: Vec<(usize, String, Params)>,
        atomic: bool,
        broadcast: bool,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let mut distinct: Vec<usize> = parts.iter().map(|p| p.0).collect();
        distinct.sort();
        distinct.dedup();
        let implicit =
            self.transaction.is_none() && atomic && (distinct.len() > 1 || parts.len() > 1);
        if implicit {
            self.transaction = Some(Transaction {
                runtime: Arc::new(Runtime {
                    topology: runtime.topology.clone(),
                    pools: runtime.pools.clone(),
                    version: runtime.version,
                    plan_cache: Default::default(),
                }),
                begin_sql: "BEGIN".into(),
                savepoints: Vec::new(),
                participants: BTreeMap::new(),
                failed: false,
            });
        }
        let result = self
            .run_parts_inner(runtime, &parts, broadcast, result_formats)
            .await;
        if implicit {
            let transaction = self.transaction.take().expect("implicit transaction");
            match &result {
                Ok(_) => {
                    let participants: Vec<_> = transaction.participants.into_iter().collect();
                    twophase::commit(participants, &self.state.gxids, &self.state.metrics).await?;
                }
                Err(_) => rollback(transaction.participants).await,
            }
        }
        result
    }

    async fn run_parts_inner(
        &mut self,
        runtime: &Runtime,
        parts: &[(usize, String, Params)],
        broadcast: bool,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let cancel = self.cancel.clone();
        let mut columns: Option<Vec<Column>> = None;
        let mut rows: Vec<Row> = Vec::new();
        let mut first_tag: Option<String> = None;
        let mut total: u64 = 0;
        for (i, (shard, sql, params)) in parts.iter().enumerate() {
            let bookkeeping = sql.starts_with(BOOKKEEPING);
            let handle = self.handle_for(runtime, *shard).await?;
            if bookkeeping {
                let mut cursor =
                    ShardCursor::open(cancel.as_ref(), handle, sql, params, &[], false).await?;
                cursor.collect().await?;
                continue;
            }
            let mut cursor =
                ShardCursor::open(cancel.as_ref(), handle, sql, params, result_formats, false)
                    .await?;
            let part_rows = cursor.collect().await?;
            if i == 0 || !broadcast {
                self.notices.append(&mut cursor.notices);
            }
            if i == 0 || !broadcast {
                if columns.is_none() {
                    columns = cursor.columns.take();
                }
                rows.extend(part_rows);
            }
            let tag = cursor.tag.take().unwrap_or_default();
            total += tag_rows(&tag).unwrap_or(0);
            if first_tag.is_none() {
                first_tag = Some(tag);
            }
        }
        let first_tag = first_tag.unwrap_or_default();
        let command = tag_command(&first_tag);
        if let Some(columns) = columns {
            let command = if command == "INSERT" {
                "INSERT 0".into()
            } else {
                command
            };
            return Ok(Outcome::Rows {
                columns,
                rows: futures::stream::iter(rows.into_iter().map(Ok)).boxed(),
                command,
            });
        }
        if broadcast || tag_rows(&first_tag).is_none() {
            return Ok(Outcome::Command(first_tag));
        }
        Ok(Outcome::Command(match command.as_str() {
            "INSERT" => format!("INSERT 0 {total}"),
            other => format!("{other} {total}"),
        }))
    }
}

/// Marks statement parts that maintain lookup tables (not part of the client's result).
const BOOKKEEPING: &str = "/* pg-router lookup */ ";

/// Bits of a bigint sequence value below the shard's range: shard `n`'s sequences of a sharded
/// table start at `n << 48` + 1 (as Citus does per node), so ids drawn on different shards
/// never collide.
const SEQUENCE_RANGE_BITS: u32 = 48;

/// Moves the new (never used) bigint sequences owned by `table` (serial and identity columns)
/// to `shard`'s range.
fn spread_sequences_sql(table: &str, shard: usize) -> String {
    let start = ((shard as u64) << SEQUENCE_RANGE_BITS) + 1;
    format!(
        "{BOOKKEEPING}SELECT pg_catalog.setval(d.objid::regclass, {start}, false) \
         FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_sequence s ON s.seqrelid = d.objid \
         WHERE d.classid = 'pg_catalog.pg_class'::regclass \
         AND d.refobjid = pg_catalog.to_regclass({}) AND d.deptype IN ('a', 'i') \
         AND s.seqtypid = 'pg_catalog.int8'::regtype \
         AND pg_catalog.pg_sequence_last_value(d.objid) IS NULL",
        plan::quote_literal(table)
    )
}

/// Splits a multi-row INSERT into per-shard statements (plus lookup-table inserts).
pub fn split_insert(
    topology: &Topology,
    split: &InsertSplit,
    params: &Params,
) -> Result<Vec<(usize, String, Params)>, RouterError> {
    let key_type = topology.groups[split.group].key_type;
    let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (row, key) in split.keys.iter().enumerate() {
        let value = match key {
            KeyExpr::Literal(value) => value.clone(),
            KeyExpr::Param(param) => key_from_param(params, *param, key_type)?,
        };
        let shard = plan::shard_of(topology, split.group, &value)?;
        by_shard.entry(shard).or_default().push(row);
    }
    let mut parts: Vec<(usize, String, Params)> = by_shard
        .into_iter()
        .map(|(shard, rows)| {
            let (sql, used) = plan::render_insert_part(&split.template, &rows);
            (shard, sql, params.subset(&used))
        })
        .collect();
    for (position, lookup_table) in &split.lookups {
        let (sql, used) = plan::render_lookup_insert(split, *position, lookup_table);
        parts.push((0, format!("{BOOKKEEPING}{sql}"), params.subset(&used)));
    }
    Ok(parts)
}

async fn rollback(participants: BTreeMap<usize, Arc<Mutex<Leased>>>) {
    for connection in participants.into_values() {
        let mut guard = connection.lock().await;
        if guard.query_text("ROLLBACK").await.is_err() {
            guard.discard();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reset_name;

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
