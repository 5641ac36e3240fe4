//! HTTP endpoints of backups, on the instance manager's port (the operator calls them; no
//! `kubectl exec`): `POST /backups/{name}` starts a base backup, `GET /backups/{name}` reads its
//! run, `GET /backups` lists the repository, `POST /retention` applies `spec.backup.retention`,
//! `GET /archive` shows the WAL archiver.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::backup::service::BackupService;
use crate::http::Shared;

/// The backup routes (state: the shared instance state).
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/backups", get(list))
        .route("/backups/{name}", get(show).post(start))
        .route("/retention", post(retention))
        .route("/archive", get(archive))
}

fn service(shared: &Shared) -> Result<Arc<BackupService>, Box<Response>> {
    shared.backup.get().cloned().ok_or_else(|| {
        Box::new(
            (
                StatusCode::NOT_FOUND,
                "this cluster has no backup repository: set spec.backup",
            )
                .into_response(),
        )
    })
}

/// Kubernetes object names only: the name becomes a label in the repository.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

async fn start(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let service = match service(&shared) {
        Ok(service) => service,
        Err(response) => return *response,
    };
    if !valid_name(&name) {
        return (
            StatusCode::BAD_REQUEST,
            "a backup name is a Kubernetes object name (lowercase letters, digits, '-', '.')",
        )
            .into_response();
    }
    match service.start(&name) {
        Ok(run) => (StatusCode::ACCEPTED, axum::Json(run)).into_response(),
        Err(error) => (StatusCode::CONFLICT, error.to_string()).into_response(),
    }
}

async fn show(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let service = match service(&shared) {
        Ok(service) => service,
        Err(response) => return *response,
    };
    match service.get(&name) {
        Some(run) => axum::Json(run).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no backup run named {name} on this instance (it may have restarted)"),
        )
            .into_response(),
    }
}

async fn list(State(shared): State<Arc<Shared>>) -> Response {
    let service = match service(&shared) {
        Ok(service) => service,
        Err(response) => return *response,
    };
    match service.list().await {
        Ok(backups) => axum::Json(backups).into_response(),
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

async fn retention(State(shared): State<Arc<Shared>>) -> Response {
    let service = match service(&shared) {
        Ok(service) => service,
        Err(response) => return *response,
    };
    match service.apply_retention().await {
        Ok(report) => axum::Json(serde_json::json!({ "report": report })).into_response(),
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

async fn archive(State(shared): State<Arc<Shared>>) -> Response {
    match service(&shared) {
        Ok(service) => axum::Json(service.archive.status()).into_response(),
        Err(response) => *response,
    }
}
