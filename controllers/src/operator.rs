//! The operator's run loop: HTTP endpoints (`/healthz`, `/readyz`, `/metrics`), leader election,
//! then the controllers until a signal or the loss of the Lease.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};
use rand::Rng;

use crate::leader::{LeaderElector, LeaderError, LeaseTiming};
use crate::metrics::Metrics;
use crate::postgres_cluster::{self, Context, Settings};

/// Configuration of the operator binary (flags and environment variables).
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "postgres-operator",
    version,
    about = "The operator manager: reconciles PostgresCluster and friends into running PostgreSQL."
)]
pub struct Config {
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `controllers=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log as JSON lines (structured fields) instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// Address of the HTTP server with /healthz, /readyz and /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Run the controllers only while holding the leader Lease (for more than one replica).
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "LEADER_ELECTION_LEASE",
        default_value = "postgres-operator-leader"
    )]
    pub lease_name: String,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Identity in the leader Lease; the pod name plus a random suffix when unset.
    #[arg(long, env = "LEADER_ELECTION_IDENTITY")]
    pub identity: Option<String>,
    /// Validity of the leader Lease, in seconds.
    #[arg(long, env = "LEADER_ELECTION_LEASE_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Watch only this namespace; every namespace when unset.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Image with the instance manager binary (`/usr/local/bin/pg-instance`), copied into each
    /// PostgreSQL pod by an init container.
    #[arg(
        long,
        env = "INSTANCE_MANAGER_IMAGE",
        default_value = "ghcr.io/keiailab/postgres-operator/pg-instance:latest"
    )]
    pub instance_manager_image: String,
    /// Reconciliations run at the same time.
    #[arg(long, env = "RECONCILE_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    /// Periodic resync of a healthy cluster, in seconds.
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// Seconds the operator waits on a silent API server connection before it gives up on it
    /// and opens another (a connection that died without a word would otherwise hold a request
    /// forever); the API server ends its watches 10 seconds before that (at least 15). The
    /// default is the API server's own limit on a request (`--request-timeout`, 60 s): an
    /// answer that has not begun by then is not coming.
    #[arg(long, env = "API_TIMEOUT_SECONDS", default_value_t = DEFAULT_API_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(crate::watches::MIN_API_TIMEOUT.as_secs()..))]
    pub api_timeout_seconds: u64,
    /// Base OTLP/HTTP endpoint (`http://otel-collector:4318`): reconcile spans are exported to
    /// its `/v1/traces`. No traces are exported when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Full OTLP/HTTP traces URL; wins over `--otlp-endpoint`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_traces_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = crate::telemetry::DEFAULT_SERVICE_NAME)]
    pub otel_service_name: String,
    /// Validity of the server and client certificates the operator issues (or asks cert-manager
    /// for), in seconds (90 days).
    #[arg(long, env = "TLS_CERTIFICATE_SECONDS", default_value_t = 90 * 86400)]
    pub tls_certificate_seconds: u64,
    /// A certificate with less than this left is renewed, in seconds (30 days).
    #[arg(long, env = "TLS_RENEW_BEFORE_SECONDS", default_value_t = 30 * 86400)]
    pub tls_renew_before_seconds: u64,
    /// Validity of each cluster's operator CA, in seconds (10 years).
    #[arg(long, env = "TLS_CA_SECONDS", default_value_t = 10 * 365 * 86400)]
    pub tls_ca_seconds: u64,
    /// How long a renewed CA is published next to the old one (in every `ca.crt`) before it
    /// signs the certificates, in seconds (7 days; at most half of the renewal threshold).
    /// Applications that read `<cluster>-ca` must read it again within this time.
    #[arg(long, env = "TLS_CA_OVERLAP_SECONDS", default_value_t = 7 * 86400)]
    pub tls_ca_overlap_seconds: u64,
}

/// The default of `--api-timeout-seconds`.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(60);

/// An API client on which a read that waits `timeout` without a byte fails and the request's
/// connection is dropped. kube's client has no read timeout of its own and no HTTP/2 health
/// ping like client-go's: a request sent on a pooled connection that a load balancer or NAT
/// forgot waited for ever (and watches are ended before this timeout: see `crate::watches`).
/// Each call builds its own connection pool.
async fn api_client(timeout: Duration) -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    kube::Client::try_from(config)
}

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// No client could be built or the API server did not answer.
    #[error("connecting to the Kubernetes API server: {0}")]
    Client(#[source] kube::Error),
    /// The HTTP address could not be bound.
    #[error("binding the HTTP server to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Leadership was lost: the process exits so that it restarts as a candidate.
    #[error(transparent)]
    Leader(#[from] LeaderError),
}

/// What the HTTP endpoints report.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

/// The HTTP router of the operator's endpoints.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "postgres-operator".to_string());
    let suffix: String = rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(6)
        .map(char::from)
        .collect();
    format!("{base}-{}", suffix.to_lowercase())
}

