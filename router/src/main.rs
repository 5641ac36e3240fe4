//! `pg-router`: the distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use router::telemetry::{self, TelemetryConfig};
use router::{Router, RouterConfig};

/// The distributed-SQL router: speaks the PostgreSQL protocol and routes to shards.
#[derive(Parser, Debug)]
#[command(name = "pg-router", version, about)]
struct Cli {
    /// Router configuration (TOML): listen address, shards, table groups, sharded and reference
    /// tables. Re-read on SIGHUP.
    #[arg(
        long,
        env = "PG_ROUTER_CONFIG",
        required_unless_present = "kubernetes_cluster"
    )]
    config: Option<PathBuf>,
    /// Kubernetes mode: route for this sharded PostgresCluster, from its ShardRange objects and
    /// its shards' primaries, following their changes live (instead of `--config`).
    #[arg(long, env = "PG_ROUTER_KUBERNETES_CLUSTER", conflicts_with = "config")]
    kubernetes_cluster: Option<String>,
    /// Kubernetes mode: namespace of the cluster.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Kubernetes mode: address the PostgreSQL frontend listens on.
    #[arg(long, env = "PG_ROUTER_LISTEN", default_value = "0.0.0.0:5432")]
    listen: String,
    /// Kubernetes mode: address of `/metrics`.
    #[arg(long, env = "PG_ROUTER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Kubernetes mode: TLS certificate chain (PEM) for clients; with `--tls-key-file`.
    #[arg(long, env = "PG_ROUTER_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// Kubernetes mode: its private key (PEM).
    #[arg(long, env = "PG_ROUTER_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Kubernetes mode: login on the shards (the cluster's superuser Secret).
    #[arg(long, env = "PG_ROUTER_BACKEND_USER", default_value = "postgres")]
    backend_user: String,
    /// Kubernetes mode: its password (from the environment; never logged).
    #[arg(long, env = "PG_ROUTER_BACKEND_PASSWORD", hide_env_values = true)]
    backend_password: Option<String>,
    /// Kubernetes mode: how long (milliseconds) a write to a range paused for a split's
    /// cut-over waits for the range to be active again before it fails with SQLSTATE 40001
    /// (`[backend] write_pause_hold_ms` in the TOML file).
    #[arg(long, env = "PG_ROUTER_WRITE_PAUSE_HOLD_MS", default_value_t = 5000)]
    write_pause_hold_ms: u64,
    /// Kubernetes mode: seconds the router waits on a silent API server connection before it
    /// gives up on it and opens another (a connection that died without a word would otherwise
    /// hold a read forever); its watches are renewed 10 seconds before that (at least 15).
    #[arg(long, env = "PG_ROUTER_API_TIMEOUT_SECONDS", default_value_t = router::kubernetes::DEFAULT_API_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(router::kubernetes::MIN_API_TIMEOUT.as_secs()..))]
    api_timeout_seconds: u64,
    /// Worker threads of the async runtime. 1: a single-threaded runtime (no cross-thread
    /// wake-ups); 0 (auto): single-threaded on up to 2 CPUs, where the router shares the cores with
    /// its clients and shards and measured fastest that way, else one worker per CPU.
    #[arg(long, env = "PG_ROUTER_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `router=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// OTLP/HTTP endpoint to export traces to (for example `http://otel-collector:4318`; spans
    /// go to its `/v1/traces`). Unset: no trace export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Full OTLP/HTTP traces URL; wins over `--otlp-endpoint`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    otlp_traces_endpoint: Option<String>,
    /// `service.name` of the exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = telemetry::DEFAULT_SERVICE_NAME)]
    service_name: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let single = cli.worker_threads == 1 || (cli.worker_threads == 0 && cpus <= 2);
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if cli.worker_threads > 1 {
        builder.worker_threads(cli.worker_threads);
    }
    let runtime = builder.enable_all().build()?;
    let telemetry = {
        // The trace exporter is a task on this runtime.
        let _entered = runtime.enter();
        telemetry::init(&TelemetryConfig {
            log_filter: cli.log_level.clone(),
            log_json: false,
            otlp_endpoint: cli.otlp_endpoint.clone(),
            otlp_traces_endpoint: cli.otlp_traces_endpoint.clone(),
            service_name: cli.service_name.clone(),
        })?
    };
    let outcome = runtime.block_on(run(cli));
    // After the run loop, with the runtime still driven: the shutdown blocks until the batch
    // task (on this runtime, which may be single-threaded) has exported the last spans.
    let _ =
        runtime.block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await });
    outcome
}

/// Kubernetes mode: the topology from the API server, followed live.
async fn start_in_kubernetes(cli: &Cli, cluster: &str) -> anyhow::Result<Router> {
    use router::kubernetes::{KubernetesSource, auth::LoginSource};
    use router::topology::{BackendConfig, UserConfig};
    let api_timeout = std::time::Duration::from_secs(cli.api_timeout_seconds);
    let client = router::kubernetes::client(api_timeout)
        .await
        .context("connecting to the Kubernetes API server")?;
    let source = KubernetesSource::new(client.clone(), &cli.namespace, cluster)
        .with_api_timeout(api_timeout);
    let topology = source
        .initial_topology(std::time::Duration::from_secs(600))
        .await?;
    let backend_login = cli.backend_password.clone().map(|password| UserConfig {
        name: cli.backend_user.clone(),
        password,
    });
    let mut logins = LoginSource::new(client.clone(), &cli.namespace, cluster, backend_login)
        .with_api_timeout(api_timeout);
    let config = RouterConfig {
        listen: cli.listen.clone(),
        metrics_listen: cli.metrics_listen.clone(),
        auth: logins.initial().await?,
        tls: match (&cli.tls_cert_file, &cli.tls_key_file) {
            (Some(cert_file), Some(key_file)) => Some(router::topology::TlsConfig {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            }),
            _ => None,
        },
        backend: BackendConfig {
            user: cli.backend_user.clone(),
            password: cli.backend_password.clone(),
            write_pause_hold_ms: cli.write_pause_hold_ms,
            ..BackendConfig::default()
        },
        shards: Vec::new(),
        table_groups: Vec::new(),
        sharded_tables: Vec::new(),
        reference_tables: Vec::new(),
    };
    let router = Router::start_with_topology(config, topology, None).await?;
    tokio::spawn(source.follow(router.state().clone()));
    tokio::spawn(logins.follow(router.logins().clone()));
    Ok(router)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let router = match (&cli.kubernetes_cluster, &cli.config) {
        (Some(cluster), _) => start_in_kubernetes(&cli, cluster).await?,
        (None, Some(path)) => {
            let config = RouterConfig::from_file(path).context("loading the router config")?;
            Router::start(config, Some(path.clone())).await?
        }
        (None, None) => anyhow::bail!("set --config or --kubernetes-cluster"),
    };
    // Read back by whoever started the router on port 0 (the tests do): the metrics line first,
    // so that it is there once the frontend's line is.
    if let Some(metrics) = router.metrics_address() {
        println!("pg-router metrics on {metrics}");
    }
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
