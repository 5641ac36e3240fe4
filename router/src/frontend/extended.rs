//! The extended query protocol: Parse, Bind, Describe, Execute, Close and Sync. A statement is
//! planned once at Parse and planned again only when the topology changed since; a portal run
//! with a row limit keeps its remaining rows and is resumed by the next Execute. A portal's
//! Describe waits for the Execute that follows it, which answers it with the result's own
//! columns, so the unnamed-statement cycle costs one shard round trip.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::connection::{Description, Header};
use crate::error::RouterError;
use crate::plan::{self, PlanError, Planned};
use crate::protocol::messages::Params;

use super::{
    Closed, Connection, Running, forward, plan_one, session_error, topology_after_column_error,
    wire,
};

/// A prepared statement (extended protocol): planned once, its route cached.
pub(super) struct Statement {
    /// Statement name (empty: unnamed; named ones are also prepared on the shards).
    pub(super) name: String,
    /// The client's SQL (what shards describe and what a re-plan starts from).
    pub(super) sql: String,
    /// Its plan and the topology version it was made for.
    pub(super) planned: Mutex<(u64, Arc<Planned>)>,
    /// Parameter type OIDs from Parse.
    pub(super) param_types: Vec<u32>,
    /// Parameter types and columns, from a shard, on the first Describe.
    pub(super) description: OnceLock<Description>,
}

/// A bound statement; a running one holds its remaining rows.
pub(super) struct Portal {
    pub(super) statement: Arc<Statement>,
    // Shared, not owned: every Execute hands them to the session while the portal stays
    // borrowable, and a clone of the values themselves would allocate per Execute.
    pub(super) params: Arc<Params>,
    pub(super) result_formats: Arc<[i16]>,
    pub(super) running: Option<Running>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(super) async fn parse(&mut self, body: Bytes) {
        let message = match wire::parse(body) {
            Ok(message) => message,
            Err(violation) => return self.extended_error(session_error("08P01", violation.0)),
        };
        if !message.name.is_empty() && self.statements.contains_key(&message.name) {
            return self.extended_error(session_error(
                "42P05",
                format!("prepared statement \"{}\" already exists", message.name),
            ));
        }
        let mut planned = plan_one(&self.frontend.state, &message.sql);
        if let Err(PlanError::Column(_)) = planned
            && let Some(topology) =
                topology_after_column_error(&self.frontend.state, self.session.in_transaction())
                    .await
        {
            planned = plan::plan_sql(&topology, &message.sql).and_then(|mut planned| {
                if planned.len() != 1 {
                    return Err(PlanError::Syntax(
                        "cannot insert multiple commands into a prepared statement".into(),
                    ));
                }
                Ok((
                    self.frontend.state.runtime().version,
                    Arc::new(planned.remove(0)),
                ))
            });
        }
        match planned {
            Ok(planned) => {
                let statement = Statement {
                    name: message.name.clone(),
                    sql: message.sql,
                    planned: Mutex::new(planned),
                    param_types: message.param_types,
                    description: OnceLock::new(),
                };
                self.statements.insert(message.name, Arc::new(statement));
                wire::empty(&mut self.output, b'1');
            }
            Err(error) => self.plan_failed(error, true),
        }
    }

    pub(super) fn statement(&self, name: &str) -> Result<Arc<Statement>, RouterError> {
        self.statements.get(name).cloned().ok_or_else(|| {
            if name.is_empty() {
                session_error("26000", "unnamed prepared statement does not exist")
            } else {
                session_error(
                    "26000",
                    format!("prepared statement \"{name}\" does not exist"),
                )
            }
        })
    }

    pub(super) fn bind(&mut self, body: Bytes) {
        let message = match wire::bind(body) {
            Ok(message) => message,
            Err(violation) => return self.extended_error(session_error("08P01", violation.0)),
        };
        let statement = match self.statement(&message.statement) {
            Ok(statement) => statement,
            Err(error) => return self.extended_error(error),
        };
        if !message.portal.is_empty() && self.portals.contains_key(&message.portal) {
            return self.extended_error(session_error(
                "42P03",
                format!("portal \"{}\" already exists", message.portal),
            ));
        }
        let mut types = statement.param_types.clone();
        types.resize(message.params.len().max(types.len()), 0);
        let portal = Portal {
            statement,
            params: Arc::new(Params {
                types,
                values: message.params,
                formats: message.param_formats,
            }),
            result_formats: message.result_formats.into(),
            running: None,
        };
        self.portals.insert(message.portal, portal);
        wire::empty(&mut self.output, b'2');
    }

    /// The statement's description from a shard (once per statement).
    pub(super) async fn description(
        &mut self,
        statement: &Statement,
    ) -> Result<Description, RouterError> {
        if let Some(description) = statement.description.get() {
            return Ok(description.clone());
        }
        // Through the session: its settings (search_path, ...) apply to name lookup.
        let description = self
            .session
            .describe(&statement.sql, &statement.param_types)
            .await?;
        let _ = statement.description.set(description.clone());
        Ok(description)
    }

