//! `postgres-operator`: the operator manager. Parses the configuration and starts the run loop.

use clap::Parser;
use controllers::operator::{self, Config};
use controllers::telemetry::{self, TelemetryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = telemetry::init(&TelemetryConfig {
        log_filter: config.log_level.clone(),
        log_json: config.log_json,
        otlp_endpoint: config.otlp_endpoint.clone(),
        otlp_traces_endpoint: config.otlp_traces_endpoint.clone(),
        service_name: config.otel_service_name.clone(),
    })?;
    let outcome = operator::run(config).await;
    // Export the spans still queued; the exporter is a task on this runtime, so flush from a
    // blocking thread while the runtime runs.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    outcome?;
    Ok(())
}
