//! `pg-router`: the distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use router::{Router, RouterConfig};

/// The distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.
#[derive(Parser, Debug)]
#[command(name = "pg-router", version, about)]
struct Cli {
    /// Router configuration (TOML): listen address, shards, table groups, sharded and reference
    /// tables. Re-read on SIGHUP.
    #[arg(long, env = "PG_ROUTER_CONFIG")]
    config: PathBuf,
    /// Worker threads of the async runtime (0: one per CPU).
    #[arg(long, env = "PG_ROUTER_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `router=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cli.worker_threads > 0 {
        runtime.worker_threads(cli.worker_threads);
    }
    runtime.enable_all().build()?.block_on(run(cli))
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
