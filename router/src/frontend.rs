//! The PostgreSQL frontend (pgwire): startup and authentication, the simple and extended query
//! protocols, mapping planner/session results and errors to protocol messages.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Sink, StreamExt};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password};
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
    finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    CopyResponse, DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo,
    QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::copy::{CopyData, CopyDone, CopyFail};
use pgwire::messages::data::DataRow;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::sync::{Mutex, OnceCell};

use crate::backend::{Column, Description, ServerError};
use crate::error::RouterError;
use crate::executor::Params;
use crate::planner::{self, PlanError, Planned};
use crate::session::{Outcome, RouterState, Session};
use crate::topology::{AuthConfig, AuthMethod};

/// Version the router reports to clients.
pub const SERVER_VERSION: &str = "18.0 (pg-router)";

fn server_parameters() -> DefaultServerParameterProvider {
    let mut provider = DefaultServerParameterProvider::default();
    provider.server_version = SERVER_VERSION.to_string();
    provider
}

fn error_info(error: ServerError) -> ErrorInfo {
    let mut info = ErrorInfo::new(
        if error.severity.is_empty() {
            "ERROR".into()
        } else {
            error.severity
        },
        error.code,
        error.message,
    );
    info.detail = error.detail;
    info.hint = error.hint;
    info.position = error.position;
    info
}

fn to_pgwire(error: RouterError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(error.to_server_error())))
}

fn pg_type(oid: u32) -> Type {
    Type::from_oid(oid).unwrap_or_else(|| {
        Type::new(
            format!("type_{oid}"),
            oid,
            postgres_types::Kind::Simple,
            "pg_catalog".to_string(),
        )
    })
}

fn field_info(column: &Column, format: FieldFormat) -> FieldInfo {
    FieldInfo::new(
        column.name.clone(),
        (column.table_oid != 0).then_some(column.table_oid as i32),
        (column.column_id != 0).then_some(column.column_id),
        pg_type(column.type_oid),
        format,
    )
    .with_type_size(column.type_size)
    .with_type_modifier(column.type_modifier)
}

/// Format codes as the protocol sends them (none: all text; one: for all; else per column).
fn format_codes(format: &Format) -> Vec<i16> {
    match format {
        Format::UnifiedText => Vec::new(),
        Format::UnifiedBinary => vec![1],
        Format::Individual(codes) => codes.clone(),
    }
}

fn tag_from(text: &str) -> Tag {
    let parts: Vec<&str> = text.split(' ').collect();
    let numbers: Vec<&str> = parts
        .iter()
        .rev()
        .take_while(|p| p.parse::<u64>().is_ok())
        .copied()
        .collect();
    let words = parts[..parts.len() - numbers.len()].join(" ");
    match numbers.as_slice() {
        [rows, oid] => Tag::new(&words)
            .with_oid(oid.parse().unwrap_or(0))
            .with_rows(rows.parse().unwrap_or(0)),
        [rows] => Tag::new(&words).with_rows(rows.parse().unwrap_or(0)),
        _ => Tag::new(text),
    }
}

async fn send_notices<C>(client: &mut C, notices: Vec<ServerError>) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    use futures::SinkExt;
    for notice in notices {
        client
            .feed(PgWireBackendMessage::NoticeResponse(
                error_info(notice).into(),
            ))
            .await?;
    }
    Ok(())
}

fn into_response(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Rows {
            columns,
            rows,
            command,
        } => {
            let fields: Vec<FieldInfo> = columns
                .iter()
                .map(|c| field_info(c, FieldFormat::from(c.format)))
                .collect();
            let rows = rows.map(|row| {
                row.map(|r| DataRow::new(r.data, r.fields))
                    .map_err(to_pgwire)
            });
            let mut response = QueryResponse::new(Arc::new(fields), rows);
            response.set_command_tag(&command);
            Response::Query(response)
        }
        Outcome::Command(tag) => Response::Execution(tag_from(&tag)),
        Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Outcome::End(tag) => Response::TransactionEnd(Tag::new(&tag)),
        Outcome::Empty => Response::EmptyQuery,
        Outcome::CopyIn(columns) => Response::CopyIn(CopyResponse::new(
            0,
            columns.max(0) as usize,
            futures::stream::empty(),
        )),
    }
}

/// A statement prepared by a client (extended protocol): planned once, its route cached.
#[derive(Debug)]
pub struct PreparedStatement {
    /// The client's SQL.
    pub sql: String,
    /// Its plan and the topology version it was made for.
    planned: std::sync::Mutex<(u64, Planned)>,
    /// Parameter type OIDs from Parse.
    pub param_types: Vec<u32>,
    description: OnceCell<Description>,
}

/// Parses and plans statements for the extended protocol.
#[derive(Debug)]
pub struct RouterQueryParser {
    state: Arc<RouterState>,
}

fn plan_one(state: &RouterState, sql: &str) -> Result<(u64, Planned), PlanError> {
    let runtime = state.runtime();
    let mut planned = planner::plan_sql(&runtime.topology, sql)?;
    if planned.len() != 1 {
        return Err(PlanError::Syntax(
            "cannot insert multiple commands into a prepared statement".into(),
        ));
    }
    Ok((runtime.version, planned.remove(0)))
}

