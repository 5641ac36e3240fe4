//! `pg-instance`: the instance manager that supervises PostgreSQL in one pod (election,
//! failover, fencing); with `pooler-exporter` as first argument the Pooler pods' metrics
//! exporter; with `volume-backup` / `volume-restore` the operator's Jobs that take a base backup
//! into a volume and restore one. This file only parses the configuration and starts the run loop.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    use instance::pooler::exporter;
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == exporter::SUBCOMMAND)
    {
        return pooler_exporter(exporter::ExporterConfig::parse_from(
            std::env::args_os().skip(1),
        ));
    }
    use api::contract::volume_backup::{BACKUP_SUBCOMMAND, RESTORE_SUBCOMMAND};
    let first = std::env::args_os().nth(1);
    if first.as_deref().is_some_and(|arg| arg == BACKUP_SUBCOMMAND) {
        let config = instance::volume_backup::BackupConfig::parse_from(std::env::args_os().skip(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(instance::volume_backup::backup(config));
    }
    if first
        .as_deref()
        .is_some_and(|arg| arg == RESTORE_SUBCOMMAND)
    {
        let config =
            instance::volume_backup::RestoreConfig::parse_from(std::env::args_os().skip(1));
        return instance::volume_backup::restore(&config).inspect_err(|error| {
            // What the operator shows in the cluster's condition (the kubelet keeps the file).
            let _ = std::fs::write("/dev/termination-log", format!("{error:#}"));
        });
    }
    let config = instance::Config::parse();
    init_logs(&config.log_level, config.log_json);
    // Forked while this process has one thread: before the runtime's threads exist.
    let fence = instance::watchdog::Fence::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let span = tracing::info_span!(
        "instance",
        cluster = %config.cluster,
        namespace = %config.namespace,
        instance = %config.pod_name
    );
    let _entered = span.enter();
    runtime.block_on(instance::run(config, Some(fence)))?;
    Ok(())
}

/// `pg-instance pooler-exporter`: PgBouncer's admin console on `/metrics`.
fn pooler_exporter(config: instance::pooler::exporter::ExporterConfig) -> anyhow::Result<()> {
    init_logs(&config.log_level, config.log_json);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(instance::pooler::exporter::run(config))?;
    Ok(())
}

/// Logs to stdout: JSON lines in pods (`LOG_JSON`), text otherwise.
fn init_logs(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::new(level);
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(true)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
    }
}
