//! `kubectl-pg`: parses the command line, connects as kubectl would, and runs the command. On
//! PATH, kubectl finds it as `kubectl pg`.

use clap::Parser;
use kubectl_pg::cli::Cli;
use kubectl_pg::commands::{self, Context};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32, kubectl_pg::Error> {
    cli.command.check()?;
    let (client, namespace) = kubectl_pg::connect::connect(&cli.kube).await?;
    commands::run(&Context { client, namespace }, cli.command).await
}
