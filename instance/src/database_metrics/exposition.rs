//! The OpenMetrics text of the figures read from PostgreSQL: families keyed by name, samples with
//! labels, escaping and number formatting. The instance manager's own registry is encoded by
//! prometheus-client; this writes the families whose names and labels are only known at scrape
//! time (rows of a query, user-defined queries).

use std::collections::BTreeMap;
use std::fmt::Write;

/// The OpenMetrics type of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    /// A value that goes up and down.
    Gauge,
    /// A cumulative value; its family name is written without `_total`, its samples with it.
    Counter,
    /// A cumulative value kept under a postgres_exporter name that has no `_total` suffix
    /// (typed `unknown` so that the sample keeps the exporter's exact name).
    Untyped,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Gauge => "gauge",
            Self::Counter => "counter",
            Self::Untyped => "unknown",
        }
    }
}

/// Label pairs of one sample, in the order they are written.
pub type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    help: String,
    kind: MetricType,
    samples: Vec<(Labels, f64)>,
}

/// Families collected during one scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    families: BTreeMap<String, Family>,
}

impl Exposition {
    /// Adds one sample to the family `name` (declared on first use; a later declaration with
    /// another type is ignored, so that two sources can never write one name twice with two types).
    pub fn add(&mut self, name: &str, help: &str, kind: MetricType, labels: Labels, value: f64) {
        let family = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                samples: Vec::new(),
            });
        if family.kind == kind {
            family.samples.push((labels, value));
        }
    }

    /// Whether a family of that name holds a sample.
    pub fn contains(&self, name: &str) -> bool {
        self.families
            .get(name)
            .is_some_and(|family| !family.samples.is_empty())
    }

    /// The families as OpenMetrics text, without the closing `# EOF` (the endpoint writes it
    /// once, after every source).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        for (name, family) in &self.families {
            let family_name = match family.kind {
                MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
                _ => name.as_str(),
            };
            let sample_name = match family.kind {
                MetricType::Counter => format!("{family_name}_total"),
                _ => name.clone(),
            };
            let _ = writeln!(text, "# HELP {family_name} {}", escape_help(&family.help));
            let _ = writeln!(text, "# TYPE {family_name} {}", family.kind.as_str());
            // OpenMetrics forbids two samples with one label set in a family: keep the first.
            let mut seen = std::collections::HashSet::new();
            for (labels, value) in &family.samples {
                if !seen.insert(labels) {
                    continue;
                }
                text.push_str(&sample_name);
                if !labels.is_empty() {
                    text.push('{');
                    for (index, (label, value)) in labels.iter().enumerate() {
                        if index > 0 {
                            text.push(',');
                        }
                        let _ = write!(text, "{label}=\"{}\"", escape_label(value));
                    }
                    text.push('}');
                }
                let _ = writeln!(text, " {}", format_value(*value));
            }
        }
        text
    }
}

/// A metric or label name made valid: characters outside `[a-zA-Z0-9_]` become `_`, and a name
/// starting with a digit gets a leading `_`.
pub fn sanitize_name(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.starts_with(|c: char| c.is_ascii_digit()) || clean.is_empty() {
        clean.insert(0, '_');
    }
    clean
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_total_samples_and_labels_are_escaped() {
        let mut exposition = Exposition::default();
        exposition.add(
            "pg_stat_checkpointer_num_timed_total",
            "Scheduled checkpoints",
            MetricType::Counter,
            vec![],
            3.0,
        );
        exposition.add(
            "pg_database_size_bytes",
            "Disk space used by the database",
            MetricType::Gauge,
            vec![("datname".into(), "a\"b\\c".into())],
            8192.5,
        );
        let text = exposition.encode();
        assert!(
            text.contains("# TYPE pg_stat_checkpointer_num_timed counter\n"),
            "{text}"
        );
        assert!(
            text.contains("\npg_stat_checkpointer_num_timed_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("pg_database_size_bytes{datname=\"a\\\"b\\\\c\"} 8192.5\n"),
            "{text}"
        );
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("my-query.rows"), "my_query_rows");
        assert_eq!(sanitize_name("1x"), "_1x");
    }
}
