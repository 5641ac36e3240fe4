//! One connection to a shard, speaking the PostgreSQL protocol v3 directly (the extended query
//! protocol for every statement), so result rows pass through as the shard's bytes in the
//! format the client asked for.

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::tls::BackendStream;
use crate::protocol::messages::{Column, ServerError};
use crate::topology::{BackendConfig, Endpoint};

/// Most statements one backend connection keeps prepared.
const MAX_PREPARED: usize = 256;

/// Errors talking to a shard.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The connection failed or broke.
    #[error("shard {shard}: connection failed: {source}")]
    Io {
        /// Shard name.
        shard: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The shard answered with an error.
    #[error("shard {shard}: {error}")]
    Server {
        /// Shard name.
        shard: String,
        /// The error it sent.
        error: Box<ServerError>,
    },
    /// The shard sent something the router did not expect.
    #[error("shard {shard}: protocol violation: {message}")]
    Protocol {
        /// Shard name.
        shard: String,
        /// What was wrong.
        message: String,
    },
}

impl BackendError {
    /// Is the connection unusable after this error?
    pub fn is_connection_lost(&self) -> bool {
        !matches!(self, BackendError::Server { .. })
    }
}

/// What a shard says about a statement (Describe).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Description {
    /// Parameter type OIDs.
    pub params: Vec<u32>,
    /// Result columns; `None` if the statement returns no rows.
    pub columns: Option<Vec<Column>>,
}

/// A message from the shard, decoded as far as the router needs.
#[derive(Debug)]
pub enum BackendMessage {
    /// RowDescription.
    RowDescription(Vec<Column>),
    /// NoData.
    NoData,
    /// DataRow: the number of fields and the raw field bytes (length-prefixed values).
    DataRow(i16, BytesMut),
    /// CommandComplete with its tag.
    CommandComplete(String),
    /// EmptyQueryResponse.
    EmptyQuery,
    /// ErrorResponse.
    Error(ServerError),
    /// ReadyForQuery with the transaction status byte.
    ReadyForQuery(u8),
    /// ParameterDescription.
    ParameterDescription(Vec<u32>),
    /// NoticeResponse (NOTICE, WARNING, ...).
    Notice(ServerError),
    /// ParameterStatus: a reported setting changed (after `SET`, `RESET`, ...).
    ParameterStatus {
        /// Setting name.
        name: String,
        /// Its new value.
        value: String,
    },
    /// Anything else the router skips (ParseComplete, BindComplete, ...).
    Other(u8),
}

/// Where [`BackendConnection::relay`] stopped.
#[derive(Debug)]
pub enum Relayed {
    /// At ReadyForQuery: the statement is done, the connection idle.
    Ready,
    /// The output reached its flush size: write it out and relay again.
    Full,
    /// The statement failed; the connection still has its ReadyForQuery to read.
    Error(ServerError),
}

/// Which description of its result a relayed statement's client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// None (an extended-protocol Execute without Describe).
    None,
    /// A RowDescription when it returns rows (the simple protocol).
    Rows,
    /// RowDescription or NoData (an Execute of a portal the client described).
    Always,
}

/// One statement execution request.
#[derive(Debug, Clone, Default)]
pub struct Execution<'a> {
    /// SQL text.
    pub sql: &'a str,
    /// Parameter type OIDs (0 = let the shard infer).
    pub param_types: &'a [u32],
    /// Parameter values (raw bytes in their format).
    pub params: &'a [Option<Bytes>],
    /// Parameter format codes (empty = all text; one = for all).
    pub param_formats: &'a [i16],
    /// Result format codes (empty = all text; one = for all).
    pub result_formats: &'a [i16],
    /// Cache the statement on this connection under a name (prepared-statement fast path).
    pub cache: bool,
}

/// The key of a prepared statement, (SQL, parameter types), owned or borrowed: the map is
/// keyed by the owned pair and looked up with a borrowed one.
trait StatementKey {
    fn key(&self) -> (&str, &[u32]);
}

impl StatementKey for (String, Vec<u32>) {
    fn key(&self) -> (&str, &[u32]) {
        (&self.0, &self.1)
    }
}

