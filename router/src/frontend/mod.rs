//! The PostgreSQL frontend: protocol v3 with clients, written directly on the socket.
//!
//! One task per client reads a message, runs it through the [`Session`], and writes the answer
//! into one output buffer that goes out in a single write per simple query, `Sync` or `Flush`
//! (large results are flushed as they stream). Startup handles `SSLRequest` and direct TLS
//! (rustls), `GSSENCRequest` (declined), `CancelRequest`, protocol 3.0 and 3.2, trust or
//! SCRAM-SHA-256 authentication ([`scram`]), and applies the client's startup settings
//! (`application_name`, `TimeZone`, `options=-c ...`) as session settings.
//!
//! The extended protocol (`extended.rs`) keeps prepared statements (planned once at Parse,
//! re-planned only when the topology changed) and portals (a portal run with a row limit is
//! suspended and resumed). A `Describe` of a portal followed by its `Execute` is answered from
//! the execution itself, so the unnamed-statement cycle (Parse/Bind/Describe/Execute/Sync)
//! costs one shard round trip.

mod extended;
mod forward;
pub mod logins;
pub mod scram;
pub mod session;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::backend::connection::{BackendError, CopyOutData, Header};
use crate::error::RouterError;
use crate::exec::merge::RowStream;
use crate::frontend::session::{Outcome, RouterState, Session};
use crate::plan::{self, PlanError, Planned};
use crate::protocol::messages::Params;
use crate::protocol::messages::ServerError;
use crate::topology::AuthMethod;
use extended::{Portal, Statement};
use logins::Logins;

/// Version the router reports to clients.
pub const SERVER_VERSION: &str = "18.0 (pg-router)";

/// Output is written to the client once it holds this much, even mid-result.
const FLUSH_AT: usize = 64 * 1024;

/// What every client connection of one listener shares.
pub struct Frontend {
    state: Arc<RouterState>,
    /// Swapped while the router runs (Kubernetes mode follows the PostgresUsers).
    logins: Arc<Logins>,
    /// Used for unknown users, so that they go through the same exchange and fail the same way.
    decoy: scram::Verifier,
    tls: Option<TlsAcceptor>,
    /// `tls-server-end-point` channel binding data of the TLS certificate, when it has one.
    end_point: Option<Vec<u8>>,
}

impl Frontend {
    /// The frontend for `state`, authenticating against `logins` as they are when a client
    /// connects, with TLS if `tls` is set (and SCRAM channel binding over it when `end_point` is
    /// known, see [`scram::tls_server_end_point`]).
    pub fn new(
        state: Arc<RouterState>,
        logins: Arc<Logins>,
        tls: Option<TlsAcceptor>,
        end_point: Option<Vec<u8>>,
    ) -> Self {
        Self {
            state,
            logins,
            decoy: scram::Verifier::from_secret(&format!("{:x}", rand::random::<u128>())),
            end_point: end_point.filter(|_| tls.is_some()),
            tls,
        }
    }
}

/// An error that ends a client connection.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; it was told (FATAL) where possible.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Authentication failed; the client was told.
    #[error("authentication failed")]
    Authentication,
}

impl From<wire::ProtocolViolation> for Closed {
    fn from(violation: wire::ProtocolViolation) -> Self {
        Closed::Protocol(violation.0)
    }
}

/// Reads one length-prefixed startup packet (without a type byte); `None` at EOF.
async fn read_startup_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut BytesMut,
) -> Result<Option<Bytes>, Closed> {
    loop {
        if input.len() >= 4 {
            let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
            if !(8..=wire::MAX_STARTUP_PACKET).contains(&len) {
                return Err(Closed::Protocol("invalid length of startup packet".into()));
            }
            if input.len() >= len {
                let mut packet = input.split_to(len).freeze();
                let _ = packet.split_to(4);
                return Ok(Some(packet));
            }
        }
        if stream.read_buf(input).await? == 0 {
            return Ok(None);
        }
    }
}

fn fatal(code: &str, message: impl Into<String>) -> ServerError {
    ServerError {
        severity: "FATAL".into(),
        code: code.into(),
        message: message.into(),
        ..ServerError::default()
    }
}