#[async_trait]
impl QueryParser for RouterQueryParser {
    type Statement = Arc<PreparedStatement>;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let planned = plan_one(&self.state, sql).map_err(|e| to_pgwire(e.into()))?;
        Ok(Some(Arc::new(PreparedStatement {
            sql: sql.to_string(),
            planned: std::sync::Mutex::new(planned),
            param_types: types
                .iter()
                .map(|t| t.as_ref().map(|t| t.oid()).unwrap_or(0))
                .collect(),
            description: OnceCell::new(),
        })))
    }

    fn get_parameter_types(&self, _stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        Ok(Vec::new())
    }

    fn get_result_schema(
        &self,
        _stmt: &Self::Statement,
        _format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(Vec::new())
    }
}

/// Everything one client connection needs; one per accepted socket.
pub struct ClientHandler {
    state: Arc<RouterState>,
    session: Mutex<Session>,
    parser: Arc<RouterQueryParser>,
    /// This client's BackendKeyData once registered for cancel requests.
    cancel_key: std::sync::OnceLock<(i32, Vec<u8>)>,
}

fn secret_bytes(secret: &SecretKey) -> Vec<u8> {
    match secret {
        SecretKey::I32(value) => value.to_be_bytes().to_vec(),
        SecretKey::Bytes(bytes) => bytes.to_vec(),
    }
}

impl Drop for ClientHandler {
    fn drop(&mut self) {
        if let Some((pid, secret)) = self.cancel_key.get() {
            self.state.cancels.remove(*pid, secret);
        }
    }
}

impl ClientHandler {
    /// A handler for a new connection.
    pub fn new(state: Arc<RouterState>) -> Self {
        Self {
            session: Mutex::new(Session::new(state.clone())),
            parser: Arc::new(RouterQueryParser {
                state: state.clone(),
            }),
            state,
            cancel_key: std::sync::OnceLock::new(),
        }
    }

    /// The session, registered for cancel requests under the client's BackendKeyData.
    async fn session<C: ClientInfo>(&self, client: &C) -> tokio::sync::MutexGuard<'_, Session> {
        let mut session = self.session.lock().await;
        if self.cancel_key.get().is_none() {
            let (pid, secret) = client.pid_and_secret_key();
            let secret = secret_bytes(&secret);
            session.set_cancel(self.state.cancels.session(pid, secret.clone()));
            let _ = self.cancel_key.set((pid, secret));
        }
        session
    }

    async fn describe(&self, statement: &PreparedStatement) -> PgWireResult<Description> {
        statement
            .description
            .get_or_try_init(|| async {
                // Through the session: its settings (search_path, ...) apply to name lookup.
                let mut session = self.session.lock().await;
                session
                    .describe(&statement.sql, &statement.param_types)
                    .await
                    .map_err(to_pgwire)
            })
            .await
            .cloned()
    }
}

#[async_trait]
impl SimpleQueryHandler for ClientHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let runtime = self.state.runtime();
        let mut session = self.session(client).await;
        let planned = match runtime.plan_cache.plan(&runtime.topology, query) {
            Ok(planned) => planned,
            Err(error) => {
                let error = RouterError::from(error);
                self.state
                    .metrics
                    .observe_error(&error.to_server_error().code);
                return Ok(vec![Response::Error(Box::new(error_info(
                    error.to_server_error(),
                )))]);
            }
        };
        let mut responses = Vec::with_capacity(planned.len());
        for statement in &planned {
            let result = session
                .execute(statement, &Params::default(), &[], false)
                .await;
            send_notices(client, session.take_notices()).await?;
            match result {
                Ok(outcome) => responses.push(into_response(outcome)),
                Err(error) => {
                    responses.push(Response::Error(Box::new(error_info(
                        error.to_server_error(),
                    ))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for ClientHandler {
    type Statement = Arc<PreparedStatement>;
    type QueryParser = RouterQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stored = &portal.statement;
        let statement = &stored.statement;
        // Fast path: the plan made at Parse is reused unless the topology was reloaded since.
        let planned = {
            let version = self.state.runtime().version;
            let mut cached = statement.planned.lock().expect("plan lock");
            if cached.0 != version {
                *cached = plan_one(&self.state, &statement.sql).map_err(|e| to_pgwire(e.into()))?;
            }
            cached.1.clone()
        };
        let mut types = statement.param_types.clone();
        if types.len() < portal.parameters.len() {
            types.resize(portal.parameters.len(), 0);
        }
        let params = Params {
            types,
            values: portal.parameters.clone(),
            formats: format_codes(&portal.parameter_format),
        };
        let result_formats = format_codes(&portal.result_column_format);
        let cache = !stored.id.is_empty();
        let mut session = self.session(client).await;
        let result = session
            .execute(&planned, &params, &result_formats, cache)
            .await;
        send_notices(client, session.take_notices()).await?;
        let outcome = result.map_err(to_pgwire)?;
        Ok(into_response(outcome))
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let description = self.describe(&target.statement).await?;
        let params = description.params.iter().map(|oid| pg_type(*oid)).collect();
        let fields = description
            .columns
            .unwrap_or_default()
            .iter()
            .map(|c| field_info(c, FieldFormat::Text))
            .collect();
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        target: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let description = self.describe(&target.statement.statement).await?;
        let fields = description
            .columns
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, c)| field_info(c, target.result_column_format.format_for(i)))
            .collect();
        Ok(DescribePortalResponse::new(fields))
    }
}

static PID_GENERATOR: std::sync::LazyLock<RandomPidSecretKeyGenerator> =
    std::sync::LazyLock::new(RandomPidSecretKeyGenerator::default);

/// Forwards cancel requests to the shards.
pub struct RouterCancel {
    state: Arc<RouterState>,
}

#[async_trait]
impl CancelHandler for RouterCancel {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.state
            .cancels
            .cancel(request.pid, &secret_bytes(&request.secret_key))
            .await;
    }
}

/// Accepts every user without a password (`auth.method = "trust"`).
#[derive(Debug)]
pub struct TrustStartup;

#[async_trait]
impl StartupHandler for TrustStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let PgWireFrontendMessage::Startup(ref startup) = message {
            protocol_negotiation(client, startup).await?;
            save_startup_parameters_to_metadata(client, startup);
            let (pid, secret) = PID_GENERATOR.generate(&*client);
            client.set_pid_and_secret_key(pid, secret);
            client.set_state(PgWireConnectionState::AuthenticationInProgress);
            finish_authentication(client, &server_parameters()).await?;
        }
        Ok(())
    }
}