impl StatementKey for (&str, &[u32]) {
    fn key(&self) -> (&str, &[u32]) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn StatementKey + 'a> for (String, Vec<u32>) {
    fn borrow(&self) -> &(dyn StatementKey + 'a) {
        self
    }
}

impl PartialEq for dyn StatementKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn StatementKey + '_ {}

impl std::hash::Hash for dyn StatementKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As the owned (String, Vec<u32>) hashes: the two must agree.
        let (sql, types) = self.key();
        sql.hash(state);
        types.hash(state);
    }
}

/// A live connection to one shard.
#[derive(Debug)]
pub struct BackendConnection {
    shard: String,
    stream: BackendStream,
    read: BytesMut,
    write: BytesMut,
    /// Transaction status from the last ReadyForQuery (`I`, `T` or `E`).
    pub status: u8,
    /// Statements prepared on this connection: (SQL, parameter types) -> statement name.
    prepared: HashMap<(String, Vec<u32>), String, foldhash::fast::RandomState>,
    /// A Parse sent and not answered yet: it joins `prepared` at its ParseComplete only, since
    /// a Parse that fails, or that PostgreSQL skips after an earlier error in the same pipeline,
    /// prepares nothing (a name recorded at send time would poison the next use with 26000).
    parsing: Option<((String, Vec<u32>), String)>,
    /// ParseCompletes of unnamed Parses (a pipelined BEGIN) that come before `parsing`'s.
    parses_before: u32,
    /// Fingerprint of the session settings (SET) applied to this connection.
    pub settings_tag: u64,
    /// Messages still to read before the connection is idle (an abandoned result).
    pub pending: bool,
    next_statement: u64,
    /// Where and how to cancel this backend's running statement.
    pub cancel_target: Option<std::sync::Arc<crate::backend::cancel::CancelTarget>>,
    /// Transaction start (BEGIN and replayed SAVEPOINTs, with their count) not sent yet: it
    /// goes in front of the next statement, saving a round trip.
    pub begin_pending: Option<(String, u32)>,
    /// Command completions of a sent BEGIN prefix still to swallow.
    skip_commands: u32,
    /// Rows of the last COPY TO STDOUT.
    copied: u64,
}

/// What a running COPY TO STDOUT gives next.
#[derive(Debug)]
pub enum CopyOutData {
    /// One CopyData message's bytes (a row, or the CSV header).
    Row(Bytes),
    /// The end, with the number of rows copied.
    Done(u64),
}

fn read_cstr(buf: &mut BytesMut) -> String {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance((end + 1).min(buf.len()));
    text
}

fn parse_error_fields(mut body: BytesMut) -> ServerError {
    let mut error = ServerError::default();
    while body.has_remaining() {
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let value = read_cstr(&mut body);
        match field {
            b'V' => error.severity = value,
            b'S' if error.severity.is_empty() => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            b'P' => error.position = Some(value),
            _ => {}
        }
    }
    error
}

impl BackendConnection {
    /// Connects and authenticates (trust, cleartext, MD5 or SCRAM-SHA-256).
    pub async fn connect(
        endpoint: &Endpoint,
        config: &BackendConfig,
    ) -> Result<Self, BackendError> {
        let io = |source| BackendError::Io {
            shard: endpoint.name.clone(),
            source,
        };
        let stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let stream = match &endpoint.tls {
            Some(tls) => tls.connect(stream).await.map_err(io)?,
            None => BackendStream::Plain(stream),
        };
        let mut connection = Self {
            shard: endpoint.name.clone(),
            stream,
            read: BytesMut::with_capacity(16 * 1024),
            write: BytesMut::with_capacity(4 * 1024),
            status: b'I',
            prepared: HashMap::default(),
            parsing: None,
            parses_before: 0,
            settings_tag: 0,
            pending: false,
            next_statement: 0,
            cancel_target: None,
            begin_pending: None,
            skip_commands: 0,
            copied: 0,
        };
        frontend::startup_message(
            [
                ("user", config.user.as_str()),
                ("database", config.database.as_str()),
                ("application_name", "pg-router"),
                ("client_encoding", "UTF8"),
            ],
            &mut connection.write,
        )
        .map_err(io)?;
        connection.flush().await?;
        connection.authenticate(config).await?;
        loop {
            match connection.read_raw().await? {
                (b'Z', body) => {
                    connection.status = body.first().copied().unwrap_or(b'I');
                    return Ok(connection);
                }
                (b'E', body) => return Err(connection.server_error(parse_error_fields(body))),
                (b'K', mut body) if body.len() >= 8 => {
                    let pid = body.get_i32();
                    let secret = body.get_i32();
                    connection.cancel_target =
                        Some(std::sync::Arc::new(crate::backend::cancel::CancelTarget {
                            host: endpoint.host.clone(),
                            port: endpoint.port,
                            pid,
                            secret,
                        }));
                }
                _ => {}
            }
        }
    }

