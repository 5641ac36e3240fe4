//! pgbouncer_exporter's metric families from the admin console's answers: which column of which
//! `SHOW` becomes which metric, with which labels and in which unit. The names, labels and units
//! are those of prometheus-community/pgbouncer_exporter (its `pgbouncer_stats_*` names, which the
//! published PgBouncer dashboards query), so those dashboards and alerts keep working. Pure: a
//! scrape hands the tables in and gets the exposition back.

use crate::database_metrics::exposition::{Exposition, Labels, MetricType};
use crate::database_metrics::query::parse_value;

/// One answer of the admin console, in text form (the console speaks only the simple protocol).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows; `None` is SQL NULL.
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    /// A table from literal columns and rows (tests, and callers that already hold text).
    pub fn new(columns: &[&str], rows: &[&[Option<&str>]]) -> Self {
        Self {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: rows
                .iter()
                .map(|row| row.iter().map(|v| v.map(str::to_string)).collect())
                .collect(),
        }
    }

    fn value<'a>(&'a self, row: &'a [Option<String>], column: &str) -> Option<&'a str> {
        let index = self.columns.iter().position(|c| c == column)?;
        row.get(index)?.as_deref()
    }
}

/// What one scrape read from the admin console; `None` where that command failed.
#[derive(Clone, Debug, Default)]
pub struct Console {
    /// `SHOW VERSION`.
    pub version: Option<Table>,
    /// `SHOW STATS`: cumulative figures per database.
    pub stats: Option<Table>,
    /// `SHOW POOLS`: connections per (database, user) pool.
    pub pools: Option<Table>,
    /// `SHOW DATABASES`: the configured and auto-created databases.
    pub databases: Option<Table>,
    /// `SHOW LISTS`: sizes of PgBouncer's internal lists.
    pub lists: Option<Table>,
    /// `SHOW CONFIG`: the settings in force.
    pub config: Option<Table>,
    /// `SHOW CLIENTS`: one row per client connection.
    pub clients: Option<Table>,
    /// With TLS: the certificate PgBouncer presented (`server`) and the CA bundle's latest CA
    /// (`ca`), not part of the console's answers (they do not decide `pgbouncer_up`).
    pub certificates: Vec<crate::tls::CertificateValidity>,
}

impl Console {
    /// Whether every command answered (what `pgbouncer_up` reports, as pgbouncer_exporter does).
    pub fn complete(&self) -> bool {
        [
            &self.version,
            &self.stats,
            &self.pools,
            &self.databases,
            &self.lists,
            &self.config,
            &self.clients,
        ]
        .iter()
        .all(|table| table.is_some())
    }
}

/// A column that becomes a metric: its value divided by `divisor` (microseconds to seconds).
struct ColumnMetric {
    column: &'static str,
    name: &'static str,
    kind: MetricType,
    divisor: f64,
    help: &'static str,
}

const fn counter(
    column: &'static str,
    name: &'static str,
    divisor: f64,
    help: &'static str,
) -> ColumnMetric {
    ColumnMetric {
        column,
        name,
        kind: MetricType::Counter,
        divisor,
        help,
    }
}

const fn gauge(column: &'static str, name: &'static str, help: &'static str) -> ColumnMetric {
    ColumnMetric {
        column,
        name,
        kind: MetricType::Gauge,
        divisor: 1.0,
        help,
    }
}

/// Microseconds per second: PgBouncer counts time in microseconds, Prometheus in seconds
/// (dividing, not multiplying by 1e-6, keeps `7642` as `0.007642`).
const MICROS: f64 = 1e6;

