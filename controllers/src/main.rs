//! `postgres-operator`: the operator manager. Parses the configuration and starts the run loop.

use clap::Parser;
use controllers::operator::{self, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    if config.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    operator::run(config).await?;
    Ok(())
}
