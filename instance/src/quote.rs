//! Quoting for SQL identifiers and literals and for configuration-file values: nothing the
//! instance manager sends to PostgreSQL is formatted in raw.

/// Quotes an SQL identifier (`"name"`, doubling embedded quotes).
pub fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (`'value'`, doubling embedded quotes; `E''` form when the value
/// holds a backslash so that the meaning does not depend on `standard_conforming_strings`).
pub fn literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// Quotes a value for `postgresql.conf` (`'value'`, doubling embedded quotes and backslashes).
pub fn config_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a value inside a libpq keyword/value connection string.
pub fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Replication slot / application name for a pod: lower-case letters, digits and `_` only
/// (pod names have `-` and `.`, which slot names refuse).
pub fn slot_name(pod: &str) -> String {
    pod.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_escape_quotes() {
        assert_eq!(identifier("app"), "\"app\"");
        assert_eq!(identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\b'"), "E'a\\\\b'''");
        assert_eq!(config_value("x'y"), "'x''y'");
        assert_eq!(conninfo_value("p'w"), "'p\\'w'");
    }

    #[test]
    fn slot_names_are_valid() {
        assert_eq!(slot_name("pg-1.a"), "pg_1_a");
        assert_eq!(slot_name("Db-X"), "db_x");
    }
}
