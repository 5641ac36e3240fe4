//! `pg-instance pooler-exporter`: the Pooler pods' metrics. A second container of each PgBouncer
//! pod (the PgBouncer image has only a shell and PgBouncer) that reads PgBouncer's admin console
//! at every scrape (`SHOW STATS`, `POOLS`, `DATABASES`, `LISTS`, `CONFIG`, `CLIENTS`,
//! `VERSION`) and serves them on `/metrics` under prometheus-community/pgbouncer_exporter's names
//! ([`families`]). `/healthz` answers while the exporter runs, whether PgBouncer does or not
//! (`pgbouncer_up` says that), so the exporter never takes the pod out of its Service.
//!
//! It logs in as the pooler auth user (the Pooler's pgbouncer.ini lists it in `admin_users` and
//! `stats_users`) with the password of the mounted auth Secret, read again at every scrape so a
//! rotated Secret is picked up. One connection per scrape: a restarted PgBouncer is simply
//! reached again, and nothing is held open between scrapes.

pub mod families;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use api::contract;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::config::SslMode;

use crate::error::{Error, Result};
use families::{Console, Table};

/// The first argument of `pg-instance` that runs the exporter instead of the instance manager.
pub const SUBCOMMAND: &str = "pooler-exporter";

/// The Pooler pods' metrics exporter: PgBouncer's admin console on `/metrics`.
#[derive(Parser, Debug, Clone)]
#[command(name = "pg-instance pooler-exporter", version, about)]
pub struct ExporterConfig {
    /// Address of the HTTP endpoints (`/metrics`, `/healthz`).
    #[arg(long, env = "POOLER_METRICS_ADDRESS", default_value_t = SocketAddr::from(([0, 0, 0, 0], contract::POOLER_METRICS_PORT)))]
    pub listen: SocketAddr,
    /// PgBouncer's host: an address, or the folder of its Unix socket (a path starting with `/`).
    #[arg(long, env = "PGBOUNCER_HOST", default_value = "127.0.0.1")]
    pub pgbouncer_host: String,
    /// PgBouncer's port (also names its Unix socket `.s.PGSQL.<port>`).
    #[arg(long, env = "PGBOUNCER_PORT", default_value_t = contract::POSTGRES_PORT)]
    pub pgbouncer_port: u16,
    /// User of the admin console: one of PgBouncer's `admin_users` or `stats_users`.
    #[arg(long, env = "PGBOUNCER_USER", default_value = contract::POOLER_AUTH_USER)]
    pub user: String,
    /// File holding that user's password (read at every scrape); none for a login without one.
    #[arg(long, env = "PGBOUNCER_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// CA file to verify PgBouncer's certificate with, when PgBouncer takes TLS clients only
    /// (a Pooler's default with the cluster's TLS on): the exporter then logs in over TLS.
    #[arg(long, env = "PGBOUNCER_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Name PgBouncer's certificate must carry (the Pooler's Service name), with `--tls-ca-file`.
    #[arg(long, env = "PGBOUNCER_TLS_SERVER_NAME", default_value = "localhost")]
    pub tls_server_name: String,
    /// Deadline of one scrape of the admin console, in milliseconds; past it `pgbouncer_up` is 0.
    #[arg(long, env = "METRICS_TIMEOUT_MILLIS", default_value_t = 3000)]
    pub timeout_millis: u64,
    /// Log filter, in the syntax of RUST_LOG.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Logs as JSON lines (the operator sets it in pods), text otherwise.
    #[arg(long, env = contract::env::LOG_JSON, default_value_t = false)]
    pub log_json: bool,
}

/// The admin console commands of one scrape, in order.
const COMMANDS: &[&str] = &[
    "SHOW VERSION",
    "SHOW STATS",
    "SHOW POOLS",
    "SHOW DATABASES",
    "SHOW LISTS",
    "SHOW CONFIG",
    "SHOW CLIENTS",
];

/// Reads PgBouncer's admin console and renders the exposition.
pub struct Exporter {
    config: ExporterConfig,
    /// Whether the last scrape reached PgBouncer: a change is logged once, not every scrape.
    last_up: AtomicBool,
}

