//! One metrics query: its SQL, the columns that are labels and the columns that are metrics, and
//! how a result row turns into samples. Built-in queries and user-defined ones share this shape.

use tokio_postgres::SimpleQueryRow;

use super::exposition::{Exposition, Labels, MetricType};

/// A query read at scrape time.
#[derive(Clone, Debug)]
pub struct Query {
    /// Name reported in `pg_instance_scrape_query_errors{query}` and in logs.
    pub name: String,
    /// The statement (one `SELECT`).
    pub sql: String,
    /// A statement returning one boolean: the query runs only when it is true (for example,
    /// `pg_stat_statements` only where the extension is installed and loaded).
    pub requires: Option<String>,
    /// What each result column is.
    pub columns: Vec<Column>,
}

/// What a result column is.
#[derive(Clone, Debug)]
pub struct Column {
    /// The column name in the result.
    pub column: String,
    /// How it is used.
    pub usage: Usage,
}

/// How a result column is used.
#[derive(Clone, Debug)]
pub enum Usage {
    /// A label of every metric of the row, named after the column.
    Label,
    /// A metric.
    Metric(MetricColumn),
    /// Not exported.
    Discard,
}

/// A metric read from a column.
#[derive(Clone, Debug)]
pub struct MetricColumn {
    /// Full metric name (with `_total` for counters).
    pub name: String,
    /// HELP text.
    pub help: String,
    /// OpenMetrics type.
    pub kind: MetricType,
    /// Constant labels added to this metric's samples (for example `stage="replay"`).
    pub extra_labels: Labels,
}

impl Column {
    /// A label column.
    pub fn label(column: &str) -> Self {
        Self {
            column: column.to_string(),
            usage: Usage::Label,
        }
    }

    /// A metric column.
    pub fn metric(column: &str, name: &str, kind: MetricType, help: &str) -> Self {
        Self {
            column: column.to_string(),
            usage: Usage::Metric(MetricColumn {
                name: name.to_string(),
                help: help.to_string(),
                kind,
                extra_labels: Vec::new(),
            }),
        }
    }

    /// A gauge column.
    pub fn gauge(column: &str, name: &str, help: &str) -> Self {
        Self::metric(column, name, MetricType::Gauge, help)
    }

    /// A counter column (`name` ends with `_total`).
    pub fn counter(column: &str, name: &str, help: &str) -> Self {
        Self::metric(column, name, MetricType::Counter, help)
    }

    /// A cumulative column under a postgres_exporter name without `_total`.
    pub fn untyped(column: &str, name: &str, help: &str) -> Self {
        Self::metric(column, name, MetricType::Untyped, help)
    }

    /// Adds a constant label to a metric column.
    pub fn with_label(mut self, label: &str, value: &str) -> Self {
        if let Usage::Metric(metric) = &mut self.usage {
            metric
                .extra_labels
                .push((label.to_string(), value.to_string()));
        }
        self
    }
}

impl Query {
    /// A built-in query.
    pub fn new(name: &str, sql: &str, columns: Vec<Column>) -> Self {
        Self {
            name: name.to_string(),
            sql: sql.to_string(),
            requires: None,
            columns,
        }
    }

    /// Runs only when `condition` (a statement returning one boolean) is true.
    pub fn requires(mut self, condition: &str) -> Self {
        self.requires = Some(condition.to_string());
        self
    }

    /// Adds the samples of one result row. A NULL or non-numeric metric value gives no sample.
    pub fn add_row(&self, row: &SimpleQueryRow, exposition: &mut Exposition) {
        let mut labels: Labels = Vec::new();
        for column in &self.columns {
            if let Usage::Label = column.usage {
                let value = column_value(row, &column.column).unwrap_or_default();
                labels.push((column.column.clone(), value.to_string()));
            }
        }
        for column in &self.columns {
            let Usage::Metric(metric) = &column.usage else {
                continue;
            };
            let Some(value) = column_value(row, &column.column).and_then(parse_value) else {
                continue;
            };
            let mut sample_labels = labels.clone();
            sample_labels.extend(metric.extra_labels.iter().cloned());
            exposition.add(
                &metric.name,
                &metric.help,
                metric.kind,
                sample_labels,
                value,
            );
        }
    }
}

fn column_value<'a>(row: &'a SimpleQueryRow, name: &str) -> Option<&'a str> {
    let index = row.columns().iter().position(|c| c.name() == name)?;
    row.get(index)
}

/// A value in PostgreSQL's text form as a number: numbers, booleans (`t`/`f`), `Infinity`.
pub fn parse_value(text: &str) -> Option<f64> {
    match text {
        "t" | "true" => Some(1.0),
        "f" | "false" => Some(0.0),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.trim().parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_in_text_form_parse() {
        assert_eq!(parse_value("t"), Some(1.0));
        assert_eq!(parse_value("f"), Some(0.0));
        assert_eq!(parse_value("12.5"), Some(12.5));
        assert_eq!(parse_value("-Infinity"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_value("abc"), None);
    }
}
