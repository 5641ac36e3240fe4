//! `pg-instance`: The instance manager: supervises PostgreSQL in one pod (election, failover, fencing).

use clap::Parser;

/// The instance manager: supervises PostgreSQL in one pod (election, failover, fencing).
#[derive(Parser, Debug)]
#[command(name = "pg-instance", version, about)]
struct Cli {
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `instance=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .init();
    anyhow::bail!("pg-instance: the run loop is not built yet (see the open issues)")
}
