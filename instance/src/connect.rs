//! Connecting to PostgreSQL (plain, as to the local server's socket) with the whole handshake
//! bounded. tokio-postgres's `connect_timeout` covers only the socket's connect: a server that
//! accepts and then does not answer the startup message would hold the caller for good (the run
//! loop past its Lease's renew deadline, so that the watchdog fences a healthy primary; a
//! declarative reconcile or a scrape that never ends).

use std::time::Duration;

/// Why a bounded connect failed.
#[derive(Debug)]
pub enum ConnectError {
    /// No answer to the startup within the limit.
    TimedOut(Duration),
    /// The driver's or the server's error.
    Postgres(tokio_postgres::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::TimedOut(limit) => {
                write!(f, "no answer to the startup in {} s", limit.as_secs_f64())
            }
            ConnectError::Postgres(error) => f.write_str(&crate::error::describe_postgres(error)),
        }
    }
}

/// Connects with `config` without TLS, the startup included within `limit`; the connection's
/// task is spawned.
pub async fn connect_within(
    config: &tokio_postgres::Config,
    limit: Duration,
) -> Result<tokio_postgres::Client, ConnectError> {
    let (client, connection) = tokio::time::timeout(limit, config.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| ConnectError::TimedOut(limit))?
        .map_err(ConnectError::Postgres)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts the connection and never answers the startup message: the
    /// connect gives up at its limit instead of holding the caller forever.
    #[tokio::test]
    async fn a_silent_server_does_not_hold_the_connect() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(".s.PGSQL.5432");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            // Keep the connection open without a word.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(stream);
        });
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(dir.path())
            .port(5432)
            .user("postgres")
            .connect_timeout(Duration::from_secs(1));
        let outcome = tokio::time::timeout(
            Duration::from_secs(20),
            connect_within(&config, Duration::from_millis(300)),
        )
        .await
        .expect("the connect must give up on its own");
        let error = outcome.expect_err("a silent server is an error");
        assert!(matches!(error, ConnectError::TimedOut(_)), "{error}");
        assert_eq!(error.to_string(), "no answer to the startup in 0.3 s");
        silent.abort();
    }
}