/// Users and passwords from the config, for SCRAM-SHA-256.
#[derive(Debug)]
struct ConfigUsers {
    auth: AuthConfig,
}

const SCRAM_ITERATIONS: usize = 4096;

#[async_trait]
impl AuthSource for ConfigUsers {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        let Some(entry) = self.auth.users.iter().find(|u| u.name == user) else {
            return Err(PgWireError::InvalidPassword(user.to_string()));
        };
        let salt: [u8; 16] = rand::random();
        let salted = gen_salted_password(&entry.password, &salt, SCRAM_ITERATIONS);
        Ok(Password::new(Some(salt.to_vec()), salted))
    }
}

#[async_trait]
impl CopyHandler for ClientHandler {
    async fn on_copy_data<C>(&self, _client: &mut C, copy_data: CopyData) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.session.lock().await.copy_data(&copy_data.data).await;
        Ok(())
    }

    async fn on_copy_done<C>(&self, client: &mut C, _done: CopyDone) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use futures::SinkExt;
        let rows = self
            .session
            .lock()
            .await
            .finish_copy(None)
            .await
            .map_err(to_pgwire)?;
        client
            .send(PgWireBackendMessage::CommandComplete(
                Tag::new("COPY").with_rows(rows as usize).into(),
            ))
            .await?;
        Ok(())
    }

    async fn on_copy_fail<C>(&self, _client: &mut C, fail: CopyFail) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self
            .session
            .lock()
            .await
            .finish_copy(Some(fail.message))
            .await
        {
            Err(error) => to_pgwire(error),
            Ok(_) => to_pgwire(RouterError::session("57014", "COPY from stdin failed")),
        }
    }
}

/// The pgwire handlers of one connection.
pub struct ConnectionHandlers {
    handler: Arc<ClientHandler>,
    startup: Arc<RouterStartup>,
    cancel: Arc<RouterCancel>,
}

impl ConnectionHandlers {
    /// Handlers for a new connection.
    pub fn new(state: Arc<RouterState>, auth: AuthConfig) -> Self {
        let startup = Arc::new(RouterStartup::new(&auth));
        Self {
            cancel: Arc::new(RouterCancel {
                state: state.clone(),
            }),
            handler: Arc::new(ClientHandler::new(state)),
            startup,
        }
    }
}

impl PgWireServerHandlers for ConnectionHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }

    fn copy_handler(&self) -> Arc<impl CopyHandler> {
        self.handler.clone()
    }
}

/// Startup: trust or SCRAM-SHA-256, by configuration.
pub enum RouterStartup {
    /// No password.
    Trust(TrustStartup),
    /// SCRAM-SHA-256.
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

impl RouterStartup {
    fn new(auth: &AuthConfig) -> Self {
        match auth.method {
            AuthMethod::Trust => RouterStartup::Trust(TrustStartup),
            AuthMethod::ScramSha256 => {
                let mut scram = ScramAuth::new(Arc::new(ConfigUsers { auth: auth.clone() }));
                scram.set_iterations(SCRAM_ITERATIONS);
                RouterStartup::Scram(Box::new(
                    SASLAuthStartupHandler::new(Arc::new(server_parameters())).with_scram(scram),
                ))
            }
        }
    }
}

#[async_trait]
impl StartupHandler for RouterStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            RouterStartup::Trust(handler) => handler.on_startup(client, message).await,
            RouterStartup::Scram(handler) => handler.on_startup(client, message).await,
        }
    }
}
