//! Connections to the local PostgreSQL as the superuser (any database) and running a plan in
//! one transaction.

use std::time::Duration;

use super::error::{DeclarativeError, Result};
use super::statement::Statement;
use crate::connect::connect_within;

/// How long the socket connect may take; the whole handshake gets twice as long
/// (tokio-postgres's `connect_timeout` covers only the socket, and a server that accepts and
/// does not answer the startup would otherwise hold the reconcile without end).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens superuser connections to one server (the instance manager's Unix socket; in tests any
/// libpq configuration).
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
}

impl Connector {
    /// From a configuration whose database is replaced per connection.
    pub fn new(mut config: tokio_postgres::Config) -> Self {
        config
            .application_name("pg-instance-declarative")
            // A primary whose synchronous standbys are gone must still be managed; a statement
            // stuck on a lock must not stall every other object.
            .options("-c synchronous_commit=local -c statement_timeout=30000 -c lock_timeout=10000")
            .connect_timeout(CONNECT_TIMEOUT);
        Self { config }
    }

    /// The local server through the instance manager's private socket folder.
    pub fn local(socket_dir: &std::path::Path, port: u16, superuser: &str) -> Self {
        let mut config = tokio_postgres::Config::new();
        config.host_path(socket_dir).port(port).user(superuser);
        Self::new(config)
    }

    /// A connection to `database`.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client> {
        let mut config = self.config.clone();
        config.dbname(database);
        connect_within(&config, CONNECT_TIMEOUT * 2)
            .await
            .map_err(|error| DeclarativeError::Connect {
                database: database.to_string(),
                message: error.to_string(),
            })
    }
}

/// Longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`); longer ones are cut, so that the
/// object would never match its spec.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Refuses names PostgreSQL would truncate (the API counts characters; PostgreSQL counts bytes).
pub fn check_names<'a>(names: impl IntoIterator<Item = (&'static str, &'a str)>) -> Result<()> {
    for (what, name) in names {
        if name.len() > MAX_IDENTIFIER_BYTES {
            return Err(DeclarativeError::Invalid(format!(
                "{what} {name:?} is {} bytes long in UTF-8; PostgreSQL keeps at most {MAX_IDENTIFIER_BYTES}: shorten it",
                name.len()
            )));
        }
    }
    Ok(())
}

/// Runs `statements` in one transaction (all or nothing); the first failure is returned with
/// PostgreSQL's SQLSTATE and message.
pub async fn run_in_transaction(
    client: &mut tokio_postgres::Client,
    statements: &[Statement],
) -> Result<()> {
    if statements.is_empty() {
        return Ok(());
    }
    let transaction = client
        .transaction()
        .await
        .map_err(DeclarativeError::sql("BEGIN"))?;
    if statements.iter().any(Statement::holds_secret) {
        transaction
            .batch_execute(&super::statement::hide_from_logs(true))
            .await
            .map_err(DeclarativeError::sql("hiding the statements from the log"))?;
    }
    for statement in statements {
        transaction
            .batch_execute(&statement.sql)
            .await
            .map_err(DeclarativeError::sql(statement.summary.clone()))?;
    }
    transaction
        .commit()
        .await
        .map_err(DeclarativeError::sql("COMMIT"))
}

/// Runs one statement outside a transaction (CREATE DATABASE, DROP DATABASE).
pub async fn run_alone(client: &tokio_postgres::Client, statement: &Statement) -> Result<()> {
    client
        .batch_execute(&statement.sql)
        .await
        .map_err(DeclarativeError::sql(statement.summary.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts and never answers the startup: the declarative reconcile gets a
    /// Connect error naming the database at the bound, instead of waiting without end.
    #[tokio::test]
    async fn a_silent_server_gives_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.path().join(".s.PGSQL.5432")).unwrap();
        let silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(120)).await;
            drop(stream);
        });
        let connector = Connector::local(dir.path(), 5432, "postgres");
        let outcome = tokio::time::timeout(Duration::from_secs(60), connector.connect("app"))
            .await
            .expect("the connect must give up on its own");
        let error = outcome
            .expect_err("a silent server is an error")
            .to_string();
        assert!(
            error.contains("app") && error.contains("no answer"),
            "{error}"
        );
        silent.abort();
    }
}
