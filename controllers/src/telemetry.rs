//! Logs, traces and reconcile metrics of the operator. Every reconcile runs inside a
//! [`RECONCILE_SPAN`] span carrying the object's kind, namespace and name (so every log line of a
//! reconcile names its object); when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), those spans are exported as OpenTelemetry traces
//! (OTLP/HTTP protobuf, batched on the tokio runtime). Without an endpoint nothing is exported.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::postgres_cluster::Context;

/// Name of the span of one reconcile (the only span exported).
pub const RECONCILE_SPAN: &str = "reconcile";

/// `service.name` when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "postgres-operator";

/// Path of the traces signal under a base OTLP/HTTP endpoint.
const TRACES_PATH: &str = "/v1/traces";

/// How the process logs and traces.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Log filter, in the syntax of `RUST_LOG`.
    pub log_filter: String,
    /// Log as JSON lines.
    pub log_json: bool,
    /// Base OTLP/HTTP endpoint (`http://otel-collector:4318`); traces go to its `/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// Full OTLP/HTTP traces URL; wins over `otlp_endpoint`.
    pub otlp_traces_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
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

/// The installed exporter, to flush on exit.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued and stops the exporter. Blocks until done: call it from a
    /// blocking thread while the runtime still runs (the exporter is a task on it).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing the OpenTelemetry traces on exit failed");
        }
    }
}

/// The traces URL: the signal-specific endpoint as given, else the base endpoint with
/// `/v1/traces` appended (the OTLP exporter specification); `None` when neither is set.
pub fn traces_endpoint(base: Option<&str>, traces: Option<&str>) -> Option<String> {
    let traces = traces.map(str::trim).filter(|url| !url.is_empty());
    let base = base.map(str::trim).filter(|url| !url.is_empty());
    match (traces, base) {
        (Some(url), _) => Some(url.to_string()),
        (None, Some(url)) => Some(format!("{}{TRACES_PATH}", url.trim_end_matches('/'))),
        (None, None) => None,
    }
}

/// Installs the global subscriber: logs (text or JSON), plus trace export when an endpoint is
/// configured. With an endpoint it must run inside the tokio runtime.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
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
            opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    // Only the reconcile spans, whatever LOG_LEVEL says; events stay out of the traces.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("postgres-operator"))
        .with_filter(filter_fn(|metadata| {
            metadata.is_span() && metadata.name() == RECONCILE_SPAN
        }));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    tracing::info!(%endpoint, service = %config.service_name, "exporting OpenTelemetry traces");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// What a wrapped reconcile function returns.
pub type ReconcileFuture<E> = Pin<Box<dyn Future<Output = Result<Action, E>> + Send>>;

/// The span of one reconcile of `object`.
fn reconcile_span<K: Resource<DynamicType = ()>>(object: &K) -> tracing::Span {
    let kind = K::kind(&());
    tracing::info_span!(
        RECONCILE_SPAN,
        "otel.name" = %format!("reconcile {kind}"),
        kind = %kind,
        namespace = object.meta().namespace.as_deref().unwrap_or_default(),
        name = %object.name_any(),
        "otel.status_code" = Empty,
        "otel.status_description" = Empty,
    )
}

async fn run_in_span<F, E>(span: tracing::Span, future: F) -> Result<Action, E>
where
    F: Future<Output = Result<Action, E>>,
    E: std::fmt::Display,
{
    let result = future.instrument(span.clone()).await;
    if let Err(error) = &result {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", error.to_string());
    }
    result
}

/// Wraps a reconcile function so that each call runs in a [`RECONCILE_SPAN`] span with the
/// object's kind, namespace and name, marked as an error when the reconcile fails.
pub fn traced<K, F, Fut, E>(reconcile: F) -> impl FnMut(Arc<K>, Arc<Context>) -> ReconcileFuture<E>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    move |object, ctx| {
        let span = reconcile_span(object.as_ref());
        Box::pin(run_in_span(span, reconcile(object, ctx)))
    }
}

/// [`traced`], and the reconcile's duration and result recorded in the operator's metrics under
/// the lowercase kind (for reconcilers that do not record them themselves).
pub fn traced_and_measured<K, F, Fut, E>(
    reconcile: F,
) -> impl FnMut(Arc<K>, Arc<Context>) -> ReconcileFuture<E>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    move |object, ctx| {
        let span = reconcile_span(object.as_ref());
        let controller = K::kind(&()).to_lowercase();
        let metrics = ctx.clone();
        let future = reconcile(object, ctx);
        Box::pin(async move {
            let started = Instant::now();
            let result = run_in_span(span, future).await;
            metrics
                .metrics
                .observe_reconcile(&controller, started.elapsed(), result.is_ok());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_endpoint_follows_the_otlp_variables() {
        assert_eq!(traces_endpoint(None, None), None);
        assert_eq!(traces_endpoint(Some(" "), Some("")), None);
        assert_eq!(
            traces_endpoint(Some("http://collector:4318/"), None).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            traces_endpoint(Some("http://a:4318"), Some("http://b:4318/traces")).as_deref(),
            Some("http://b:4318/traces")
        );
    }
}