async fn send_fatal<S: AsyncWrite + Unpin>(stream: &mut S, error: &ServerError) {
    let mut out = BytesMut::new();
    wire::error_fields(&mut out, b'E', error);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// Serves one accepted client socket until it disconnects.
pub async fn serve(mut socket: TcpStream, frontend: Arc<Frontend>) {
    let peer = socket.peer_addr().ok();
    if let Err(error) = negotiate(&mut socket, frontend).await {
        tracing::debug!(?peer, %error, "client connection ended with an error");
    }
}

async fn negotiate(socket: &mut TcpStream, frontend: Arc<Frontend>) -> Result<(), Closed> {
    // Direct TLS (`sslnegotiation=direct`): the first byte is a TLS handshake record.
    if let Some(tls) = &frontend.tls {
        let mut first = [0u8; 1];
        if socket.peek(&mut first).await? == 1 && first[0] == 0x16 {
            let stream = tls.accept(socket).await?;
            return Connection::new(stream, BytesMut::new(), frontend.clone())
                .over_tls()
                .run(None)
                .await;
        }
    }
    let mut input = BytesMut::new();
    loop {
        let packet = match read_startup_packet(socket, &mut input).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(()),
            Err(Closed::Protocol(message)) => {
                send_fatal(socket, &fatal("08P01", message.clone())).await;
                return Err(Closed::Protocol(message));
            }
            Err(other) => return Err(other),
        };
        let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        match code {
            wire::SSL_REQUEST => match &frontend.tls {
                Some(tls) => {
                    if !input.is_empty() {
                        // Bytes after SSLRequest would bypass encryption (CVE-2021-23222).
                        return Err(Closed::Protocol("unencrypted data after SSLRequest".into()));
                    }
                    socket.write_all(b"S").await?;
                    let stream = tls.accept(socket).await?;
                    return Connection::new(stream, BytesMut::new(), frontend.clone())
                        .over_tls()
                        .run(None)
                        .await;
                }
                None => socket.write_all(b"N").await?,
            },
            wire::GSSENC_REQUEST => socket.write_all(b"N").await?,
            wire::CANCEL_REQUEST if packet.len() >= 12 => {
                let pid = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                frontend.state.cancels.cancel(pid, &packet[8..]).await;
                return Ok(());
            }
            code if code >> 16 == 3 => {
                let input = std::mem::take(&mut input);
                return Connection::new(socket, input, frontend.clone())
                    .run(Some(packet))
                    .await;
            }
            code => {
                let message = format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0 to 3.2",
                    code >> 16,
                    code & 0xffff
                );
                send_fatal(socket, &fatal("0A000", message.clone())).await;
                return Err(Closed::Protocol(message));
            }
        }
    }
}

/// A result being streamed to the client.
struct Running {
    rows: RowStream,
    command: String,
    count: u64,
}

fn plan_one(state: &RouterState, sql: &str) -> Result<(u64, Arc<Planned>), PlanError> {
    let runtime = state.runtime();
    let mut planned = plan::plan_sql(&runtime.topology, sql)?;
    if planned.len() != 1 {
        return Err(PlanError::Syntax(
            "cannot insert multiple commands into a prepared statement".into(),
        ));
    }
    Ok((runtime.version, Arc::new(planned.remove(0))))
}

/// After the binder found an unknown or ambiguous column: the topology to plan the
/// statement again with. The shards' catalog is read again first (a column added on the
/// shards directly, not through a router); inside a transaction, whose own DDL the
/// catalog read on another connection cannot see, the binder is left out and the shard
/// answers the names itself.
async fn topology_after_column_error(
    state: &RouterState,
    in_transaction: bool,
) -> Option<crate::topology::Topology> {
    let before = state.runtime().version;
    state.refresh_aggregates().await;
    let runtime = state.runtime();
    if in_transaction {
        let mut topology = (*runtime.topology).clone();
        topology.columns.clear();
        return Some(topology);
    }
    (runtime.version != before).then(|| (*runtime.topology).clone())
}

/// A shard's error about an auto-prepared statement points into the shape the shard saw; the
/// client wrote the literals: the position moves to the same place in the client's `sql`.
fn at_client_position(
    error: &mut RouterError,
    prepared: Option<&plan::cache::AutoPrepared>,
    shape: &str,
    sql: &str,
) {
    if let (Some(prepared), RouterError::Backend(BackendError::Server { error, .. })) =
        (prepared, error)
        && let Some(position) = error.position.as_deref().and_then(|p| p.parse().ok())
    {
        let position = prepared.client_position(shape, sql, position);
        error.position = Some(position.to_string());
    }
}

