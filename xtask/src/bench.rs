//! `cargo xtask bench <name>`: each benchmark lives in its crate as a `harness = false` bench
//! target that prints `name=value` lines; this only installs the test bed and runs it.

use clap::ValueEnum;

/// The benchmarks, by the crate that owns them.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Bench {
    /// Instance manager: failover and switchover times (kill the primary N times).
    Failover,
    /// Operator: reconcile 1000 PostgresClusters on the real API server.
    Operator,
    /// pg-router: pgbench direct vs router vs PgBouncer, then PgBouncer with the Pooler's
    /// configuration vs direct.
    Router,
    /// Backups: barman-cloud backup and restore throughput vs pg_basebackup, archiving lag.
    Backup,
    /// ShardSplitJob: a 1 GiB range split under writes through pg-router (`BENCH_RESHARD_MIB`).
    Reshard,
    /// Chaos and soak: random faults (lost pods, switchovers, API partitions, crashes) under a
    /// writer for `CHAOS_SECONDS` (default 300); no acknowledged write may be lost.
    Chaos,
}

impl Bench {
    fn target(self) -> (&'static str, &'static str) {
        match self {
            Bench::Failover => ("instance", "failover"),
            Bench::Operator => ("controllers", "operator"),
            Bench::Router => ("router", "router"),
            Bench::Backup => ("instance", "backup"),
            Bench::Reshard => ("controllers", "reshard"),
            Bench::Chaos => ("instance", "chaos"),
        }
    }
}

/// Runs one benchmark.
pub fn run(bench: Bench) -> anyhow::Result<()> {
    crate::setup::install_servers()?;
    let (package, target) = bench.target();
    if let Bench::Reshard = bench {
        // The bench runs the real router binary, found beside it in the release folder.
        crate::cargo(&[
            "build",
            "--release",
            "--package",
            "router",
            "--bin",
            "pg-router",
        ])?;
    }
    crate::cargo(&["bench", "--package", package, "--bench", target])?;
    if let Bench::Router = bench {
        // The same pgbench against a PgBouncer running the Pooler reconciler's configuration.
        crate::cargo(&["bench", "--package", "instance", "--bench", "pooler"])?;
    }
    Ok(())
}
