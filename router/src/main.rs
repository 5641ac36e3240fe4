//! `pg-router`: The distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.

use clap::Parser;

/// The distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.
#[derive(Parser, Debug)]
#[command(name = "pg-router", version, about)]
struct Cli {
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `router=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .init();
    anyhow::bail!("pg-router: the run loop is not built yet (see the open issues)")
}