/// Runs the operator until SIGTERM / Ctrl-C (`Ok`) or the loss of leadership (`Err`).
pub async fn run(config: Config) -> Result<(), OperatorError> {
    let api_timeout = Duration::from_secs(config.api_timeout_seconds);
    let client = api_client(api_timeout)
        .await
        .map_err(OperatorError::Client)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health {
        ready: AtomicBool::new(false),
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| OperatorError::Bind {
            addr: config.http_addr,
            source,
        })?;
    tracing::info!(addr = %config.http_addr, "serving /healthz, /readyz and /metrics");
    let app = router(health.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "HTTP server stopped");
        }
    });

    let version = client
        .apiserver_version()
        .await
        .map_err(OperatorError::Client)?;
    tracing::info!(kubernetes = %version.git_version, "connected to the API server");
    health.ready.store(true, Ordering::Relaxed);

    let identity = config.identity.clone().unwrap_or_else(default_identity);
    // The Lease has a client of its own: its renewals then never wait behind, or reuse, the
    // controllers' pooled connections, so a connection that dies without a word costs at most
    // one renewal attempt (see `LeaderElector::keep`), not leadership.
    let lease_client = api_client(api_timeout)
        .await
        .map_err(OperatorError::Client)?;
    let elector = config.leader_elect.then(|| {
        let lease_duration = Duration::from_secs(config.lease_duration_seconds.max(2));
        LeaderElector::new(
            Api::<Lease>::namespaced(lease_client, &config.lease_namespace),
            &config.lease_name,
            &identity,
            LeaseTiming {
                lease_duration,
                retry_period: lease_duration / 5,
                renew_deadline: lease_duration * 2 / 3,
            },
        )
    });
    if let Some(elector) = &elector {
        tracing::info!(%identity, lease = %config.lease_name, "waiting for the leader Lease");
        tokio::select! {
            result = elector.acquire() => result?,
            _ = shutdown_signal() => return Ok(()),
        }
        tracing::info!(%identity, "became the leader");
    }
    metrics.set_leader(true);

    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "postgres-operator".to_string(),
                instance: Some(identity.clone()),
            },
        ),
        client,
        metrics: metrics.clone(),
        settings: Settings {
            instance_manager_image: config.instance_manager_image.clone(),
            resync: Duration::from_secs(config.resync_seconds.max(10)),
            api_timeout,
            tls: crate::tls::certificates::Lifetimes {
                leaf: Duration::from_secs(config.tls_certificate_seconds),
                renew_before: Duration::from_secs(config.tls_renew_before_seconds),
                ca: Duration::from_secs(config.tls_ca_seconds),
                ca_overlap: Duration::from_secs(config.tls_ca_overlap_seconds),
            },
        },
    });
    let (stop_backups, backups_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(crate::backup_job::run(
        ctx.clone(),
        config.watch_namespace.clone(),
        async {
            let _ = backups_stopped.await;
        },
    ));
    let (stop_schedules, schedules_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(crate::scheduled_backup::run(
        ctx.clone(),
        config.watch_namespace.clone(),
        async {
            let _ = schedules_stopped.await;
        },
    ));
    let (stop_splits, splits_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(crate::shard_split::run(
        ctx.clone(),
        config.watch_namespace.clone(),
        async {
            let _ = splits_stopped.await;
        },
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = futures::FutureExt::shared(stopped);
    let pooler_stopped = stopped.clone();
    let controller = futures::future::join(
        postgres_cluster::run(
            ctx.clone(),
            config.watch_namespace.clone(),
            config.concurrency,
            async {
                let _ = stopped.await;
            },
        ),
        crate::pooler::run(
            ctx,
            config.watch_namespace.clone(),
            config.concurrency,
            async {
                let _ = pooler_stopped.await;
            },
        ),
    );
    tokio::pin!(controller);
    let lost = async {
        match &elector {
            Some(elector) => elector.keep().await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        _ = &mut controller => Ok(()),
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            let _ = stop.send(());
            let _ = stop_backups.send(());
            let _ = stop_schedules.send(());
            let _ = stop_splits.send(());
            controller.await;
            Ok(())
        }
        error = lost => {
            metrics.set_leader(false);
            tracing::error!(%error, "leadership lost; exiting");
            Err(OperatorError::Leader(error))
        }
    };
    if outcome.is_ok()
        && let Some(elector) = &elector
    {
        elector.release().await;
    }
    outcome
}
