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

/// What keeps a statement out of the server log (as a statement, by duration, by sampling, and
/// as the statement of an error) and out of pg_stat_statements.
const UNLOGGED: [(&str, &str); 6] = [
    ("log_statement", "'none'"),
    ("log_min_duration_statement", "-1"),
    ("log_min_duration_sample", "-1"),
    ("log_transaction_sample_rate", "0"),
    ("log_min_error_statement", "panic"),
    ("pg_stat_statements.track_utility", "off"),
];

/// The statements that keep those that follow out of the server log and pg_stat_statements, to
/// the end of the transaction (`local`) or of the session: run before a statement that holds a
/// verifier, which lets anyone who reads it try passwords offline. Superuser settings, as the
/// instance manager's connections are.
pub fn hide_from_logs(local: bool) -> String {
    let set = if local { "SET LOCAL" } else { "SET" };
    UNLOGGED
        .iter()
        .map(|(name, value)| format!("{set} {name} TO {value}"))
        .collect::<Vec<_>>()
        .join("; ")
}

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

    /// Whether the text holds a secret (run after [`hide_from_logs`]).
    pub fn holds_secret(&self) -> bool {
        self.secret
    }
}

impl std::fmt::Debug for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary)
    }
}