/// `SHOW STATS`, labelled by `database`. Columns a PgBouncer version lacks give no sample.
const STATS: &[ColumnMetric] = &[
    counter(
        "total_query_count",
        "pgbouncer_stats_queries_pooled_total",
        1.0,
        "Total number of SQL queries pooled",
    ),
    counter(
        "total_query_time",
        "pgbouncer_stats_queries_duration_seconds_total",
        MICROS,
        "Total number of seconds spent by pgbouncer when actively connected to PostgreSQL, executing queries",
    ),
    counter(
        "total_received",
        "pgbouncer_stats_received_bytes_total",
        1.0,
        "Total volume in bytes of network traffic received by pgbouncer, shown as bytes",
    ),
    counter(
        "total_requests",
        "pgbouncer_stats_queries_total",
        1.0,
        "Total number of SQL requests pooled by pgbouncer, shown as requests",
    ),
    counter(
        "total_sent",
        "pgbouncer_stats_sent_bytes_total",
        1.0,
        "Total volume in bytes of network traffic sent by pgbouncer, shown as bytes",
    ),
    counter(
        "total_wait_time",
        "pgbouncer_stats_client_wait_seconds_total",
        MICROS,
        "Time spent by clients waiting for a server in seconds",
    ),
    counter(
        "total_xact_count",
        "pgbouncer_stats_sql_transactions_pooled_total",
        1.0,
        "Total number of SQL transactions pooled",
    ),
    counter(
        "total_xact_time",
        "pgbouncer_stats_server_in_transaction_seconds_total",
        MICROS,
        "Total number of seconds spent by pgbouncer when connected to PostgreSQL in a transaction, either idle in transaction or executing queries",
    ),
    counter(
        "total_client_parse_count",
        "pgbouncer_stats_client_parses_total",
        1.0,
        "Total number of prepared statement Parse messages received from clients",
    ),
    counter(
        "total_server_parse_count",
        "pgbouncer_stats_server_parses_total",
        1.0,
        "Total number of prepared statement Parse messages sent by pgbouncer to PostgreSQL",
    ),
    counter(
        "total_bind_count",
        "pgbouncer_stats_binds_total",
        1.0,
        "Total number of prepared statements readied for execution with a Bind message",
    ),
    counter(
        "total_server_assignment_count",
        "pgbouncer_stats_server_assignments_total",
        1.0,
        "Total number of client connections which have been served since process start",
    ),
];

/// `SHOW POOLS`, labelled by `database` and `user` (`maxwait` is handled apart: it is split in
/// two columns, seconds and microseconds).
const POOLS: &[ColumnMetric] = &[
    gauge(
        "cl_active",
        "pgbouncer_pools_client_active_connections",
        "Client connections linked to server connection and able to process queries, shown as connection",
    ),
    gauge(
        "cl_active_cancel_req",
        "pgbouncer_pools_client_active_cancel_connections",
        "Client connections that have forwarded query cancellations to the server and are waiting for the server response",
    ),
    gauge(
        "cl_waiting",
        "pgbouncer_pools_client_waiting_connections",
        "Client connections waiting on a server connection, shown as connection",
    ),
    gauge(
        "cl_waiting_cancel_req",
        "pgbouncer_pools_client_waiting_cancel_connections",
        "Client connections that have not forwarded query cancellations to the server yet",
    ),
    gauge(
        "sv_active",
        "pgbouncer_pools_server_active_connections",
        "Server connections linked to a client connection, shown as connection",
    ),
    gauge(
        "sv_active_cancel",
        "pgbouncer_pools_server_active_cancel_connections",
        "Server connections that are currently forwarding a cancel request",
    ),
    gauge(
        "sv_being_canceled",
        "pgbouncer_pools_server_being_canceled_connections",
        "Servers that normally could become idle but are waiting until all in-flight cancel requests have completed",
    ),
    gauge(
        "sv_idle",
        "pgbouncer_pools_server_idle_connections",
        "Server connections idle and ready for a client query, shown as connection",
    ),
    gauge(
        "sv_used",
        "pgbouncer_pools_server_used_connections",
        "Server connections idle more than server_check_delay, needing server_check_query, shown as connection",
    ),
    gauge(
        "sv_tested",
        "pgbouncer_pools_server_testing_connections",
        "Server connections currently running either server_reset_query or server_check_query, shown as connection",
    ),
    gauge(
        "sv_login",
        "pgbouncer_pools_server_login_connections",
        "Server connections currently in the process of logging in, shown as connection",
    ),
];

