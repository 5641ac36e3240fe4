//! Figures read from PostgreSQL when `/metrics` is scraped: the built-in queries ([`builtin`])
//! and the user's queries from a file in postgres_exporter's queries.yaml format ([`custom`]).
//!
//! A scrape never waits longer than the configured timeout for PostgreSQL: every statement runs
//! under that deadline (and under a server-side `statement_timeout`); a statement that misses it
//! is cancelled, and it and the queries after it are reported in
//! `pg_instance_scrape_query_errors{query}` while the rest of `/metrics` is served. A failing
//! query is a metric and a log line, never a failed scrape.

pub mod builtin;
pub mod custom;
pub mod exposition;
pub mod query;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::warn;

use crate::connect::connect_within;
use exposition::{Exposition, MetricType};
use query::Query;

/// Default deadline of the database part of a scrape.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where and how to read the figures.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Connection to the local PostgreSQL (its `options` are replaced by the timeouts).
    pub connection: tokio_postgres::Config,
    /// Deadline of the database part of one scrape.
    pub timeout: Duration,
    /// File of user-defined queries (postgres_exporter's queries.yaml format), re-read when it
    /// changes (a mounted ConfigMap).
    pub custom_queries: Option<PathBuf>,
}

/// The collector; one per instance manager, shared by concurrent scrapes (they take turns on one
/// connection, each within its own deadline).
pub struct DatabaseMetrics {
    settings: Mutex<Option<Settings>>,
    client: tokio::sync::Mutex<Option<Client>>,
    custom: Mutex<custom::CustomQueries>,
    builtin: Vec<Query>,
}

impl Default for DatabaseMetrics {
    fn default() -> Self {
        Self {
            settings: Mutex::new(None),
            client: tokio::sync::Mutex::new(None),
            custom: Mutex::new(custom::CustomQueries::default()),
            builtin: builtin::queries(),
        }
    }
}

/// Why a query gave no figures.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error("timed out (scrape deadline)")]
    Timeout,
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl DatabaseMetrics {
    /// Starts reading from PostgreSQL (until then [`collect`](Self::collect) returns nothing).
    pub fn configure(&self, mut settings: Settings) {
        let millis = settings.timeout.as_millis().max(1);
        settings
            .connection
            .application_name("pg-instance-metrics")
            .connect_timeout(settings.timeout)
            .options(format!(
                "-c statement_timeout={millis} -c lock_timeout={millis} -c default_transaction_read_only=on"
            ));
        if let Ok(mut custom) = self.custom.lock() {
            custom.set_path(settings.custom_queries.clone());
        }
        if let Ok(mut current) = self.settings.lock() {
            *current = Some(settings);
        }
    }

    /// Reads every figure within the deadline; OpenMetrics text without `# EOF`.
    pub async fn collect(&self) -> String {
        let Some(settings) = self.settings.lock().ok().and_then(|s| s.clone()) else {
            return String::new();
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + settings.timeout);
        let mut exposition = Exposition::default();
        let (custom_queries, custom_error) = match self.custom.lock() {
            Ok(mut custom) => custom.refresh(),
            Err(_) => (Vec::new(), None),
        };
        exposition.add(
            "pg_instance_custom_queries_config_error",
            "1 when the file of user-defined queries cannot be read or parsed (see the log)",
            MetricType::Gauge,
            vec![],
            f64::from(u8::from(custom_error.is_some())),
        );
        let queries: Vec<&Query> = self.builtin.iter().chain(custom_queries.iter()).collect();

        let up = self
            .read_all(&settings, &queries, deadline, &mut exposition)
            .await;
        exposition.add(
            "pg_up",
            "1 when the instance manager could connect to PostgreSQL for this scrape",
            MetricType::Gauge,
            vec![],
            f64::from(u8::from(up)),
        );
        exposition.add(
            "pg_instance_scrape_duration_seconds",
            "Time the database part of this scrape took",
            MetricType::Gauge,
            vec![],
            started.elapsed().as_secs_f64(),
        );
        exposition.encode()
    }

    /// Runs the queries on the cached connection (connecting first when needed); returns whether
    /// PostgreSQL was reachable.
    async fn read_all(
        &self,
        settings: &Settings,
        queries: &[&Query],
        deadline: tokio::time::Instant,
        exposition: &mut Exposition,
    ) -> bool {
        let report = |exposition: &mut Exposition, query: &Query, failed: bool| {
            exposition.add(
                "pg_instance_scrape_query_errors",
                "1 when the query failed or timed out in this scrape (the log says why)",
                MetricType::Gauge,
                vec![("query".to_string(), query.name.clone())],
                f64::from(u8::from(failed)),
            );
        };
        let fail_all = |exposition: &mut Exposition| {
            for query in queries {
                report(exposition, query, true);
            }
        };
        let Ok(mut client) = tokio::time::timeout_at(deadline, self.client.lock()).await else {
            warn!("metrics: an earlier scrape still holds the connection past this deadline");
            fail_all(exposition);
            return false;
        };
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = None;
            let limit = deadline.saturating_duration_since(tokio::time::Instant::now());
            match connect_within(&settings.connection, limit).await {
                Ok(new_client) => *client = Some(new_client),
                Err(error) => {
                    warn!(%error, "metrics: cannot connect to PostgreSQL");
                    fail_all(exposition);
                    return false;
                }
            }
        }
        let Some(connected) = client.as_ref() else {
            return false;
        };
        let mut timed_out = false;
        for query in queries {
            if timed_out {
                report(exposition, query, true);
                continue;
            }
            match run(connected, query, deadline, exposition).await {
                Ok(()) => report(exposition, query, false),
                Err(error) => {
                    warn!(query = %query.name, %error, "metrics: query failed");
                    report(exposition, query, true);
                    if matches!(error, QueryError::Timeout) {
                        timed_out = true;
                    }
                }
            }
        }
        if timed_out {
            // The statement may still run: cancel it, and start the next scrape afresh.
            let cancel = connected.cancel_token();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    cancel.cancel_query(tokio_postgres::NoTls),
                )
                .await;
            });
            *client = None;
        }
        true
    }
}

/// Runs one query (after its condition) and adds its rows.
async fn run(
    client: &Client,
    query: &Query,
    deadline: tokio::time::Instant,
    exposition: &mut Exposition,
) -> Result<(), QueryError> {
    if let Some(condition) = &query.requires {
        let rows = tokio::time::timeout_at(deadline, client.simple_query(condition))
            .await
            .map_err(|_| QueryError::Timeout)??;
        let holds = rows.iter().any(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
            _ => false,
        });
        if !holds {
            return Ok(());
        }
    }
    let messages = tokio::time::timeout_at(deadline, client.simple_query(&query.sql))
        .await
        .map_err(|_| QueryError::Timeout)??;
    for message in &messages {
        if let SimpleQueryMessage::Row(row) = message {
            query.add_row(row, exposition);
        }
    }
    Ok(())
}

/// Appends `database` (families without `# EOF`) to the OpenMetrics text of the instance
/// manager's registry, keeping one `# EOF` at the end.
pub fn append_to_exposition(registry_text: &mut String, database: &str) {
    if let Some(stripped) = registry_text.strip_suffix("# EOF\n") {
        registry_text.truncate(stripped.len());
    }
    registry_text.push_str(database);
    registry_text.push_str("# EOF\n");
}

/// Connection settings of the local PostgreSQL through its Unix socket.
pub fn local_connection(
    socket_dir: &std::path::Path,
    port: u16,
    user: &str,
) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(socket_dir)
        .port(port)
        .user(user)
        .dbname("postgres");
    config
}
