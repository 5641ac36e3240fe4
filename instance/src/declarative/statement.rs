//! A planned SQL statement: its text (identifiers and literals through [`crate::quote`]) and a
//! short description for the object's status, which never holds a password or verifier.

/// One statement of a plan.
#[derive(Clone, PartialEq, Eq)]
pub struct Statement {
    /// SQL text.
    pub sql: String,
    /// What it does, for `status.applied` and the log (no secret in it).
    pub summary: String,
}

impl Statement {
    /// A statement whose summary is its text (it holds no secret).
    pub fn plain(sql: String) -> Self {
        Self {
            summary: sql.clone(),
            sql,
        }
    }

    /// A statement with a secret in its text: only `summary` is ever shown.
    pub fn secret(sql: String, summary: String) -> Self {
        Self { sql, summary }
    }
}

impl std::fmt::Debug for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary)
    }
}
