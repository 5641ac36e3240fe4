//! COPY through the router: COPY FROM split row by row to the shards, COPY TO gathered from them.

use super::*;

/// A running COPY FROM STDIN.
pub(super) struct CopyIn {
    pub(super) destination: CopyDestination,
    pub(super) shards: Vec<usize>,
    pub(super) implicit: bool,
    /// Cuts the stream into rows when they go to their keys' shards; otherwise the bytes go
    /// through as they come.
    pub(super) splitter: Option<RowSplitter>,
    pub(super) buffers: BTreeMap<usize, Vec<u8>>,
    pub(super) failure: Option<(&'static str, String)>,
}

/// Rows buffered per shard before they are sent.
pub(super) const COPY_CHUNK: usize = 64 * 1024;

/// A COPY row's shard key: text (the text and CSV formats) or PostgreSQL's binary form of
/// `bigint`, `integer`, `smallint` or `text`.
pub(super) fn copy_key(
    field: &[u8],
    key_type: KeyType,
    binary: bool,
) -> Result<KeyValue, RouterError> {
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

/// The rows of a query as COPY TO STDOUT data, in text or CSV (with a header if asked).
pub(super) fn copy_query_stream(
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
pub(super) fn csv_field(line: &mut Vec<u8>, value: &[u8], delimiter: u8, force: bool) {
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
pub(super) fn text_field(line: &mut Vec<u8>, value: &[u8], delimiter: u8) {
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
pub(super) fn copy_text_row(data: &mut Vec<u8>, row: &Row) {
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
pub(super) fn array_element(array: &mut Vec<u8>, field: Option<&[u8]>) {
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
pub(super) fn copy_out_stream(
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

impl Session {
    pub(super) async fn start_copy(
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
    pub(super) fn route_piece(&mut self, piece: Piece) -> Result<(), RouterError> {
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

    pub(super) async fn flush_copy(&mut self, all: bool) -> Result<(), RouterError> {
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
}
