//! `pg-router`: the distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use router::telemetry::{self, TelemetryConfig};
use router::{Router, RouterConfig};

/// The distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.
#[derive(Parser, Debug)]
#[command(name = "pg-router", version, about)]
struct Cli {
    /// Router configuration (TOML): listen address, shards, table groups, sharded and reference
    /// tables. Re-read on SIGHUP.
    #[arg(long, env = "PG_ROUTER_CONFIG")]
    config: PathBuf,
    /// Worker threads of the async runtime. 1: a single-threaded runtime (no cross-thread
    /// wake-ups); 0 (auto): single-threaded on up to 2 CPUs, where the router shares the cores with
    /// its clients and shards and measured fastest that way, else one worker per CPU.
    #[arg(long, env = "PG_ROUTER_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `router=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// OTLP/HTTP endpoint to export traces to (for example `http://otel-collector:4318`; spans
    /// go to its `/v1/traces`). Unset: no trace export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Full OTLP/HTTP traces URL; wins over `--otlp-endpoint`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    otlp_traces_endpoint: Option<String>,
    /// `service.name` of the exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = telemetry::DEFAULT_SERVICE_NAME)]
    service_name: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let single = cli.worker_threads == 1 || (cli.worker_threads == 0 && cpus <= 2);
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if cli.worker_threads > 1 {
        builder.worker_threads(cli.worker_threads);
    }
    let runtime = builder.enable_all().build()?;
    let telemetry = {
        // The trace exporter is a task on this runtime.
        let _entered = runtime.enter();
        telemetry::init(&TelemetryConfig {
            log_filter: cli.log_level.clone(),
            otlp_endpoint: cli.otlp_endpoint.clone(),
            otlp_traces_endpoint: cli.otlp_traces_endpoint.clone(),
            service_name: cli.service_name.clone(),
        })?
    };
    let outcome = runtime.block_on(run(cli));
    // After the run loop, with the runtime still driven: the shutdown blocks until the batch
    // task (on this runtime, which may be single-threaded) has exported the last spans.
    let _ =
        runtime.block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await });
    outcome
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = RouterConfig::from_file(&cli.config).context("loading the router config")?;
    let router = Router::start(config, Some(cli.config.clone())).await?;
    println!("pg-router listening on {}", router.address());
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => match router.reload_file() {
                Ok(()) => tracing::info!("configuration reloaded"),
                Err(error) => tracing::error!(%error, "reloading the configuration failed; keeping the old one"),
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(())
}
