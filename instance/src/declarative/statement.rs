//! A planned SQL statement: its text (identifiers and literals through [`crate::quote`]) and a
//! short description for the object's status, which never holds a password or verifier.

/// One statement of a plan.
#[derive(Clone, PartialEq, Eq)]
pub struct Statement {
    /// SQL text.
    pub sql: String,
    /// What it does, for `status.applied` and the log (no secret in it).
    pub summary: String,
    /// Whether `sql` holds a secret (a SCRAM verifier).
    secret: bool,
}

/// Keeps the statements that follow in the transaction out of the server log (as statements, by
/// duration, by sampling, and as the statement of an error) and out of pg_stat_statements: run
/// before a statement that holds a verifier, which lets anyone who reads it try passwords
/// offline. Superuser settings, as the instance manager's connections are.
pub const HIDE_IN_TRANSACTION: &str = "SET LOCAL log_statement TO 'none'; \
    SET LOCAL log_min_duration_statement TO -1; SET LOCAL log_min_duration_sample TO -1; \
    SET LOCAL log_transaction_sample_rate TO 0; SET LOCAL log_min_error_statement TO panic; \
    SET LOCAL pg_stat_statements.track_utility TO off";

/// [`HIDE_IN_TRANSACTION`] for the rest of a session.
pub const HIDE_IN_SESSION: &str = "SET log_statement TO 'none'; \
    SET log_min_duration_statement TO -1; SET log_min_duration_sample TO -1; \
    SET log_transaction_sample_rate TO 0; SET log_min_error_statement TO panic; \
    SET pg_stat_statements.track_utility TO off";

impl Statement {
    /// A statement whose summary is its text (it holds no secret).
    pub fn plain(sql: String) -> Self {
        Self {
            summary: sql.clone(),
            sql,
            secret: false,
        }
    }

    /// A statement with a secret in its text: only `summary` is ever shown.
    pub fn secret(sql: String, summary: String) -> Self {
        Self {
            sql,
            summary,
            secret: true,
        }
    }

    /// Whether the text holds a secret (run after [`HIDE_IN_TRANSACTION`]).
    pub fn holds_secret(&self) -> bool {
        self.secret
    }
}

impl std::fmt::Debug for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary)
    }
}
