//! Logs and traces: the process-wide `tracing` subscriber. Logs go to stderr through the fmt
//! layer, filtered by `LOG_LEVEL`. When an OTLP endpoint is configured, each routed statement's
//! [`ROUTED_QUERY_SPAN`] span is also exported to it as an OpenTelemetry trace (OTLP/HTTP
//! protobuf, batched on the tokio runtime). Without an endpoint there is no exporter, and the
//! debug-level span is disabled as before.
//!
//! What a span carries is decided here ([`query_text`], [`shards_touched`], [`record_error`]); the
//! session only records it. The query text never contains a literal of the statement: literals
//! are replaced by `?`, and a statement the scanner cannot strip with certainty has no text.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing::Span;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::plan::Plan;
use crate::plan::cache;

/// Name of the span of one routed statement (the only span exported).
pub const ROUTED_QUERY_SPAN: &str = "routed_query";

/// `service.name` when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "pg-router";

/// Path of the traces signal under a base OTLP/HTTP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`).
const TRACES_PATH: &str = "/v1/traces";

/// Stands in for the `$` of a bind parameter while the literal scanner runs (it refuses any `$`).
/// Ends in a word character, so the scanner does not take the parameter's digits for a literal.
const PARAMETER_MARKER: &str = "__pg_router_parameter_";

/// How the process logs and traces.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Log filter, in the syntax of `RUST_LOG` (`info`, `router=debug`).
    pub log_filter: String,
    /// Base OTLP/HTTP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`, for example
    /// `http://otel-collector:4318`); traces go to its `/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// Full OTLP/HTTP traces URL (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); wins over
    /// `otlp_endpoint`.
    pub otlp_traces_endpoint: Option<String>,
    /// `service.name` of the exported spans (`OTEL_SERVICE_NAME`).
    pub service_name: String,
}

/// Setting up logs and traces failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration (for example a malformed endpoint URL).
    #[error(
        "building the OTLP trace exporter for {endpoint}: {source}; check --otlp-endpoint / OTEL_EXPORTER_OTLP_*"
    )]
    Exporter {
        /// The traces URL.
        endpoint: String,
        /// Why.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// An `https://` endpoint: the exporter speaks plain HTTP only (no TLS stack is built in).
    #[error(
        "OTLP endpoint {endpoint}: only http:// is supported; export to a collector or agent nearby over plain HTTP"
    )]
    Https {
        /// The traces URL.
        endpoint: String,
    },
    /// Another global subscriber is installed already.
    #[error("installing the tracing subscriber: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

/// The installed subscriber's exporter, to flush on exit.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Is an OTLP exporter running?
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter. Blocks until done, so call it
    /// outside the async runtime (which must still be running: the exporter is a task on it).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing the OpenTelemetry traces on exit failed");
        }
    }
}

/// Installs the global subscriber: logs, plus trace export when an endpoint is configured. With
/// an endpoint it must run inside the tokio runtime (the batch span processor is a task on it).
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let logs = fmt::layer().with_filter(EnvFilter::new(&config.log_filter));
    let Some(endpoint) = traces_endpoint(
        config.otlp_endpoint.as_deref(),
        config.otlp_traces_endpoint.as_deref(),
    ) else {
        tracing_subscriber::registry().with(logs).try_init()?;
        return Ok(Telemetry { provider: None });
    };
    if endpoint
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    {
        return Err(TelemetryError::Https { endpoint });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            source,
        })?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter, Tokio).build())
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    // Only the routed-query spans, whatever LOG_LEVEL says: the span is at debug level so that it
    // costs nothing when nobody exports it, and events stay out of the traces (their messages
    // may carry row data).
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("pg-router"))
        .with_filter(
            filter_fn(|metadata| metadata.is_span() && metadata.name() == ROUTED_QUERY_SPAN)
                .with_max_level_hint(LevelFilter::DEBUG),
        );
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    tracing::info!(%endpoint, service = %config.service_name, "exporting OpenTelemetry traces");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The traces URL: the signal-specific endpoint as given, else the base endpoint with
/// `/v1/traces` appended (the OTLP exporter specification); `None` (no export) when neither is
/// set or both are empty.
pub fn traces_endpoint(base: Option<&str>, traces: Option<&str>) -> Option<String> {
    let traces = traces.map(str::trim).filter(|url| !url.is_empty());
    let base = base.map(str::trim).filter(|url| !url.is_empty());
    match (traces, base) {
        (Some(url), _) => Some(url.to_string()),
        (None, Some(url)) => Some(format!("{}{TRACES_PATH}", url.trim_end_matches('/'))),
        (None, None) => None,
    }
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
    use super::{query_text, traces_endpoint};

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

    #[test]
    fn traces_endpoint_prefers_the_signal_url() {
        assert_eq!(traces_endpoint(None, None), None);
        assert_eq!(traces_endpoint(Some(" "), Some("")), None);
        assert_eq!(
            traces_endpoint(Some("http://collector:4318/"), None).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            traces_endpoint(Some("http://collector:4318"), Some("http://other:9/t")).as_deref(),
            Some("http://other:9/t")
        );
    }
}