    pub(super) async fn describe(&mut self, body: Bytes) {
        let (kind, name) = match wire::target(body) {
            Ok(target) => target,
            Err(violation) => return self.extended_error(session_error("08P01", violation.0)),
        };
        if kind == b'P' {
            match self.portals.get(&name) {
                None => self.extended_error(session_error(
                    "34000",
                    format!("portal \"{name}\" does not exist"),
                )),
                // Answered by the Execute that should follow, or before the next other message.
                Some(_) => self.pending_describe = Some(name),
            }
            return;
        }
        let statement = match self.statement(&name) {
            Ok(statement) => statement,
            Err(error) => return self.extended_error(error),
        };
        match self.description(&statement).await {
            Ok(description) => {
                wire::parameter_description(&mut self.output, &description.params);
                match &description.columns {
                    Some(columns) => wire::row_description(&mut self.output, columns, Some(&[])),
                    None => wire::empty(&mut self.output, b'n'),
                }
            }
            Err(error) => self.extended_error(error),
        }
    }

    /// A portal Describe not followed by its Execute: describe it on a shard.
    pub(super) async fn answer_pending_describe(&mut self) {
        let Some(name) = self.pending_describe.take() else {
            return;
        };
        let Some((statement, formats)) = self
            .portals
            .get(&name)
            .map(|p| (p.statement.clone(), p.result_formats.clone()))
        else {
            return;
        };
        match self.description(&statement).await {
            Ok(description) => match &description.columns {
                Some(columns) => wire::row_description(&mut self.output, columns, Some(&formats)),
                None => wire::empty(&mut self.output, b'n'),
            },
            Err(error) => self.extended_error(error),
        }
    }

    pub(super) async fn execute(&mut self, body: Bytes) -> Result<(), Closed> {
        let (name, max_rows) = match wire::execute(body) {
            Ok(message) => message,
            Err(violation) => {
                self.answer_pending_describe().await;
                self.extended_error(session_error("08P01", violation.0));
                return Ok(());
            }
        };
        if self.pending_describe.as_deref() != Some(name.as_str()) {
            self.answer_pending_describe().await;
            if self.skip_to_sync {
                return Ok(());
            }
        }
        let describe = self.pending_describe.take().is_some();
        let Some(portal) = self.portals.get_mut(&name) else {
            self.extended_error(session_error(
                "34000",
                format!("portal \"{name}\" does not exist"),
            ));
            return Ok(());
        };
        if let Some(running) = portal.running.take() {
            return match self.stream_rows(running, max_rows).await? {
                Ok(rest) => {
                    if let Some(portal) = self.portals.get_mut(&name) {
                        portal.running = rest;
                    }
                    Ok(())
                }
                Err(error) => {
                    self.extended_error(error);
                    Ok(())
                }
            };
        }
        let statement = portal.statement.clone();
        let params = portal.params.clone();
        let result_formats = portal.result_formats.clone();
        // Fast path: the plan made at Parse is reused unless the topology was reloaded since.
        let planned = {
            let version = self.frontend.state.runtime().version;
            let mut cached = statement.planned.lock().expect("plan lock");
            if cached.0 != version {
                match plan_one(&self.frontend.state, &statement.sql) {
                    Ok(planned) => *cached = planned,
                    Err(error) => {
                        drop(cached);
                        self.extended_error(error.into());
                        return Ok(());
                    }
                }
            }
            cached.1.clone()
        };
        let cache = !statement.name.is_empty();
        if max_rows == 0 {
            // A portal read to the end in one Execute: the shard's answer can be forwarded.
            let forwarded = self
                .forward(&forward::Forwarding {
                    statement: &planned,
                    params: &params,
                    result_formats: &result_formats,
                    cache,
                    auto_prepared: None,
                    header: if describe {
                        Header::Always
                    } else {
                        Header::None
                    },
                    extended: true,
                })
                .await?;
            if let forward::Forward::Done = forwarded {
                return Ok(());
            }
        }
        let result = self
            .session
            .execute(&planned, &params, &result_formats, cache)
            .await;
        self.send_notices();
        self.describing_portal = describe;
        let sent = match result {
            Ok(outcome) => self.send_outcome(outcome, describe, max_rows).await,
            Err(error) => Ok(Err(error)),
        };
        self.describing_portal = false;
        match sent? {
            Ok(rest) => {
                if let Some(portal) = self.portals.get_mut(&name) {
                    portal.running = rest;
                }
            }
            Err(error) => self.extended_error(error),
        }
        Ok(())
    }

    pub(super) fn close(&mut self, body: Bytes) {
        match wire::target(body) {
            Ok((b'S', name)) => {
                self.statements.remove(&name);
            }
            Ok((_, name)) => {
                self.portals.remove(&name);
            }
            Err(violation) => return self.extended_error(session_error("08P01", violation.0)),
        }
        wire::empty(&mut self.output, b'3');
    }

    pub(super) async fn sync(&mut self) -> Result<(), Closed> {
        self.skip_to_sync = false;
        // Portals live until their transaction ends; outside one, that is now.
        if !self.session.in_transaction() {
            self.portals.clear();
        }
        let status = self.transaction_status();
        wire::ready_for_query(&mut self.output, status);
        self.flush().await?;
        Ok(())
    }
}