/// `SHOW DATABASES`. PgBouncer 1.24 renamed `reserve_pool` to `reserve_pool_size`: both map to
/// one metric, and a version has only one of them.
const DATABASES: &[ColumnMetric] = &[
    gauge(
        "pool_size",
        "pgbouncer_databases_pool_size",
        "Maximum number of server connections",
    ),
    gauge(
        "reserve_pool",
        "pgbouncer_databases_reserve_pool",
        "Maximum number of additional connections for this database",
    ),
    gauge(
        "reserve_pool_size",
        "pgbouncer_databases_reserve_pool",
        "Maximum number of additional connections for this database",
    ),
    gauge(
        "max_connections",
        "pgbouncer_databases_max_connections",
        "Maximum number of allowed connections for this database",
    ),
    gauge(
        "current_connections",
        "pgbouncer_databases_current_connections",
        "Current number of connections for this database",
    ),
    gauge(
        "paused",
        "pgbouncer_databases_paused",
        "1 if this database is currently paused, else 0",
    ),
    gauge(
        "disabled",
        "pgbouncer_databases_disabled",
        "1 if this database is currently disabled, else 0",
    ),
];

const STATS_LABELS: &[&str] = &["database"];
const POOL_LABELS: &[&str] = &["database", "user"];
const DATABASE_LABELS: &[&str] = &[
    "name",
    "host",
    "port",
    "database",
    "force_user",
    "pool_mode",
];

/// `SHOW LISTS` rows (`list`, `items`): the list name, its metric, its help.
const LISTS: &[(&str, &str, &str)] = &[
    ("databases", "pgbouncer_databases", "Count of databases"),
    ("users", "pgbouncer_users", "Count of users"),
    ("pools", "pgbouncer_pools", "Count of pools"),
    (
        "free_clients",
        "pgbouncer_free_clients",
        "Count of free clients",
    ),
    (
        "used_clients",
        "pgbouncer_used_clients",
        "Count of used clients",
    ),
    (
        "login_clients",
        "pgbouncer_login_clients",
        "Count of clients in login state",
    ),
    (
        "free_servers",
        "pgbouncer_free_servers",
        "Count of free servers",
    ),
    (
        "used_servers",
        "pgbouncer_used_servers",
        "Count of used servers",
    ),
    (
        "dns_names",
        "pgbouncer_cached_dns_names",
        "Count of DNS names in the cache",
    ),
    (
        "dns_zones",
        "pgbouncer_cached_dns_zones",
        "Count of DNS zones in the cache",
    ),
    (
        "dns_queries",
        "pgbouncer_in_flight_dns_queries",
        "Count of in-flight DNS queries",
    ),
];

/// `SHOW CONFIG` keys exported: the key, its metric, its help.
const CONFIG: &[(&str, &str, &str)] = &[
    (
        "max_client_conn",
        "pgbouncer_config_max_client_connections",
        "Config maximum number of client connections",
    ),
    (
        "max_user_connections",
        "pgbouncer_config_max_user_connections",
        "Config maximum number of server connections per user",
    ),
];

/// Name of the scrape-success gauge.
pub const UP: &str = "pgbouncer_up";

/// Names of the certificate validity gauges (ours, not pgbouncer_exporter's; the
/// `PostgresCertificateExpiresSoon` alert reads them beside the instances').
pub const CERTIFICATE_NOT_BEFORE: &str = "pg_pooler_certificate_not_before_timestamp_seconds";
/// See [`CERTIFICATE_NOT_BEFORE`].
pub const CERTIFICATE_NOT_AFTER: &str = "pg_pooler_certificate_not_after_timestamp_seconds";