impl Exporter {
    /// An exporter with `config`.
    pub fn new(config: ExporterConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            last_up: AtomicBool::new(true),
        })
    }

    /// One scrape: the OpenMetrics text, `# EOF` included. Never fails: an unreachable or slow
    /// PgBouncer gives `pgbouncer_up 0`.
    pub async fn scrape(&self) -> String {
        let timeout = Duration::from_millis(self.config.timeout_millis.max(1));
        let presented = pgtls::PresentedCertificate::default();
        let mut console = match tokio::time::timeout(timeout, self.read_console(&presented)).await {
            Ok(Ok(console)) => console,
            Ok(Err(problem)) => {
                self.note_down(&problem);
                Console::default()
            }
            Err(_) => {
                self.note_down(&format!(
                    "the admin console did not answer in {} ms",
                    timeout.as_millis()
                ));
                Console::default()
            }
        };
        if console.complete() && !self.last_up.swap(true, Ordering::Relaxed) {
            tracing::info!(
                host = %self.config.pgbouncer_host,
                port = self.config.pgbouncer_port,
                "PgBouncer's admin console answers again"
            );
        }
        console.certificates = self.certificates(&presented).await;
        let mut text = families::render(&console).encode();
        text.push_str("# EOF\n");
        text
    }

    fn note_down(&self, problem: &str) {
        if self.last_up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                host = %self.config.pgbouncer_host,
                port = self.config.pgbouncer_port,
                problem,
                "PgBouncer's admin console cannot be read; pgbouncer_up is 0"
            );
        } else {
            tracing::debug!(problem, "PgBouncer's admin console still cannot be read");
        }
    }

    /// With TLS: the validity of the certificate PgBouncer presented at this scrape's handshake
    /// (what its clients see) and of the latest CA of the bundle the exporter trusts.
    async fn certificates(
        &self,
        presented: &pgtls::PresentedCertificate,
    ) -> Vec<crate::tls::CertificateValidity> {
        let Some(ca_file) = &self.config.tls_ca_file else {
            return Vec::new();
        };
        let ca = tokio::fs::read(ca_file)
            .await
            .ok()
            .and_then(|pem| crate::tls::bundle_validity(&pem));
        let server = presented
            .get()
            .and_then(|der| crate::tls::der_validity(&der));
        [("server", server), ("ca", ca)]
            .into_iter()
            .filter_map(|(certificate, validity)| {
                let (not_before, not_after) = validity?;
                Some(crate::tls::CertificateValidity {
                    certificate: certificate.to_string(),
                    not_before,
                    not_after,
                })
            })
            .collect()
    }

    /// Logs in and runs [`COMMANDS`]; a command that fails leaves its table out. The
    /// certificate PgBouncer presents is kept in `presented`.
    async fn read_console(
        &self,
        presented: &pgtls::PresentedCertificate,
    ) -> std::result::Result<Console, String> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.config.pgbouncer_host)
            .port(self.config.pgbouncer_port)
            .user(&self.config.user)
            .dbname("pgbouncer")
            .application_name("pg-instance-pooler-exporter");
        if let Some(path) = &self.config.password_file {
            let text = tokio::fs::read_to_string(path).await.map_err(|error| {
                format!("reading the password file {}: {error}", path.display())
            })?;
            config.password(text.trim_end_matches(['\n', '\r']));
        }
        let tls = self
            .config
            .tls_ca_file
            .as_deref()
            .map(|ca_file| (ca_file, self.config.tls_server_name.as_str()));
        let (client, connection) =
            super::client::connect(&mut config, tls, SslMode::Prefer, Some(presented)).await?;
        let mut tables = Vec::with_capacity(COMMANDS.len());
        for command in COMMANDS {
            let table = match client.simple_query(command).await {
                Ok(messages) => Some(table(&messages)),
                Err(error) => {
                    tracing::debug!(command, error = %super::client::describe(&error), "admin console command failed");
                    None
                }
            };
            tables.push(table);
        }
        drop(client);
        let _ = connection.await;
        let mut tables = tables.into_iter();
        let mut next = || tables.next().flatten();
        Ok(Console {
            version: next(),
            stats: next(),
            pools: next(),
            databases: next(),
            lists: next(),
            config: next(),
            clients: next(),
            certificates: Vec::new(),
        })
    }
}

/// The rows of one simple-protocol answer as a [`Table`].
fn table(messages: &[SimpleQueryMessage]) -> Table {
    let mut table = Table::default();
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                table.columns = columns.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                if table.columns.is_empty() {
                    table.columns = row.columns().iter().map(|c| c.name().to_string()).collect();
                }
                table.rows.push(
                    (0..row.len())
                        .map(|index| row.get(index).map(str::to_string))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    table
}

/// The endpoints: `/metrics` (a scrape of the admin console) and `/healthz`.
pub fn router(exporter: Arc<Exporter>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(exporter)
}

async fn metrics(State(exporter): State<Arc<Exporter>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        exporter.scrape().await,
    )
        .into_response()
}

/// Serves the endpoints on `config.listen` until the process ends.
pub async fn run(config: ExporterConfig) -> Result<()> {
    let address = config.listen;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(Error::io(format!(
            "binding the pooler exporter on {address}"
        )))?;
    tracing::info!(%address, pgbouncer_host = %config.pgbouncer_host, pgbouncer_port = config.pgbouncer_port, "pooler exporter serving /metrics");
    axum::serve(listener, router(Exporter::new(config)))
        .await
        .map_err(Error::io("serving the pooler exporter"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_reach_the_pooler_pods_pgbouncer_as_the_auth_user() {
        let config = ExporterConfig::parse_from(["pooler-exporter"]);
        assert_eq!(config.listen.port(), contract::POOLER_METRICS_PORT);
        assert_eq!(config.pgbouncer_host, "127.0.0.1");
        assert_eq!(config.pgbouncer_port, contract::POSTGRES_PORT);
        assert_eq!(config.user, contract::POOLER_AUTH_USER);
        let config = ExporterConfig::parse_from([
            "pooler-exporter",
            "--pgbouncer-port",
            "6432",
            "--password-file",
            "/etc/pgbouncer/auth/password",
        ]);
        assert_eq!(config.pgbouncer_port, 6432);
        assert_eq!(
            config.password_file,
            Some(PathBuf::from("/etc/pgbouncer/auth/password"))
        );
    }
}