    async fn authenticate(&mut self, config: &BackendConfig) -> Result<(), BackendError> {
        let password = config.password.clone().unwrap_or_default();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (kind, mut body) = self.read_raw().await?;
            match kind {
                b'E' => return Err(self.server_error(parse_error_fields(body))),
                b'R' => {
                    let code = body.get_i32();
                    match code {
                        0 => return Ok(()),
                        3 => {
                            frontend::password_message(password.as_bytes(), &mut self.write)
                                .map_err(|e| self.io(e))?;
                        }
                        5 => {
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                config.user.as_bytes(),
                                password.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.write)
                                .map_err(|e| self.io(e))?;
                        }
                        10 => {
                            let client = ScramSha256::new(
                                password.as_bytes(),
                                sasl::ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                client.message(),
                                &mut self.write,
                            )
                            .map_err(|e| self.io(e))?;
                            scram = Some(client);
                        }
                        11 => {
                            let client = scram
                                .as_mut()
                                .ok_or_else(|| self.protocol("SASL continue before start"))?;
                            client.update(&body).map_err(|e| self.io(e))?;
                            let message = client.message().to_vec();
                            frontend::sasl_response(&message, &mut self.write)
                                .map_err(|e| self.io(e))?;
                        }
                        12 => {
                            let client = scram
                                .as_mut()
                                .ok_or_else(|| self.protocol("SASL final before start"))?;
                            client.finish(&body).map_err(|e| self.io(e))?;
                            continue;
                        }
                        other => {
                            return Err(self
                                .protocol(&format!("unsupported authentication request {other}")));
                        }
                    }
                    self.flush().await?;
                }
                other => {
                    return Err(self.protocol(&format!(
                        "unexpected message {:?} during authentication",
                        other as char
                    )));
                }
            }
        }
    }

    fn io(&self, source: std::io::Error) -> BackendError {
        BackendError::Io {
            shard: self.shard.clone(),
            source,
        }
    }

    fn protocol(&self, message: &str) -> BackendError {
        BackendError::Protocol {
            shard: self.shard.clone(),
            message: message.to_string(),
        }
    }

    fn server_error(&self, error: ServerError) -> BackendError {
        BackendError::Server {
            shard: self.shard.clone(),
            error: Box::new(error),
        }
    }

    /// The shard's name.
    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// Can this connection go back to the pool (idle, nothing left to read)?
    pub fn is_reusable(&self) -> bool {
        self.status == b'I' && !self.pending
    }

    /// Health check of an idle connection without a round trip: an idle backend sends nothing,
    /// so readable data (a FATAL from a shutdown) or EOF means the connection is dead.
    pub fn is_stale(&mut self) -> bool {
        self.stream.has_unexpected_input()
    }

    async fn flush(&mut self) -> Result<(), BackendError> {
        // Written from the buffer and cleared, not split off: the buffer keeps its allocation
        // for the next statement.
        let written = self.stream.write_all(&self.write).await;
        self.write.clear();
        written.map_err(|e| self.io(e))
    }

    async fn read_raw(&mut self) -> Result<(u8, BytesMut), BackendError> {
        loop {
            if self.read.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]])
                        as usize;
                if len < 4 {
                    return Err(self.protocol("message length below 4"));
                }
                if self.read.len() > len {
                    let kind = self.read[0];
                    let mut frame = self.read.split_to(len + 1);
                    frame.advance(5);
                    return Ok((kind, frame));
                }
                self.read.reserve(len + 1 - self.read.len());
            } else {
                self.read.reserve(8 * 1024);
            }
            self.fill().await?;
        }
    }

    /// Reads what the shard sent next into the read buffer; the shard closing the connection
    /// is an error (a statement's answer was still due).
    async fn fill(&mut self) -> Result<(), BackendError> {
        let n = self
            .stream
            .read_buf(&mut self.read)
            .await
            .map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(self.io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the shard closed the connection",
            )));
        }
        Ok(())
    }

    /// The bookkeeping of every message read, decoded or relayed: prepared statements join
    /// `prepared` at their ParseComplete, a BEGIN sent in front of the statement has its
    /// completion swallowed. `false`: the message was the router's own and goes no further.
    fn note(&mut self, kind: u8) -> bool {
        match kind {
            // The completion of a BEGIN sent in front of the statement.
            b'C' if self.skip_commands > 0 => {
                self.skip_commands -= 1;
                false
            }
            b'1' if self.parses_before > 0 => {
                self.parses_before -= 1;
                true
            }
            b'1' => {
                if let Some((key, name)) = self.parsing.take() {
                    self.prepared.insert(key, name);
                }
                true
            }
            b'E' | b'Z' => {
                self.skip_commands = 0;
                // No ParseComplete before the error: the statement is not prepared.
                self.parsing = None;
                self.parses_before = 0;
                true
            }
            _ => true,
        }
    }

    /// Reads and decodes the next message.
    pub async fn next_message(&mut self) -> Result<BackendMessage, BackendError> {
        let (kind, mut body) = loop {
            let (kind, body) = self.read_raw().await?;
            if self.note(kind) {
                break (kind, body);
            }
        };
        Ok(match kind {
            b'D' => {
                let count = body.get_i16();
                BackendMessage::DataRow(count, body)
            }
            b'T' => {
                let count = body.get_i16();
                let mut columns = Vec::with_capacity(count.max(0) as usize);
                for _ in 0..count {
                    let name = read_cstr(&mut body);
                    columns.push(Column {
                        name,
                        table_oid: body.get_u32(),
                        column_id: body.get_i16(),
                        type_oid: body.get_u32(),
                        type_size: body.get_i16(),
                        type_modifier: body.get_i32(),
                        format: body.get_i16(),
                    });
                }
                BackendMessage::RowDescription(columns)
            }
            b'n' => BackendMessage::NoData,
            b'C' => BackendMessage::CommandComplete(read_cstr(&mut body)),
            b'I' => BackendMessage::EmptyQuery,
            b'E' => BackendMessage::Error(parse_error_fields(body)),
            b'N' => BackendMessage::Notice(parse_error_fields(body)),
            b'Z' => {
                self.status = body.first().copied().unwrap_or(b'I');
                self.pending = false;
                BackendMessage::ReadyForQuery(self.status)
            }
            b't' => {
                let count = body.get_i16();
                BackendMessage::ParameterDescription((0..count).map(|_| body.get_u32()).collect())
            }
            b'S' => BackendMessage::ParameterStatus {
                name: read_cstr(&mut body),
                value: read_cstr(&mut body),
            },
            other => BackendMessage::Other(other),
        })
    }

    /// Copies the answer to a statement sent with [`send_execution`](Self::send_execution)
    /// into `out` as the shard wrote it: DataRows, CommandComplete, EmptyQueryResponse and
    /// notices, and the description (RowDescription, NoData) as `header` asks, whole
    /// messages, byte for byte (the forwarding fast path: nothing is decoded). ParseComplete,
    /// BindComplete and ParameterStatus are dropped, as the decoding readers drop them for a
    /// single statement. Stops at ReadyForQuery, at an ErrorResponse (decoded; its
    /// ReadyForQuery is still to read, see [`drain`](Self::drain)), or once `out` holds
    /// `full_at` bytes (the caller writes them out and calls again).
    pub async fn relay(
        &mut self,
        out: &mut BytesMut,
        full_at: usize,
        header: Header,
    ) -> Result<Relayed, BackendError> {
        let (row_description, no_data) = match header {
            Header::None => (false, false),
            Header::Rows => (true, false),
            Header::Always => (true, true),
        };
        loop {
            while self.read.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]])
                        as usize;
                if len < 4 {
                    return Err(self.protocol("message length below 4"));
                }
                if self.read.len() <= len {
                    self.read.reserve(len + 1 - self.read.len());
                    break;
                }
                let kind = self.read[0];
                if self.note(kind) {
                    match kind {
                        b'D' | b'C' | b'I' | b'N' => out.extend_from_slice(&self.read[..=len]),
                        b'T' if row_description => out.extend_from_slice(&self.read[..=len]),
                        b'n' if no_data => out.extend_from_slice(&self.read[..=len]),
                        b'E' => {
                            let mut body = self.read.split_to(len + 1);
                            body.advance(5);
                            return Ok(Relayed::Error(parse_error_fields(body)));
                        }
                        b'Z' => {
                            self.status = if len > 4 { self.read[5] } else { b'I' };
                            self.pending = false;
                            self.read.advance(len + 1);
                            return Ok(Relayed::Ready);
                        }
                        _ => {}
                    }
                }
                self.read.advance(len + 1);
                if out.len() >= full_at {
                    return Ok(Relayed::Full);
                }
            }
            if self.read.capacity() - self.read.len() < 1024 {
                self.read.reserve(8 * 1024);
            }
            self.fill().await?;
        }
    }

    /// Sends Parse (unless cached) / Bind / Describe portal / Execute / Sync. The caller then
    /// reads the result with [`next_message`](Self::next_message) up to ReadyForQuery.
    pub async fn send_execution(&mut self, execution: &Execution<'_>) -> Result<(), BackendError> {
        if !execution.cache
            && execution.params.is_empty()
            && execution.param_types.is_empty()
            && execution.result_formats.iter().all(|f| *f == 0)
        {
            // No parameters, text results: the simple protocol is one message and the cheapest
            // for the shard (no separate parse/bind/describe steps). A pending BEGIN rides in the
            // same query string: if it fails, PostgreSQL skips the statement.
            match self.begin_pending.take() {
                Some((begin, commands)) => {
                    let text = format!("{begin}; {}", execution.sql);
                    frontend::query(&text, &mut self.write).map_err(|e| self.io(e))?;
                    self.skip_commands = commands;
                }
                None => frontend::query(execution.sql, &mut self.write).map_err(|e| self.io(e))?,
            }
            self.pending = true;
            return self.flush().await;
        }
        match self.begin_pending.take() {
            // A lone BEGIN rides in the same pipeline, before the statement and its Sync: if
            // it fails, PostgreSQL skips everything up to the Sync, so the statement never runs
            // outside the transaction.
            Some((begin, 1)) => {
                frontend::parse("", &begin, std::iter::empty(), &mut self.write)
                    .map_err(|e| self.io(e))?;
                let bound = frontend::bind(
                    "",
                    "",
                    std::iter::empty(),
                    std::iter::empty::<Option<Bytes>>(),
                    |_: Option<Bytes>, _: &mut BytesMut| Ok(postgres_protocol::IsNull::Yes),
                    std::iter::empty(),
                    &mut self.write,
                );
                if bound.is_err() {
                    return Err(self.protocol("encoding Bind failed"));
                }
                frontend::execute("", 0, &mut self.write).map_err(|e| self.io(e))?;
                self.skip_commands = 1;
                self.parses_before = 1;
            }
            // With replayed savepoints it is several statements: one Parse cannot hold them.
            Some((begin, _)) => {
                self.query_text(&begin).await?;
            }
            None => {}
        }
        // A statement prepared before (every query of a hot loop) is looked up by its text and
        // types as borrowed: no key is built for it.
        let cached = execution.cache
            && self
                .prepared
                .contains_key(&(execution.sql, execution.param_types) as &dyn StatementKey);
        let statement_name = if cached {
            String::new()
        } else if execution.cache {
            let key = (execution.sql.to_string(), execution.param_types.to_vec());
            match self.prepared.get(&key) {
                Some(name) => name.clone(),
                None => {
                    if self.prepared.len() >= MAX_PREPARED {
                        // Bounded per connection (auto-prepared shapes are many): close them
                        // all, pipelined in front of this statement; their CloseComplete
                        // answers are skipped by the readers like any other bookkeeping.
                        for name in std::mem::take(&mut self.prepared).into_values() {
                            frontend::close(b'S', &name, &mut self.write)
                                .map_err(|e| self.io(e))?;
                        }
                    }
                    self.next_statement += 1;
                    let name = format!("pgr_{}", self.next_statement);
                    frontend::parse(
                        &name,
                        execution.sql,
                        execution.param_types.iter().copied(),
                        &mut self.write,
                    )
                    .map_err(|e| self.io(e))?;
                    self.parsing = Some((key, name.clone()));
                    name
                }
            }
        } else {
            frontend::parse(
                "",
                execution.sql,
                execution.param_types.iter().copied(),
                &mut self.write,
            )
            .map_err(|e| self.io(e))?;
            String::new()
        };
        let statement_name = match cached {
            true => self
                .prepared
                .get(&(execution.sql, execution.param_types) as &dyn StatementKey)
                .map_or("", String::as_str),
            false => statement_name.as_str(),
        };
        let result = frontend::bind(
            "",
            statement_name,
            execution.param_formats.iter().copied(),
            execution.params.iter(),
            |value, buf| match value {
                Some(bytes) => {
                    buf.extend_from_slice(bytes);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            execution.result_formats.iter().copied(),
            &mut self.write,
        );
        if result.is_err() {
            return Err(self.protocol("encoding Bind failed"));
        }
        frontend::describe(b'P', "", &mut self.write).map_err(|e| self.io(e))?;
        frontend::execute("", 0, &mut self.write).map_err(|e| self.io(e))?;
        frontend::sync(&mut self.write);
        self.pending = true;
        self.flush().await
    }

    /// Starts `COPY ... FROM STDIN` (simple protocol); returns the number of columns.
    pub async fn start_copy_in(&mut self, sql: &str) -> Result<i16, BackendError> {
        let mut body = self.start_copy(sql, b'G', "CopyInResponse").await?;
        let _format = body.get_i8();
        Ok(body.get_i16())
    }

    /// Starts `COPY ... TO STDOUT` (simple protocol); returns the overall format (0 text, 1
    /// binary) and the column formats. Read the data with [`copy_out_data`](Self::copy_out_data).
    pub async fn start_copy_out(&mut self, sql: &str) -> Result<(i8, Vec<i16>), BackendError> {
        let mut body = self.start_copy(sql, b'H', "CopyOutResponse").await?;
        let format = body.get_i8();
        let count = body.get_i16();
        let formats = (0..count).map(|_| body.get_i16()).collect();
        Ok((format, formats))
    }

    /// Sends a COPY statement (after a pending BEGIN, whose CommandCompletes are skipped) and
    /// reads up to the server's Copy{In,Out}Response (`response`), returning its body.
    async fn start_copy(
        &mut self,
        sql: &str,
        response: u8,
        name: &str,
    ) -> Result<BytesMut, BackendError> {
        let sql = match self.begin_pending.take() {
            Some((begin, commands)) => {
                self.skip_commands = commands;
                format!("{begin}; {sql}")
            }
            None => sql.to_string(),
        };
        frontend::query(&sql, &mut self.write).map_err(|e| self.io(e))?;
        self.pending = true;
        self.flush().await?;
        loop {
            let (kind, body) = self.read_raw().await?;
            match kind {
                kind if kind == response => return Ok(body),
                b'C' if self.skip_commands > 0 => self.skip_commands -= 1,
                b'E' => {
                    let error = parse_error_fields(body);
                    self.skip_commands = 0;
                    self.drain().await?;
                    return Err(self.server_error(error));
                }
                b'Z' => {
                    self.pending = false;
                    return Err(self.protocol(&format!("COPY ended before {name}")));
                }
                _ => {}
            }
        }
    }

    /// The next row of a running COPY TO STDOUT, or its end with the number of rows copied.
    pub async fn copy_out_data(&mut self) -> Result<CopyOutData, BackendError> {
        let mut failed = None;
        loop {
            let (kind, body) = self.read_raw().await?;
            match kind {
                b'd' => return Ok(CopyOutData::Row(body.freeze())),
                b'C' => {
                    let mut body = body;
                    let tag = read_cstr(&mut body);
                    if failed.is_none() {
                        self.copied = crate::protocol::messages::tag_rows(&tag).unwrap_or(0);
                    }
                }
                b'E' => failed = Some(parse_error_fields(body)),
                b'Z' => {
                    self.status = body.first().copied().unwrap_or(b'I');
                    self.pending = false;
                    return match failed {
                        Some(error) => Err(self.server_error(error)),
                        None => Ok(CopyOutData::Done(self.copied)),
                    };
                }
                _ => {}
            }
        }
    }

    /// Sends rows (text format lines) of a running COPY.
    pub async fn copy_data(&mut self, data: &[u8]) -> Result<(), BackendError> {
        use bytes::BufMut;
        self.write.put_u8(b'd');
        self.write.put_i32(data.len() as i32 + 4);
        self.write.put_slice(data);
        self.flush().await
    }

    /// Ends a running COPY (CopyDone, or CopyFail with `failure`); returns the command tag.
    pub async fn finish_copy(&mut self, failure: Option<&str>) -> Result<String, BackendError> {
        match failure {
            None => frontend::copy_done(&mut self.write),
            Some(message) => {
                frontend::copy_fail(message, &mut self.write).map_err(|e| self.io(e))?
            }
        }
        self.flush().await?;
        let mut tag = String::new();
        let mut failed = None;
        loop {
            match self.next_message().await? {
                BackendMessage::CommandComplete(t) => tag = t,
                BackendMessage::Error(error) => failed = Some(error),
                BackendMessage::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match failed {
            Some(error) => Err(self.server_error(error)),
            None => Ok(tag),
        }
    }

    /// Forgets a cached statement whose Parse failed (so the next use parses again).
    pub fn forget_statement(&mut self, sql: &str) {
        self.prepared.retain(|(cached, _), _| cached != sql);
    }

    /// Describes `sql`: parameter types and result columns.
    pub async fn describe(
        &mut self,
        sql: &str,
        param_types: &[u32],
    ) -> Result<Description, BackendError> {
        frontend::parse("", sql, param_types.iter().copied(), &mut self.write)
            .map_err(|e| self.io(e))?;
        frontend::describe(b'S', "", &mut self.write).map_err(|e| self.io(e))?;
        frontend::sync(&mut self.write);
        self.pending = true;
        self.flush().await?;
        let mut description = Description::default();
        let mut failure = None;
        loop {
            match self.next_message().await? {
                BackendMessage::ParameterDescription(params) => description.params = params,
                BackendMessage::RowDescription(columns) => description.columns = Some(columns),
                BackendMessage::Error(error) => failure = Some(error),
                BackendMessage::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match failure {
            Some(error) => Err(self.server_error(error)),
            None => Ok(description),
        }
    }

    /// Runs `sql` (no parameters, text results) and collects its rows as text. For the router's
    /// own bookkeeping statements, not for client queries.
    pub async fn query_text(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        let sql = match self.begin_pending.take() {
            Some((begin, _)) => format!("{begin}; {sql}"),
            None => sql.to_string(),
        };
        frontend::query(&sql, &mut self.write).map_err(|e| self.io(e))?;
        self.pending = true;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.next_message().await? {
                BackendMessage::DataRow(_, body) => {
                    rows.push(crate::protocol::values::split_text_row(&body))
                }
                BackendMessage::Error(error) => failure = Some(error),
                BackendMessage::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match failure {
            Some(error) => Err(self.server_error(error)),
            None => Ok(rows),
        }
    }

    /// Reads until ReadyForQuery, dropping everything (after an abandoned result).
    pub async fn drain(&mut self) -> Result<(), BackendError> {
        while self.pending {
            self.next_message().await?;
        }
        Ok(())
    }

    /// Sends Terminate (best effort).
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }
}