fn session_error(code: &'static str, message: impl Into<String>) -> RouterError {
    RouterError::session(code, message)
}

/// Startup parameters that are not settings.
fn is_setting(name: &str) -> bool {
    !matches!(
        name,
        "user" | "database" | "replication" | "options" | "client_encoding"
    ) && !name.starts_with("_pq_.")
}

/// `-c name=value` and `--name=value` pairs of the `options` startup parameter.
fn options_settings(options: &str) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut escaped = false;
    for c in options.chars() {
        match c {
            _ if escaped => {
                word.push(c);
                escaped = false;
            }
            '\\' => escaped = true,
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let pair = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            word.strip_prefix("-c").map(str::to_string)
        };
        if let Some((name, value)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            settings.push((name.replace('-', "_"), value.to_string()));
        }
    }
    settings
}

/// One client connection after the startup packet.
struct Connection<S> {
    stream: S,
    input: BytesMut,
    output: BytesMut,
    frontend: Arc<Frontend>,
    session: Session,
    // foldhash (seeded per process): looked up for every Bind and Execute, and cleared of the
    // unnamed entries for every simple query.
    statements: HashMap<String, Arc<Statement>, foldhash::fast::RandomState>,
    portals: HashMap<String, Portal, foldhash::fast::RandomState>,
    /// After an error in an extended-protocol message: discard everything up to Sync.
    skip_to_sync: bool,
    /// A portal whose Describe waits for its Execute (answered with the result's own columns).
    pending_describe: Option<String>,
    /// Set while the outcome of a described portal's Execute is written (no rows: NoData).
    describing_portal: bool,
    cancel_key: Option<(i32, Vec<u8>)>,
    /// Channel binding data to offer SCRAM-SHA-256-PLUS with (TLS connections).
    end_point: Option<Vec<u8>>,
}

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        if let Some((pid, secret)) = &self.cancel_key {
            self.frontend.state.cancels.remove(*pid, secret);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn new(stream: S, input: BytesMut, frontend: Arc<Frontend>) -> Self {
        Self {
            stream,
            input,
            output: BytesMut::with_capacity(8 * 1024),
            session: Session::new(frontend.state.clone()),
            frontend,
            statements: HashMap::default(),
            portals: HashMap::default(),
            skip_to_sync: false,
            pending_describe: None,
            describing_portal: false,
            cancel_key: None,
            end_point: None,
        }
    }

    /// The connection is encrypted: SCRAM may bind to the certificate.
    fn over_tls(mut self) -> Self {
        self.end_point = self.frontend.end_point.clone();
        self
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output).await?;
            self.output.clear();
        }
        self.stream.flush().await
    }

    /// Reads the next message: type and body; `None` at EOF.
    async fn read_message(&mut self) -> Result<Option<(u8, Bytes)>, Closed> {
        loop {
            if self.input.len() >= 5 {
                let len = u32::from_be_bytes([
                    self.input[1],
                    self.input[2],
                    self.input[3],
                    self.input[4],
                ]) as usize;
                if !(4..=wire::MAX_MESSAGE).contains(&len) {
                    return Err(Closed::Protocol(format!("invalid message length {len}")));
                }
                if self.input.len() > len {
                    let kind = self.input[0];
                    let mut message = self.input.split_to(len + 1).freeze();
                    let _ = message.split_to(5);
                    return Ok(Some((kind, message)));
                }
                self.input.reserve(len + 1 - self.input.len());
            } else if self.input.capacity() - self.input.len() < 1024 {
                self.input.reserve(8 * 1024);
            }
            if self.stream.read_buf(&mut self.input).await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn run(mut self, startup: Option<Bytes>) -> Result<(), Closed> {
        let result = self.serve(startup).await;
        if let Err(Closed::Protocol(message)) = &result {
            wire::error_fields(&mut self.output, b'E', &fatal("08P01", message.clone()));
            let _ = self.flush().await;
        }
        result
    }

    async fn serve(&mut self, startup: Option<Bytes>) -> Result<(), Closed> {
        let startup = match startup {
            Some(packet) => packet,
            None => match read_startup_packet(&mut self.stream, &mut self.input).await? {
                Some(packet) => packet,
                None => return Ok(()),
            },
        };
        if !self.startup(startup).await? {
            return Ok(());
        }
        loop {
            let Some((kind, body)) = self.read_message().await? else {
                return Ok(());
            };
            if kind != b'E' {
                self.answer_pending_describe().await;
            }
            if self.skip_to_sync && !matches!(kind, b'S' | b'X' | b'H') {
                continue;
            }
            match kind {
                b'Q' => self.simple_query(body).await?,
                b'P' => self.parse(body).await,
                b'B' => self.bind(body),
                b'D' => self.describe(body).await,
                b'E' => self.execute(body).await?,
                b'C' => self.close(body),
                b'S' => self.sync().await?,
                b'H' => self.flush().await?,
                b'X' => return Ok(()),
                // Outside COPY, PostgreSQL ignores these.
                b'd' | b'c' | b'f' => {}
                other => {
                    return Err(Closed::Protocol(format!(
                        "invalid frontend message type {other}"
                    )));
                }
            }
            if self.output.len() >= FLUSH_AT {
                self.flush().await?;
            }
        }
    }

    /// Protocol negotiation, authentication, settings and the first ReadyForQuery. `false`: the
    /// connection is done (a cancel request or a client that left).
    async fn startup(&mut self, packet: Bytes) -> Result<bool, Closed> {
        let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        if code == wire::SSL_REQUEST || code == wire::GSSENC_REQUEST {
            return Err(Closed::Protocol(
                "encryption request inside an encrypted connection".into(),
            ));
        }
        if code == wire::CANCEL_REQUEST && packet.len() >= 12 {
            let pid = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
            self.frontend.state.cancels.cancel(pid, &packet[8..]).await;
            return Ok(false);
        }
        if code >> 16 != 3 {
            return Err(Closed::Protocol(format!(
                "unsupported frontend protocol {}.{}",
                code >> 16,
                code & 0xffff
            )));
        }
        let requested_minor = code & 0xffff;
        let parameters = wire::startup_parameters(packet.slice(4..))?;
        let unrecognized: Vec<String> = parameters
            .iter()
            .filter(|(name, _)| name.starts_with("_pq_."))
            .map(|(name, _)| name.clone())
            .collect();
        // 3.2 (PostgreSQL 18) only changes the cancel key length; 3.1 was never used.
        let minor = if requested_minor >= 2 { 2 } else { 0 };
        if minor != requested_minor || !unrecognized.is_empty() {
            wire::negotiate_protocol_version(&mut self.output, minor, &unrecognized);
        }
        let parameter = |name: &str| {
            parameters
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let Some(user) = parameter("user").filter(|u| !u.is_empty()) else {
            let error = fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            );
            wire::error_fields(&mut self.output, b'E', &error);
            self.flush().await?;
            return Ok(false);
        };
        self.authenticate(&user).await?;

        let mut settings: Vec<(String, String)> = parameters
            .iter()
            .filter(|(name, _)| is_setting(name))
            .cloned()
            .collect();
        if let Some(options) = parameter("options") {
            settings.extend(options_settings(&options));
        }
        if let Err(error) = self.session.apply_startup_settings(&settings).await {
            let mut error = error.to_server_error();
            error.severity = "FATAL".into();
            wire::error_fields(&mut self.output, b'E', &error);
            self.flush().await?;
            return Ok(false);
        }
        let setting = |name: &str, default: &str| {
            settings
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| default.to_string())
        };
        let reported = [
            ("server_version", SERVER_VERSION.to_string()),
            ("server_encoding", "UTF8".into()),
            ("client_encoding", "UTF8".into()),
            ("DateStyle", setting("DateStyle", "ISO, MDY")),
            ("IntervalStyle", setting("IntervalStyle", "postgres")),
            ("TimeZone", setting("TimeZone", "Etc/UTC")),
            ("integer_datetimes", "on".into()),
            ("standard_conforming_strings", "on".into()),
            ("application_name", setting("application_name", "")),
            ("default_transaction_read_only", "off".into()),
            ("in_hot_standby", "off".into()),
            ("is_superuser", "off".into()),
            ("session_authorization", user.clone()),
            ("scram_iterations", scram::ITERATIONS.to_string()),
        ];
        for (name, value) in &reported {
            wire::parameter_status(&mut self.output, name, value);
        }
        self.session.set_reported_defaults(
            reported
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
        );
        let pid = (rand::random::<u32>() >> 1) as i32;
        let secret: Vec<u8> = if minor >= 2 {
            rand::random::<[u8; 32]>().to_vec()
        } else {
            rand::random::<[u8; 4]>().to_vec()
        };
        wire::backend_key_data(&mut self.output, pid, &secret);
        self.session
            .set_cancel(self.frontend.state.cancels.session(pid, secret.clone()));
        self.cancel_key = Some((pid, secret));
        wire::ready_for_query(&mut self.output, b'I');
        self.flush().await?;
        Ok(true)
    }

    async fn authenticate(&mut self, user: &str) -> Result<(), Closed> {
        // One table for the whole exchange: a swap in the middle does not mix two.
        let logins = self.frontend.logins.current();
        if logins.method() == AuthMethod::Trust {
            wire::authentication(&mut self.output, 0, &[]);
            return Ok(());
        }
        let found = logins.verifier(user);
        let known = found.is_some();
        let frontend = self.frontend.clone();
        let verifier = found.as_deref().unwrap_or(&frontend.decoy);
        let mechanisms = match &self.end_point {
            Some(_) => format!("{}\0{}\0\0", scram::MECHANISM_PLUS, scram::MECHANISM),
            None => format!("{}\0\0", scram::MECHANISM),
        };
        wire::authentication(&mut self.output, 10, mechanisms.as_bytes());
        self.flush().await?;
        let mut initial = self.password_message().await?;
        let mechanism = wire::cstr(&mut initial)?;
        let offered = mechanism == scram::MECHANISM
            || (mechanism == scram::MECHANISM_PLUS && self.end_point.is_some());
        if !offered {
            return Err(Closed::Protocol(format!(
                "client selected an invalid SASL authentication mechanism {mechanism:?}"
            )));
        }
        if initial.len() < 4 {
            return Err(Closed::Protocol("malformed SASLInitialResponse".into()));
        }
        let client_first = initial.slice(4..);
        let failed = |this: &mut Self, error: scram::ScramError| match error {
            scram::ScramError::Malformed(what) => Closed::Protocol(what.to_string()),
            scram::ScramError::WrongPassword => {
                let error = fatal(
                    "28P01",
                    format!("password authentication failed for user \"{user}\""),
                );
                wire::error_fields(&mut this.output, b'E', &error);
                Closed::Authentication
            }
        };
        let end_point = self.end_point.clone();
        let started =
            scram::Exchange::start(verifier, &mechanism, end_point.as_deref(), &client_first);
        let (exchange, server_first) = match started {
            Ok(started) => started,
            Err(error) => return Err(failed(self, error)),
        };
        wire::authentication(&mut self.output, 11, server_first.as_bytes());
        self.flush().await?;
        let client_final = self.password_message().await?;
        match exchange.finish(verifier, &client_final) {
            Ok(server_final) if known => {
                wire::authentication(&mut self.output, 12, server_final.as_bytes());
                wire::authentication(&mut self.output, 0, &[]);
                Ok(())
            }
            Ok(_) => {
                let error = failed(self, scram::ScramError::WrongPassword);
                self.flush().await?;
                Err(error)
            }
            Err(error) => {
                let error = failed(self, error);
                self.flush().await?;
                Err(error)
            }
        }
    }

    /// The body of the next message, which must be a `PasswordMessage` (`p`).
    async fn password_message(&mut self) -> Result<Bytes, Closed> {
        match self.read_message().await? {
            Some((b'p', body)) => Ok(body),
            Some((other, _)) => Err(Closed::Protocol(format!(
                "expected SASL response, got message type {other}"
            ))),
            None => Err(Closed::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    fn transaction_status(&self) -> u8 {
        self.session.transaction_status()
    }

    fn send_error(&mut self, error: RouterError) {
        let error = error.to_server_error();
        wire::error_fields(&mut self.output, b'E', &error);
    }

    /// Writes what the shards said beside the result: notices, and the settings they reported
    /// as changed (ParameterStatus, as PostgreSQL sends them before the CommandComplete).
    fn send_notices(&mut self) {
        for notice in self.session.take_notices() {
            wire::error_fields(&mut self.output, b'N', &notice);
        }
        for (name, value) in self.session.take_reports() {
            wire::parameter_status(&mut self.output, &name, &value);
        }
    }

    /// A statement that could not be planned: counted by its SQLSTATE and reported (in the
    /// extended protocol, everything up to Sync is then skipped).
    fn plan_failed(&mut self, error: PlanError, extended: bool) {
        let error = RouterError::from(error).to_server_error();
        self.frontend.state.metrics.observe_error(&error.code);
        wire::error_fields(&mut self.output, b'E', &error);
        self.skip_to_sync |= extended;
    }

    /// An error in an extended-protocol message: reported, then everything up to Sync skipped.
    fn extended_error(&mut self, error: RouterError) {
        self.send_error(error);
        self.skip_to_sync = true;
    }

    async fn simple_query(&mut self, body: Bytes) -> Result<(), Closed> {
        let sql = wire::cstr_in(&body)?;
        // A simple query closes the unnamed statement and portal.
        self.statements.remove("");
        self.portals.remove("");
        let runtime = self.frontend.state.runtime();
        let auto_prepare = self.frontend.state.auto_prepare();
        let mut planned = runtime
            .plan_cache
            .plan_simple(&runtime.topology, sql, auto_prepare);
        if let Err(PlanError::Column(_)) = planned
            && let Some(topology) =
                topology_after_column_error(&self.frontend.state, self.session.in_transaction())
                    .await
        {
            planned = plan::plan_sql(&topology, sql).map(|planned| plan::cache::SimplePlan {
                planned,
                prepared: None,
            });
        }
        match planned {
            Err(error) => self.plan_failed(error, false),
            Ok(simple) if simple.planned.is_empty() => wire::empty(&mut self.output, b'I'),
            Ok(simple) => {
                drop(runtime);
                let no_params = Params::default();
                let (params, cache) = match &simple.prepared {
                    Some(prepared) => (&prepared.params, true),
                    None => (&no_params, false),
                };
                let forwarded = match simple.planned.as_slice() {
                    [statement] => {
                        self.forward(&forward::Forwarding {
                            statement,
                            params,
                            result_formats: &[],
                            cache,
                            auto_prepared: simple.prepared.as_ref().map(|p| (p, sql)),
                            header: Header::Rows,
                            extended: false,
                        })
                        .await?
                    }
                    _ => forward::Forward::Declined,
                };
                let statements = match forwarded {
                    forward::Forward::Done => &[][..],
                    forward::Forward::Declined => &simple.planned[..],
                };
                for statement in statements {
                    let result = self.session.execute(statement, params, &[], cache).await;
                    self.send_notices();
                    let sent = match result {
                        Ok(outcome) => self.send_outcome(outcome, true, 0).await?,
                        Err(error) => Err(error),
                    };
                    if let Err(mut error) = sent {
                        at_client_position(
                            &mut error,
                            simple.prepared.as_ref(),
                            &statement.sql,
                            sql,
                        );
                        self.send_error(error);
                        break;
                    }
                }
            }
        }
        let status = self.transaction_status();
        wire::ready_for_query(&mut self.output, status);
        self.flush().await?;
        Ok(())
    }

    /// Writes a statement's outcome. Rows stream until `max_rows` (0: all); a result cut there
    /// is returned to be resumed. `describe`: rows get a RowDescription, others NoData (in the
    /// extended protocol, only when the client asked with Describe).
    async fn send_outcome(
        &mut self,
        outcome: Outcome,
        describe: bool,
        max_rows: usize,
    ) -> Result<Result<Option<Running>, RouterError>, Closed> {
        match outcome {
            Outcome::Rows {
                columns,
                rows,
                command,
            } => {
                if describe {
                    wire::row_description(&mut self.output, &columns, None);
                }
                let running = Running {
                    rows,
                    command,
                    count: 0,
                };
                return self.stream_rows(running, max_rows).await;
            }
            Outcome::Command(tag) | Outcome::End(tag) => {
                if describe && self.pending_is_extended() {
                    wire::empty(&mut self.output, b'n');
                }
                wire::command_complete(&mut self.output, &tag);
            }
            Outcome::Begin => {
                if describe && self.pending_is_extended() {
                    wire::empty(&mut self.output, b'n');
                }
                wire::command_complete(&mut self.output, "BEGIN");
            }
            Outcome::Empty => wire::empty(&mut self.output, b'I'),
            Outcome::CopyIn { format, columns } => return Ok(self.copy_in(format, columns).await),
            Outcome::CopyOut {
                format,
                formats,
                mut data,
            } => {
                wire::copy_out_response(&mut self.output, format, &formats);
                while let Some(item) = data.next().await {
                    match item {
                        Ok(CopyOutData::Row(row)) => {
                            wire::copy_data(&mut self.output, &row);
                            if self.output.len() >= FLUSH_AT {
                                self.flush().await?;
                            }
                        }
                        Ok(CopyOutData::Done(rows)) => {
                            wire::empty(&mut self.output, b'c');
                            wire::command_complete(&mut self.output, &format!("COPY {rows}"));
                        }
                        Err(error) => return Ok(Err(error)),
                    }
                }
            }
        }
        Ok(Ok(None))
    }

    /// Only true while answering a deferred portal Describe (a simple query sends no NoData).
    fn pending_is_extended(&self) -> bool {
        self.describing_portal
    }

    async fn stream_rows(
        &mut self,
        mut running: Running,
        max_rows: usize,
    ) -> Result<Result<Option<Running>, RouterError>, Closed> {
        let mut sent = 0usize;
        while let Some(row) = running.rows.next().await {
            self.send_stream_notices();
            let row = match row {
                Ok(row) => row,
                Err(error) => return Ok(Err(error)),
            };
            wire::data_row(&mut self.output, &row);
            running.count += 1;
            sent += 1;
            if self.output.len() >= FLUSH_AT {
                self.flush().await?;
            }
            if max_rows > 0 && sent == max_rows {
                wire::empty(&mut self.output, b's');
                return Ok(Ok(Some(running)));
            }
        }
        self.send_stream_notices();
        let tag = format!("{} {}", running.command, running.count);
        wire::command_complete(&mut self.output, &tag);
        Ok(Ok(None))
    }

    /// Notices that came while rows streamed, in front of the next row.
    fn send_stream_notices(&mut self) {
        for notice in self.session.take_stream_notices() {
            wire::error_fields(&mut self.output, b'N', &notice);
        }
    }

    /// COPY FROM STDIN: rows from the client until CopyDone or CopyFail.
    async fn copy_in(&mut self, format: i8, columns: i16) -> Result<Option<Running>, RouterError> {
        wire::copy_in_response(&mut self.output, format, columns);
        if let Err(error) = self.flush().await {
            let _ = self.session.finish_copy(Some(error.to_string())).await;
            return Err(session_error("08006", "client connection lost during COPY"));
        }
        loop {
            let message = match self.read_message().await {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => {
                    let _ = self
                        .session
                        .finish_copy(Some("client connection lost".into()))
                        .await;
                    return Err(session_error("08006", "client connection lost during COPY"));
                }
            };
            match message {
                (b'd', data) => self.session.copy_data(&data).await,
                (b'c', _) => {
                    let rows = self.session.finish_copy(None).await?;
                    wire::command_complete(&mut self.output, &format!("COPY {rows}"));
                    return Ok(None);
                }
                (b'f', mut body) => {
                    let message = wire::cstr(&mut body).unwrap_or_default();
                    return match self
                        .session
                        .finish_copy(Some(format!("COPY from stdin failed: {message}")))
                        .await
                    {
                        Err(error) => Err(error),
                        Ok(_) => Err(session_error(
                            "57014",
                            format!("COPY from stdin failed: {message}"),
                        )),
                    };
                }
                // Flush and Sync are ignored during COPY FROM STDIN.
                (b'H' | b'S', _) => {}
                (other, _) => {
                    let _ = self
                        .session
                        .finish_copy(Some("unexpected message during COPY".into()))
                        .await;
                    return Err(session_error(
                        "08P01",
                        format!("unexpected message type {other} during COPY from stdin"),
                    ));
                }
            }
        }
    }
}
