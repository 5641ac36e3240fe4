//! Logs and traces: the process-wide `tracing` subscriber. Logs go to stderr through the fmt
//! layer, filtered by `LOG_LEVEL`. When an OTLP endpoint is configured, each routed statement's
//! [`ROUTED_QUERY_SPAN`] span is also exported to it as an OpenTelemetry trace (OTLP/HTTP
//! protobuf, batched on the tokio runtime). Without an endpoint there is no exporter, and the
//! debug-level span is disabled as before.
//!
//! What a span carries is decided here ([`query_text`], [`shards_touched`], [`record_error`]); the
//! session only records it. The query text never contains a literal of the statement: literals
//! are replaced by `?`, and a statement the scanner cannot strip with certainty has no text.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Span;
use tracing::level_filters::LevelFilter;

use crate::plan::Plan;
use crate::plan::cache;

/// Name of the span of one routed statement (the only span exported).
pub const ROUTED_QUERY_SPAN: &str = "routed_query";

/// `service.name` when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "pg-router";

/// Stands in for the `$` of a bind parameter while the literal scanner runs (it refuses any `$`).
/// Ends in a word character, so the scanner does not take the parameter's digits for a literal.
const PARAMETER_MARKER: &str = "__pg_router_parameter_";

pub use telemetry::{Telemetry, TelemetryConfig, TelemetryError, traces_endpoint};

/// Installs the global subscriber: logs, plus the export of the routed-query spans when an
/// endpoint is configured. With an endpoint it must run inside the tokio runtime (the batch span
/// processor is a task on it).
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let telemetry = telemetry::init(
        config,
        telemetry::ExportedSpan {
            name: ROUTED_QUERY_SPAN,
            // At debug level, so that the span costs nothing when nobody exports it.
            max_level: LevelFilter::DEBUG,
            tracer: "pg-router",
        },
    )?;
    EXPORTING.store(telemetry.exporting(), Ordering::Relaxed);
    Ok(telemetry)
}

/// Set by [`init`] when spans are exported.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether [`ROUTED_QUERY_SPAN`] spans are exported (an OTLP endpoint is configured):
/// statements then take the general path, which records them. (A flag rather than a probe span:
/// a probe would itself be exported.)
pub fn routed_query_spans_enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// `db.query.text` of a statement: every integer and string literal replaced by `?`, bind
/// parameters (`$1`) kept. `None` when the literal scanner cannot tell every literal with
/// certainty (comments, escape strings, dollar quoting, non-integer numbers, several
/// statements): then the span has no query text rather than one that may leak a value.
pub fn query_text(sql: &str) -> Option<String> {
    // Outside quotes `$` and a digit is always a bind parameter (a dollar-quote tag cannot start
    // with a digit); inside a string literal the marker is removed with the literal.
    let mut hidden = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(position) = rest.find('$') {
        hidden.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            hidden.push_str(PARAMETER_MARKER);
        } else {
            hidden.push('$');
        }
        rest = after;
    }
    hidden.push_str(rest);
    let shape = cache::normalize(&hidden)?.shape;
    // The shape's own `$n` are the removed literals.
    let mut text = String::with_capacity(shape.len());
    let mut chars = shape.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.next_if(char::is_ascii_digit).is_some() {}
            text.push('?');
        } else {
            text.push(c);
        }
    }
    Some(text.replace(PARAMETER_MARKER, "$"))
}

/// How many shards a plan runs on, out of `shard_count`; `None` when the session answers it or
/// the shards are only known while it runs (split INSERT, COPY).
pub fn shards_touched(plan: &Plan, shard_count: usize) -> Option<usize> {
    match plan {
        Plan::Single(_) => Some(1),
        Plan::Scatter { shards, .. } => Some(shards.as_ref().map_or(shard_count, Vec::len)),
        Plan::Broadcast => Some(shard_count),
        Plan::CopyOut(copy) => Some(if copy.shard.is_some() { 1 } else { shard_count }),
        Plan::Transaction(_)
        | Plan::MultiStage(_)
        | Plan::InsertSelect(_)
        | Plan::DrawKeys(_)
        | Plan::Explain(_)
        | Plan::CopyQuery(_)
        | Plan::BoundSubqueries(_)
        | Plan::Setting
        | Plan::Insert(_)
        | Plan::Deallocate
        | Plan::Savepoint(_)
        | Plan::CopyIn(..) => None,
    }
}

/// Marks the current routed-query span failed with `sqlstate`. The error message is left out: it
/// may quote row values.
pub fn record_error(sqlstate: &str) {
    let span = Span::current();
    span.record("db.response.status_code", sqlstate);
    span.record("error.type", sqlstate);
    span.record("otel.status_code", "error");
}

#[cfg(test)]
mod tests {
    use super::query_text;

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            query_text("SELECT name FROM customers WHERE id = 42 AND name = 's3cr3t'").as_deref(),
            Some("SELECT name FROM customers WHERE id = ? AND name = ?")
        );
        assert_eq!(
            query_text("INSERT INTO t VALUES ('it''s', 7);").as_deref(),
            Some("INSERT INTO t VALUES (?, ?)")
        );
    }

    #[test]
    fn bind_parameters_are_kept_and_literals_beside_them_removed() {
        assert_eq!(
            query_text("SELECT * FROM t WHERE a = $1 AND b = 'x$2' AND c = $12").as_deref(),
            Some("SELECT * FROM t WHERE a = $1 AND b = ? AND c = $12")
        );
    }

    #[test]
    fn statements_the_scanner_cannot_strip_have_no_text() {
        for sql in [
            "SELECT $$s3cr3t$$",
            "SELECT $tag$s3cr3t$tag$",
            "SELECT E's3cr3t'",
            "SELECT 1.5",
            "SELECT 1 -- s3cr3t",
            "SELECT 1 /* s3cr3t */",
            "SELECT 's3cr3t'; SELECT 2",
            "SELECT 'unterminated",
        ] {
            assert_eq!(query_text(sql), None, "{sql}");
        }
    }
}