/// The exposition of one scrape: `pgbouncer_up` (1 when every command answered) and the
/// families of each table that was read.
pub fn render(console: &Console) -> Exposition {
    let mut exposition = Exposition::default();
    exposition.add(
        UP,
        "The pgbouncer scrape succeeded",
        MetricType::Gauge,
        Vec::new(),
        if console.complete() { 1.0 } else { 0.0 },
    );
    if let Some(version) = &console.version {
        for row in &version.rows {
            if let Some(text) = version.value(row, "version") {
                exposition.add(
                    "pgbouncer_version_info",
                    "The pgbouncer version info",
                    MetricType::Gauge,
                    vec![("version".to_string(), text.to_string())],
                    1.0,
                );
            }
        }
    }
    if let Some(stats) = &console.stats {
        add_columns(&mut exposition, stats, STATS_LABELS, STATS);
    }
    if let Some(pools) = &console.pools {
        add_columns(&mut exposition, pools, POOL_LABELS, POOLS);
        add_maxwait(&mut exposition, pools);
    }
    if let Some(databases) = &console.databases {
        add_columns(&mut exposition, databases, DATABASE_LABELS, DATABASES);
    }
    if let Some(lists) = &console.lists {
        add_key_values(&mut exposition, lists, "list", "items", LISTS);
    }
    if let Some(config) = &console.config {
        add_key_values(&mut exposition, config, "key", "value", CONFIG);
    }
    if let Some(clients) = &console.clients {
        add_client_counts(&mut exposition, clients);
    }
    for validity in &console.certificates {
        let labels = vec![("certificate".to_string(), validity.certificate.clone())];
        exposition.add(
            CERTIFICATE_NOT_BEFORE,
            "Start of validity of the certificate PgBouncer presents (server) or of the CA bundle's latest CA (ca), Unix time",
            MetricType::Gauge,
            labels.clone(),
            validity.not_before as f64,
        );
        exposition.add(
            CERTIFICATE_NOT_AFTER,
            "Expiry of the certificate PgBouncer presents (server) or of the CA bundle's latest CA (ca), Unix time",
            MetricType::Gauge,
            labels,
            validity.not_after as f64,
        );
    }
    exposition
}

/// Every metric name [`render`] can produce (with `_total` on counters), for documentation and
/// for tests that compare against what a dashboard reads.
pub fn metric_names() -> Vec<&'static str> {
    let mut names = vec![
        UP,
        "pgbouncer_version_info",
        "pgbouncer_pools_client_maxwait_seconds",
        "pgbouncer_client_connections",
        CERTIFICATE_NOT_BEFORE,
        CERTIFICATE_NOT_AFTER,
    ];
    for table in [STATS, POOLS, DATABASES] {
        names.extend(table.iter().map(|metric| metric.name));
    }
    names.extend(LISTS.iter().map(|(_, name, _)| *name));
    names.extend(CONFIG.iter().map(|(_, name, _)| *name));
    names.sort_unstable();
    names.dedup();
    names
}

