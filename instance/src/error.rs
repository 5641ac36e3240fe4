//! Errors of the instance manager.

/// What went wrong, on which object, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed ({what}): {source}")]
    Kube {
        /// The call and its object.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A Kubernetes API call did not answer in time.
    #[error("Kubernetes API call timed out ({0}); is the API server reachable?")]
    KubeTimeout(String),
    /// A query to the local PostgreSQL failed.
    #[error("PostgreSQL query failed ({what}): {}", describe_postgres(source))]
    Postgres {
        /// The query's purpose.
        what: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A PostgreSQL program (initdb, pg_basebackup, pg_rewind, ...) failed.
    #[error("{program} failed ({status}); its output:\n{output}")]
    Program {
        /// Program name.
        program: String,
        /// Exit status.
        status: String,
        /// Its standard output and error (never holds a password: passwords go through files).
        output: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done, on which path.
        what: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// Something in the configuration or in the cluster's objects is wrong.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// Wraps a PostgreSQL error with the query's purpose.
    pub fn postgres(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let what = what.into();
        move |source| Error::Postgres { what, source }
    }

    /// Wraps a Kubernetes error with the call's description.
    pub fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Kube { what, source }
    }

    /// Whether this is an optimistic-concurrency conflict (HTTP 409).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(status), .. } if status.code == 409)
    }
}

/// A driver error with what PostgreSQL said (SQLSTATE and message) or why the connection failed:
/// the driver's own text is only "db error" for an error the server sent.
pub fn describe_postgres(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("SQLSTATE {}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    }
}

/// Result of the instance manager's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_driver_error_says_why_the_connection_failed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let error = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=nobody connect_timeout=2"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("nothing listens there");
        let text = Error::postgres("connecting")(error).to_string();
        assert!(
            text.starts_with("PostgreSQL query failed (connecting): error connecting to server: ")
                && text.contains("Connection refused"),
            "{text}"
        );
    }
}
