//! User-defined queries, in postgres_exporter's queries.yaml format:
//!
//! ```yaml
//! pg_orders:                      # metric prefix: pg_orders_<column>
//!   query: "SELECT status, count(*) AS count FROM orders GROUP BY status"
//!   primary: true                 # optional: only on the primary (`master` is accepted too)
//!   metrics:
//!     - status:
//!         usage: "LABEL"
//!         description: "Order status"
//!     - count:
//!         usage: "GAUGE"          # GAUGE, COUNTER, LABEL or DISCARD
//!         description: "Orders by status"
//! ```
//!
//! The file is re-read when it changes. A file that does not parse keeps the previous queries
//! and sets `pg_instance_custom_queries_config_error`; a query that fails at scrape time is
//! reported like a built-in one.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Deserialize;
use tracing::warn;

use super::exposition::{MetricType, sanitize_name};
use super::query::{Column, Query, Usage};

/// One query of the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryDefinition {
    query: String,
    #[serde(default)]
    primary: bool,
    #[serde(default)]
    master: bool,
    /// Accepted for compatibility; every query runs at each scrape.
    #[serde(default)]
    #[allow(dead_code)]
    cache_seconds: Option<u64>,
    metrics: Vec<column_entry::OneEntry>,
}

/// A `- column: {usage, description}` list item.
mod column_entry {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(transparent)]
    pub struct OneEntry(pub BTreeMap<String, ColumnDefinition>);

    #[derive(Debug, Deserialize)]
    pub struct ColumnDefinition {
        pub usage: String,
        #[serde(default)]
        pub description: String,
    }
}

/// Parses the file's text into queries, or says what is wrong with it.
pub fn parse(text: &str) -> Result<Vec<Query>, String> {
    let definitions: serde_yaml::Mapping =
        serde_yaml::from_str(text).map_err(|error| format!("not valid YAML: {error}"))?;
    let mut queries = Vec::new();
    for (name, definition) in definitions {
        let name = name
            .as_str()
            .ok_or_else(|| "every top-level key must be a query name (a string)".to_string())?
            .to_string();
        let definition: QueryDefinition =
            serde_yaml::from_value(definition).map_err(|error| format!("query {name}: {error}"))?;
        let prefix = sanitize_name(&name);
        let mut columns = Vec::new();
        for entry in definition.metrics {
            for (column, spec) in entry.0 {
                let metric_name = format!("{prefix}_{}", sanitize_name(&column));
                let help = if spec.description.is_empty() {
                    format!("{name}.{column}")
                } else {
                    spec.description.clone()
                };
                let column = match spec.usage.to_ascii_uppercase().as_str() {
                    "LABEL" => Column::label(&column),
                    "GAUGE" => Column::metric(&column, &metric_name, MetricType::Gauge, &help),
                    // postgres_exporter writes counters under the bare name: keep it.
                    "COUNTER" => Column::metric(&column, &metric_name, MetricType::Untyped, &help),
                    "DISCARD" => Column {
                        column,
                        usage: Usage::Discard,
                    },
                    other => {
                        return Err(format!(
                            "query {name}, column {column}: usage {other} is not supported \
                             (use GAUGE, COUNTER, LABEL or DISCARD)"
                        ));
                    }
                };
                columns.push(column);
            }
        }
        if !columns
            .iter()
            .any(|column| matches!(column.usage, Usage::Metric(_)))
        {
            return Err(format!("query {name}: no GAUGE or COUNTER column"));
        }
        let mut query = Query {
            name,
            sql: definition.query,
            requires: None,
            columns,
        };
        if definition.primary || definition.master {
            query = query.requires("SELECT NOT pg_is_in_recovery()");
        }
        queries.push(query);
    }
    Ok(queries)
}

/// The file of user-defined queries and what was last read from it.
#[derive(Debug, Default)]
pub struct CustomQueries {
    path: Option<PathBuf>,
    modified: Option<SystemTime>,
    queries: Vec<Query>,
    error: Option<String>,
}

impl CustomQueries {
    /// Sets the file (none: no user-defined queries).
    pub fn set_path(&mut self, path: Option<PathBuf>) {
        if self.path != path {
            *self = Self {
                path,
                ..Self::default()
            };
        }
    }

    /// Re-reads the file when it changed; returns the queries and the current error.
    pub fn refresh(&mut self) -> (Vec<Query>, Option<String>) {
        let Some(path) = &self.path else {
            return (Vec::new(), None);
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified != self.modified {
            self.modified = modified;
            let parsed = std::fs::read_to_string(path)
                .map_err(|error| format!("reading {}: {error}", path.display()))
                .and_then(|text| parse(&text));
            match parsed {
                Ok(queries) => {
                    self.queries = queries;
                    self.error = None;
                }
                Err(error) => {
                    warn!(file = %path.display(), %error, "metrics: user-defined queries not loaded");
                    self.error = Some(error);
                }
            }
        }
        (self.queries.clone(), self.error.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_yaml_parses_into_labels_and_metrics() {
        let queries = parse(
            r#"
pg_orders:
  query: "SELECT status, count(*) AS count FROM orders GROUP BY status"
  primary: true
  metrics:
    - status:
        usage: "LABEL"
        description: "Order status"
    - count:
        usage: "GAUGE"
        description: "Orders by status"
"#,
        )
        .unwrap();
        assert_eq!(queries.len(), 1);
        assert_eq!(queries[0].name, "pg_orders");
        assert!(queries[0].requires.is_some());
        match &queries[0].columns[1].usage {
            Usage::Metric(metric) => assert_eq!(metric.name, "pg_orders_count"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_usage_and_missing_metrics_are_explained() {
        let error =
            parse("q:\n  query: SELECT 1 AS x\n  metrics:\n    - x:\n        usage: HISTOGRAM\n")
                .unwrap_err();
        assert!(error.contains("HISTOGRAM"), "{error}");
        let error =
            parse("q:\n  query: SELECT 1 AS x\n  metrics:\n    - x:\n        usage: LABEL\n")
                .unwrap_err();
        assert!(error.contains("no GAUGE or COUNTER"), "{error}");
    }
}