fn labels_of(table: &Table, row: &[Option<String>], labels: &[&str]) -> Labels {
    labels
        .iter()
        .map(|label| {
            (
                label.to_string(),
                table.value(row, label).unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn add_columns(
    exposition: &mut Exposition,
    table: &Table,
    labels: &[&str],
    metrics: &[ColumnMetric],
) {
    for row in &table.rows {
        let row_labels = labels_of(table, row, labels);
        for metric in metrics {
            let Some(value) = table.value(row, metric.column).and_then(parse_value) else {
                continue;
            };
            exposition.add(
                metric.name,
                metric.help,
                metric.kind,
                row_labels.clone(),
                value / metric.divisor,
            );
        }
    }
}

/// `maxwait` (whole seconds) plus `maxwait_us` (the microseconds beyond them), in seconds.
fn add_maxwait(exposition: &mut Exposition, pools: &Table) {
    for row in &pools.rows {
        let Some(seconds) = pools.value(row, "maxwait").and_then(parse_value) else {
            continue;
        };
        let micros = pools
            .value(row, "maxwait_us")
            .and_then(parse_value)
            .unwrap_or(0.0);
        exposition.add(
            "pgbouncer_pools_client_maxwait_seconds",
            "Age of oldest unserved client connection, shown as second",
            MetricType::Gauge,
            labels_of(pools, row, POOL_LABELS),
            seconds + micros / MICROS,
        );
    }
}

/// Tables of (name, value) rows: each known name gives one gauge.
fn add_key_values(
    exposition: &mut Exposition,
    table: &Table,
    key_column: &str,
    value_column: &str,
    known: &[(&str, &str, &str)],
) {
    for row in &table.rows {
        let Some(key) = table.value(row, key_column) else {
            continue;
        };
        let Some((_, name, help)) = known.iter().find(|(name, _, _)| *name == key) else {
            continue;
        };
        if let Some(value) = table.value(row, value_column).and_then(parse_value) {
            exposition.add(name, help, MetricType::Gauge, Vec::new(), value);
        }
    }
}

/// `SHOW CLIENTS` counted by (database, user, application_name, state).
fn add_client_counts(exposition: &mut Exposition, clients: &Table) {
    let mut counts: std::collections::BTreeMap<Labels, f64> = Default::default();
    for row in &clients.rows {
        let labels = labels_of(
            clients,
            row,
            &["database", "user", "application_name", "state"],
        );
        *counts.entry(labels).or_default() += 1.0;
    }
    for (labels, count) in counts {
        exposition.add(
            "pgbouncer_client_connections",
            "Number of client connections grouped by database, user, application name, and state",
            MetricType::Gauge,
            labels,
            count,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Console {
        Console {
            version: Some(Table::new(&["version"], &[&[Some("PgBouncer 1.18.0")]])),
            stats: Some(Table::new(
                &[
                    "database",
                    "total_xact_count",
                    "total_query_count",
                    "total_received",
                    "total_sent",
                    "total_xact_time",
                    "total_query_time",
                    "total_wait_time",
                    "avg_xact_count",
                ],
                &[&[
                    Some("app"),
                    Some("7"),
                    Some("9"),
                    Some("1000"),
                    Some("2000"),
                    Some("1500000"),
                    Some("250000"),
                    Some("30"),
                    Some("1"),
                ]],
            )),
            pools: Some(Table::new(
                &[
                    "database",
                    "user",
                    "cl_active",
                    "cl_waiting",
                    "sv_idle",
                    "maxwait",
                    "maxwait_us",
                    "pool_mode",
                ],
                &[&[
                    Some("app"),
                    Some("alice"),
                    Some("3"),
                    Some("2"),
                    Some("1"),
                    Some("4"),
                    Some("500000"),
                    Some("transaction"),
                ]],
            )),
            databases: Some(Table::new(
                &[
                    "name",
                    "host",
                    "port",
                    "database",
                    "force_user",
                    "pool_size",
                    "reserve_pool",
                    "pool_mode",
                    "max_connections",
                    "current_connections",
                    "paused",
                    "disabled",
                ],
                &[&[
                    Some("pgbouncer"),
                    None,
                    Some("6432"),
                    Some("pgbouncer"),
                    Some("pgbouncer"),
                    Some("2"),
                    Some("0"),
                    Some("statement"),
                    Some("0"),
                    Some("1"),
                    Some("0"),
                    Some("0"),
                ]],
            )),
            lists: Some(Table::new(
                &["list", "items"],
                &[
                    &[Some("databases"), Some("2")],
                    &[Some("unknown_list"), Some("5")],
                ],
            )),
            config: Some(Table::new(
                &["key", "value", "default", "changeable"],
                &[
                    &[
                        Some("max_client_conn"),
                        Some("300"),
                        Some("100"),
                        Some("yes"),
                    ],
                    &[Some("listen_addr"), Some("*"), Some(""), Some("no")],
                ],
            )),
            clients: Some(Table::new(
                &["type", "user", "database", "state", "application_name"],
                &[
                    &[
                        Some("C"),
                        Some("alice"),
                        Some("app"),
                        Some("active"),
                        Some("psql"),
                    ],
                    &[
                        Some("C"),
                        Some("alice"),
                        Some("app"),
                        Some("active"),
                        Some("psql"),
                    ],
                    &[Some("C"), Some("bob"), Some("app"), Some("waiting"), None],
                ],
            )),
            certificates: vec![crate::tls::CertificateValidity {
                certificate: "server".into(),
                not_before: 1_000,
                not_after: 9_000,
            }],
        }
    }

    #[test]
    fn each_show_becomes_pgbouncer_exporter_families_with_their_labels_and_units() {
        let text = render(&console()).encode();
        for line in [
            "pgbouncer_up 1\n",
            "pgbouncer_version_info{version=\"PgBouncer 1.18.0\"} 1\n",
            "pgbouncer_stats_queries_pooled_total{database=\"app\"} 9\n",
            "pgbouncer_stats_sql_transactions_pooled_total{database=\"app\"} 7\n",
            "pgbouncer_stats_queries_duration_seconds_total{database=\"app\"} 0.25\n",
            "pgbouncer_stats_server_in_transaction_seconds_total{database=\"app\"} 1.5\n",
            "pgbouncer_stats_client_wait_seconds_total{database=\"app\"} 0.00003\n",
            "pgbouncer_stats_received_bytes_total{database=\"app\"} 1000\n",
            "pgbouncer_stats_sent_bytes_total{database=\"app\"} 2000\n",
            "pgbouncer_pools_client_active_connections{database=\"app\",user=\"alice\"} 3\n",
            "pgbouncer_pools_client_waiting_connections{database=\"app\",user=\"alice\"} 2\n",
            "pgbouncer_pools_client_maxwait_seconds{database=\"app\",user=\"alice\"} 4.5\n",
            "pgbouncer_databases_current_connections{name=\"pgbouncer\",host=\"\",port=\"6432\",database=\"pgbouncer\",force_user=\"pgbouncer\",pool_mode=\"statement\"} 1\n",
            "pgbouncer_databases 2\n",
            "pgbouncer_config_max_client_connections 300\n",
            "pgbouncer_client_connections{database=\"app\",user=\"alice\",application_name=\"psql\",state=\"active\"} 2\n",
            "pgbouncer_client_connections{database=\"app\",user=\"bob\",application_name=\"\",state=\"waiting\"} 1\n",
            "# TYPE pgbouncer_stats_queries_pooled counter\n",
            "pg_pooler_certificate_not_before_timestamp_seconds{certificate=\"server\"} 1000\n",
            "pg_pooler_certificate_not_after_timestamp_seconds{certificate=\"server\"} 9000\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        // Columns nobody maps (averages, unknown lists, non-numeric settings) give nothing.
        assert!(!text.contains("avg_"), "{text}");
        assert!(!text.contains("unknown_list"), "{text}");
        assert!(!text.contains("listen_addr"), "{text}");
    }

    #[test]
    fn a_command_that_failed_reports_down_and_keeps_the_others() {
        let mut console = console();
        console.stats = None;
        let text = render(&console).encode();
        assert!(text.contains("pgbouncer_up 0\n"), "{text}");
        assert!(!text.contains("pgbouncer_stats_"), "{text}");
        assert!(text.contains("pgbouncer_pools_client_active_connections{"));
        let unreachable = render(&Console::default()).encode();
        assert!(unreachable.contains("pgbouncer_up 0\n"), "{unreachable}");
        assert_eq!(
            unreachable.lines().filter(|l| !l.starts_with('#')).count(),
            1
        );
    }

    #[test]
    fn every_rendered_name_is_listed() {
        let names = metric_names();
        let text = render(&console()).encode();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let name = &line[..line.find(['{', ' ']).unwrap()];
            assert!(names.contains(&name), "{name} not in metric_names()");
        }
    }
}
