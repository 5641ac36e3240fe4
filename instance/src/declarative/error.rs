//! Errors of the declarative reconcilers, one variant per stage, each with the condition reason
//! it shows on the object.

/// What failed while reconciling a PostgresUser or PostgresDatabase.
#[derive(Debug, thiserror::Error)]
pub enum DeclarativeError {
    /// The spec cannot be applied as written (the message says what to change).
    #[error("{0}")]
    Invalid(String),
    /// A Secret is missing or lacks a key.
    #[error("{0}")]
    Secret(String),
    /// PostgreSQL refused a statement: its SQLSTATE and message, verbatim.
    #[error("{what}: SQLSTATE {sqlstate}: {message}")]
    Sql {
        /// The statement's summary (no secret).
        what: String,
        /// SQLSTATE code, for example `42501`.
        sqlstate: String,
        /// PostgreSQL's message (and detail or hint, when it gave one).
        message: String,
    },
    /// The local PostgreSQL could not be reached.
    #[error("connecting to PostgreSQL (database {database}): {message}")]
    Connect {
        /// Database.
        database: String,
        /// Driver message.
        message: String,
    },
    /// Deleting is refused until something changes (the message says what).
    #[error("{0}")]
    DeleteRefused(String),
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed ({what}): {source}")]
    Kube {
        /// The call.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A create-only field differs from the database that exists.
    #[error("{0}")]
    Immutable(String),
    /// The cluster is a replica cluster: read-only until it is promoted.
    #[error("{0}")]
    ReplicaCluster(String),
}

impl DeclarativeError {
    /// The condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            DeclarativeError::Invalid(_) => "InvalidSpec",
            DeclarativeError::Secret(_) => "SecretProblem",
            DeclarativeError::Sql { .. } => "SqlError",
            DeclarativeError::Connect { .. } => "PostgresUnreachable",
            DeclarativeError::DeleteRefused(_) => "DeleteRefused",
            DeclarativeError::Kube { .. } => "KubernetesError",
            DeclarativeError::Immutable(_) => "CreateOnlyFieldChanged",
            DeclarativeError::ReplicaCluster(_) => "ReplicaCluster",
        }
    }

    /// Whether retrying without a change to the object (or its Secret, or the cluster: a
    /// replica cluster's promotion restarts its instances, which reconcile again) cannot help
    /// soon.
    pub fn needs_change(&self) -> bool {
        matches!(
            self,
            DeclarativeError::Invalid(_)
                | DeclarativeError::Immutable(_)
                | DeclarativeError::ReplicaCluster(_)
        )
    }

    /// Wraps a driver error of `what`, keeping PostgreSQL's SQLSTATE and message.
    pub fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let what = what.into();
        move |error| match error.as_db_error() {
            Some(db) => {
                let mut message = db.message().to_string();
                if let Some(detail) = db.detail() {
                    message.push_str(&format!(" (DETAIL: {detail})"));
                }
                if let Some(hint) = db.hint() {
                    message.push_str(&format!(" (HINT: {hint})"));
                }
                DeclarativeError::Sql {
                    what,
                    sqlstate: db.code().code().to_string(),
                    message,
                }
            }
            None => DeclarativeError::Sql {
                what,
                sqlstate: "08006".to_string(),
                message: error.to_string(),
            },
        }
    }

    /// Wraps a Kubernetes error.
    pub fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| DeclarativeError::Kube { what, source }
    }
}

/// Result of the declarative reconcilers.
pub type Result<T, E = DeclarativeError> = std::result::Result<T, E>;
