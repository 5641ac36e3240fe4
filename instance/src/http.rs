//! HTTP endpoints: `/healthz` (the instance manager runs), `/readyz` (PostgreSQL accepts
//! connections and, on a replica, lag is within bound), `/status` (JSON), `/metrics`
//! (Prometheus). Also the small client peers use to read each other's `/status`.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::status::InstanceStatus;

/// State shared by the run loop (writer) and the HTTP handlers (readers).
pub struct Shared {
    /// The latest status.
    pub status: RwLock<InstanceStatus>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Figures read from PostgreSQL at scrape time.
    pub database: crate::database_metrics::DatabaseMetrics,
    /// Largest lag, in bytes, of a ready replica.
    pub max_lag_bytes: u64,
    /// When a call to the API server last succeeded.
    last_api_success: RwLock<Option<Instant>>,
    /// How recent that success must be for `/status` to report `apiReachable`.
    api_window: Duration,
    /// Backups, when the cluster has a backup repository or a recovery source.
    pub backup: std::sync::OnceLock<Arc<crate::backup::service::BackupService>>,
}

impl Shared {
    /// New state with the given lag bound; the API server counts as reachable while a call
    /// succeeded within `api_window`.
    pub fn new(pod: &str, max_lag_bytes: u64, api_window: Duration) -> Arc<Self> {
        Arc::new(Self {
            status: RwLock::new(InstanceStatus {
                pod: pod.to_string(),
                ..InstanceStatus::default()
            }),
            metrics: Metrics::new(),
            database: Default::default(),
            max_lag_bytes,
            last_api_success: RwLock::new(None),
            api_window,
            backup: std::sync::OnceLock::new(),
        })
    }

    /// Records a successful call to the API server.
    pub fn api_succeeded(&self) {
        if let Ok(mut last) = self.last_api_success.write() {
            *last = Some(Instant::now());
        }
    }

    /// A copy of the current status; `apiReachable` is computed now (not at the last tick), so
    /// that an instance busy with a long step does not vouch for an API server it lost.
    pub fn status(&self) -> InstanceStatus {
        let mut status = self.status.read().map(|s| s.clone()).unwrap_or_default();
        status.api_reachable = self
            .last_api_success
            .read()
            .ok()
            .and_then(|last| *last)
            .is_some_and(|at| at.elapsed() < self.api_window);
        status
    }

    /// Replaces the status and updates the metrics.
    pub fn set_status(&self, status: InstanceStatus) {
        self.metrics.update(&status);
        if let Ok(mut current) = self.status.write() {
            *current = status;
        }
    }
}

/// Whether this instance is ready to serve (`/readyz`).
pub fn is_ready(status: &InstanceStatus, max_lag_bytes: u64) -> bool {
    status.postgres_ready
        && !status.fenced
        && !status.bootstrapping
        && (status.in_recovery != Some(true) || status.lag_bytes.unwrap_or(0) <= max_lag_bytes)
}

/// The router of the endpoints.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .merge(crate::backup::http::routes())
        .with_state(shared)
}

/// The endpoints' listener: a port already taken is an error at start, not an instance manager
/// that runs without its probes and `/status`.
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(Error::io(format!(
            "binding the HTTP endpoints on {address}"
        )))
}

/// Serves the endpoints on `listener` until an accept loop error.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> Result<()> {
    axum::serve(listener, router(shared))
        .await
        .map_err(Error::io("serving the HTTP endpoints"))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if is_ready(&shared.status(), shared.max_lag_bytes) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.status()).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut text = shared.metrics.encode();
    crate::database_metrics::append_to_exposition(&mut text, &shared.database.collect().await);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Reads a peer's `/status` (HTTP/1.0, one request per connection), within `timeout`.
pub async fn peer_status(host: &str, port: u16, timeout: Duration) -> Option<InstanceStatus> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let request = format!("GET /status HTTP/1.0\r\nHost: {host}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return None;
        }
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_postgres_and_bounded_lag() {
        let mut status = InstanceStatus {
            postgres_ready: true,
            in_recovery: Some(true),
            lag_bytes: Some(10),
            ..InstanceStatus::default()
        };
        assert!(is_ready(&status, 100));
        status.lag_bytes = Some(1000);
        assert!(!is_ready(&status, 100));
        status.in_recovery = Some(false);
        assert!(is_ready(&status, 100));
        status.fenced = true;
        assert!(!is_ready(&status, 100));
        // A new cluster's primary is ready once its application role and database exist.
        status.fenced = false;
        status.bootstrapping = true;
        assert!(!is_ready(&status, 100));
    }
}
