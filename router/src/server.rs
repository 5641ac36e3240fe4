//! The run loop: accepts client connections, serves `/metrics`, resolves in-doubt
//! transactions periodically, and reloads the topology on request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::exec::twophase;
use crate::frontend::Frontend;
use crate::frontend::logins::Logins;
use crate::frontend::session::RouterState;
use crate::metrics::Metrics;
use crate::topology::{RouterConfig, Topology, TopologyError};

/// Errors starting the router.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The TLS certificate or key could not be loaded.
    #[error("loading TLS certificate/key: {0}")]
    Tls(String),
    /// A listener could not bind.
    #[error("binding {address}: {source}")]
    Bind {
        /// Address.
        address: String,
        /// The error.
        source: std::io::Error,
    },
}

/// How often prepared transactions are checked for in-doubt ones.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(2);
/// A prepared transaction younger than this is left to its coordinator.
pub const IN_DOUBT_AGE: Duration = Duration::from_secs(2);

/// The TLS acceptor of `config`, and the channel binding data of its certificate.
fn tls_acceptor(
    config: &crate::topology::TlsConfig,
) -> Result<(TlsAcceptor, Option<Vec<u8>>), ServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let error = |what: &str, e: &dyn std::fmt::Display| ServerError::Tls(format!("{what}: {e}"));
    let certs = CertificateDer::pem_file_iter(&config.cert_file)
        .map_err(|e| error(&config.cert_file.display().to_string(), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(&config.cert_file.display().to_string(), &e))?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| error(&config.key_file.display().to_string(), &e))?;
    let end_point = certs
        .first()
        .and_then(|leaf| crate::frontend::scram::tls_server_end_point(leaf));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error("TLS versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| error("certificate", &e))?;
    server.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(server)), end_point))
}

/// A running router.
pub struct Router {
    state: Arc<RouterState>,
    logins: Arc<Logins>,
    address: SocketAddr,
    metrics_address: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    config_path: Option<PathBuf>,
}

impl Router {
    /// Starts a router for `config`: binds its listeners and starts its background tasks.
    pub async fn start(
        config: RouterConfig,
        config_path: Option<PathBuf>,
    ) -> Result<Self, ServerError> {
        let topology = Topology::from_config(&config)?;
        Self::start_with_topology(config, topology, config_path).await
    }

    /// Starts a router whose topology comes from elsewhere (Kubernetes mode); `config` gives the
    /// listeners, client auth, TLS and backend settings, and its `shards` are ignored.
    pub async fn start_with_topology(
        config: RouterConfig,
        topology: Topology,
        config_path: Option<PathBuf>,
    ) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::new());
        let state = Arc::new(RouterState::new(
            topology,
            config.backend.clone(),
            metrics.clone(),
        ));
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    address: config.listen.clone(),
                    source,
                })?;
        let address = listener.local_addr().map_err(|source| ServerError::Bind {
            address: config.listen.clone(),
            source,
        })?;
        let (tls, end_point) = match &config.tls {
            Some(tls) => {
                let (acceptor, end_point) = tls_acceptor(tls)?;
                (Some(acceptor), end_point)
            }
            None => (None, None),
        };
        let mut tasks = Vec::new();
        let logins = Arc::new(Logins::new(&config.auth));
        let frontend = Arc::new(Frontend::new(state.clone(), logins.clone(), tls, end_point));
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                tokio::spawn(crate::frontend::serve(socket, frontend.clone()));
            }
        }));
        let mut metrics_address = None;
        if let Some(listen) = &config.metrics_listen {
            let listener = TcpListener::bind(listen)
                .await
                .map_err(|source| ServerError::Bind {
                    address: listen.clone(),
                    source,
                })?;
            metrics_address = listener.local_addr().ok();
            let metrics = metrics.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            metrics.render(),
                        )
                    }
                }),
            );
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }
        // The decision table must exist before the first cross-shard commit.
        twophase::ensure_decision_tables(&state.runtime().pools).await;
        state.refresh_aggregates().await;
        let resolver_state = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let runtime = resolver_state.runtime();
                twophase::resolve_in_doubt(&runtime.pools, IN_DOUBT_AGE, &resolver_state.metrics)
                    .await;
                // Aggregates created on the shards directly (not through a router) too.
                resolver_state.refresh_aggregates().await;
                tokio::time::sleep(RESOLVE_INTERVAL).await;
            }
        }));
        tracing::info!(%address, shards = state.runtime().topology.shards.len(), "pg-router listening");
        Ok(Self {
            state,
            logins,
            address,
            metrics_address,
            tasks,
            config_path,
        })
    }

    /// The address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The `/metrics` address, if enabled.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// Shared state (for tests and embedding).
    pub fn state(&self) -> &Arc<RouterState> {
        &self.state
    }

    /// The client logins, which [`Logins::replace`] swaps for new connections (Kubernetes
    /// mode follows the cluster's PostgresUsers with it).
    pub fn logins(&self) -> &Arc<Logins> {
        &self.logins
    }

    /// Replaces the topology with `config`'s (shard endpoints, groups, tables) and the client
    /// logins with its `[auth]` (sessions already logged in keep going).
    pub fn reload(&self, config: &RouterConfig) -> Result<(), TopologyError> {
        self.state.reload(Topology::from_config(config)?);
        self.logins.replace(&config.auth);
        Ok(())
    }

    /// Re-reads the config file the router was started with.
    pub fn reload_file(&self) -> Result<(), TopologyError> {
        match &self.config_path {
            Some(path) => self.reload(&RouterConfig::from_file(path)?),
            None => Ok(()),
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
