//! `postgres-operator`: The operator manager: reconciles PostgresCluster and friends into running PostgreSQL.

use clap::Parser;

/// The operator manager: reconciles PostgresCluster and friends into running PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "postgres-operator", version, about)]
struct Cli {
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `controllers=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .init();
    anyhow::bail!("postgres-operator: the run loop is not built yet (see the open issues)")
}
