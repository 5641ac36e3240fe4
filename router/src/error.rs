//! The router's error type and its mapping to a PostgreSQL ErrorResponse.

use crate::backend::connection::BackendError;
use crate::plan::PlanError;
use crate::protocol::messages::ServerError;

/// Anything that makes a statement fail.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The statement cannot be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A shard failed or answered with an error.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A session-level rule was broken (aborted transaction, bad parameter, ...).
    #[error("{message}")]
    Session {
        /// SQLSTATE.
        code: &'static str,
        /// Message.
        message: String,
    },
}

impl RouterError {
    /// A session error.
    pub fn session(code: &'static str, message: impl Into<String>) -> Self {
        RouterError::Session {
            code,
            message: message.into(),
        }
    }

    /// The error as the client sees it: a shard's own error passes through unchanged.
    pub fn to_server_error(&self) -> ServerError {
        match self {
            RouterError::Backend(BackendError::Server { error, .. }) => {
                let mut error = (**error).clone();
                if error.severity == "FATAL" || error.severity == "PANIC" {
                    // A shard's fatal error ends that backend connection, not the client's.
                    error.severity = "ERROR".into();
                }
                error
            }
            RouterError::Backend(other) => ServerError {
                severity: "ERROR".into(),
                // connection_failure: the shard is down or unreachable.
                code: "08006".into(),
                message: other.to_string(),
                hint: Some("the router stays up; retry when the shard is back".into()),
                ..ServerError::default()
            },
            RouterError::Plan(plan) => ServerError {
                severity: "ERROR".into(),
                code: plan.sqlstate().into(),
                message: plan.to_string(),
                position: plan.position().map(|position| position.to_string()),
                ..ServerError::default()
            },
            RouterError::Session { code, message } => ServerError {
                severity: "ERROR".into(),
                code: (*code).into(),
                message: message.clone(),
                ..ServerError::default()
            },
        }
    }
}
