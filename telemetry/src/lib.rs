//! The process-wide `tracing` subscriber of the operator and of pg-router: logs (text or JSON
//! lines) filtered like `RUST_LOG`, plus, when an OTLP endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), the export of one
//! named span as OpenTelemetry traces (OTLP/HTTP protobuf, batched on the tokio runtime). Each
//! binary says which span it exports (the operator's reconcile, the router's routed statement)
//! and what its spans carry; the set-up is the same, so it lives here once.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Path of the traces signal under a base OTLP/HTTP endpoint.
const TRACES_PATH: &str = "/v1/traces";

/// How the process logs and traces.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Log filter, in the syntax of `RUST_LOG` (`info`, `router=debug`).
    pub log_filter: String,
    /// Log as JSON lines.
    pub log_json: bool,
    /// Base OTLP/HTTP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`, for example
    /// `http://otel-collector:4318`); traces go to its `/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// Full OTLP/HTTP traces URL (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); wins over
    /// `otlp_endpoint`.
    pub otlp_traces_endpoint: Option<String>,
    /// `service.name` of the exported spans (`OTEL_SERVICE_NAME`).
    pub service_name: String,
}

/// Which spans go to the exporter.
#[derive(Clone, Copy, Debug)]
pub struct ExportedSpan {
    /// The only span name exported; events never are (their messages may carry row data).
    pub name: &'static str,
    /// The most verbose level such a span has: a span below the log filter's level is still
    /// created for the exporter (pg-router's is at debug so that it costs nothing unexported).
    pub max_level: LevelFilter,
    /// Name of the tracer (the instrumentation scope).
    pub tracer: &'static str,
}

/// Setting up logs and traces failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration (for example a malformed endpoint URL).
    #[error(
        "building the OTLP trace exporter for {endpoint}: {source}; check OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
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

    /// Exports the spans still queued and stops the exporter. Blocks until done: call it from a
    /// blocking thread or outside the async runtime, while the runtime still runs (the exporter
    /// is a task on it).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing the OpenTelemetry traces on exit failed");
        }
    }
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

/// Installs the global subscriber: logs, plus the export of `span` when an endpoint is
/// configured. With an endpoint it must run inside the tokio runtime (the batch span processor
/// is a task on it).
pub fn init(config: &TelemetryConfig, span: ExportedSpan) -> Result<Telemetry, TelemetryError> {
    let logs = if config.log_json {
        fmt::layer().json().boxed()
    } else {
        fmt::layer().boxed()
    }
    .with_filter(EnvFilter::new(&config.log_filter));
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
    // Only the named spans, whatever the log filter says.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(span.tracer))
        .with_filter(
            filter_fn(move |metadata| metadata.is_span() && metadata.name() == span.name)
                .with_max_level_hint(span.max_level),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_follows_the_otlp_exporter_rules() {
        assert_eq!(traces_endpoint(None, None), None);
        assert_eq!(traces_endpoint(Some(" "), Some("")), None);
        assert_eq!(
            traces_endpoint(Some("http://collector:4318/"), None).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            traces_endpoint(Some("http://a:4318"), Some("http://b:4318/custom")).as_deref(),
            Some("http://b:4318/custom")
        );
    }
}
