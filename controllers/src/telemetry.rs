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
use tracing::Instrument;
use tracing::field::Empty;
use tracing::level_filters::LevelFilter;

use crate::postgres_cluster::Context;

/// Name of the span of one reconcile (the only span exported).
pub const RECONCILE_SPAN: &str = "reconcile";

/// `service.name` when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "postgres-operator";

pub use telemetry::{Telemetry, TelemetryConfig, TelemetryError, traces_endpoint};

/// Installs the global subscriber: logs (text or JSON), plus the export of the reconcile spans
/// when an endpoint is configured. With an endpoint it must run inside the tokio runtime.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    telemetry::init(
        config,
        telemetry::ExportedSpan {
            name: RECONCILE_SPAN,
            max_level: LevelFilter::INFO,
            tracer: "postgres-operator",
        },
    )
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

/// Runs `controller` until `shutdown` resolves (in-flight reconciles finish first) with
/// `reconcile` (one of [`traced`], [`traced_and_measured`]); the controller's own stream
/// errors (a watch that restarts, a reconcile error already logged by `error_policy`) are logged
/// at debug under `name`.
pub async fn run_until_shutdown<K, E>(
    controller: kube::runtime::Controller<K>,
    name: &'static str,
    reconcile: impl FnMut(Arc<K>, Arc<Context>) -> ReconcileFuture<E>,
    error_policy: impl Fn(Arc<K>, &E, Arc<Context>) -> Action,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    K: Clone
        + Resource<DynamicType = ()>
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    E: std::error::Error + Send + 'static,
{
    use futures::StreamExt;
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, controller = name, "controller event");
            }
        })
        .await;
}
