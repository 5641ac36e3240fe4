//! Per-shard pools of backend connections (transaction-level pooling: a client holds a
//! connection for one statement, or for its whole transaction).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::connection::{BackendConnection, BackendError};
use crate::metrics::Metrics;
use crate::topology::{BackendConfig, Endpoint};

/// The pool of one shard.
#[derive(Debug)]
pub struct ShardPool {
    /// Shard index.
    pub index: usize,
    endpoint: Endpoint,
    config: BackendConfig,
    /// Boxed: a connection (its buffers, its prepared statements) is large, and it moves
    /// between this list and a lease for every statement.
    #[expect(
        clippy::vec_box,
        reason = "moved in and out per statement; boxed, a move is a pointer"
    )]
    idle: Mutex<Vec<Box<BackendConnection>>>,
    slots: Arc<Semaphore>,
    in_use: prometheus_client::metrics::gauge::Gauge,
}

/// A connection checked out of a pool; goes back on drop if it is idle and clean.
#[derive(Debug)]
pub struct Leased {
    connection: Option<Box<BackendConnection>>,
    discarded: bool,
    pool: Arc<ShardPool>,
    _slot: OwnedSemaphorePermit,
}

impl std::ops::Deref for Leased {
    type Target = BackendConnection;
    fn deref(&self) -> &BackendConnection {
        self.connection.as_ref().expect("leased connection")
    }
}

impl std::ops::DerefMut for Leased {
    fn deref_mut(&mut self) -> &mut BackendConnection {
        self.connection.as_mut().expect("leased connection")
    }
}

impl Leased {
    /// Shard index of this connection.
    pub fn shard_index(&self) -> usize {
        self.pool.index
    }

    /// Drops the connection instead of returning it (after an I/O error).
    pub fn discard(&mut self) {
        self.discarded = true;
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        self.pool.in_use.dec();
        if let Some(mut connection) = self.connection.take()
            && !self.discarded
            && connection.is_reusable()
        {
            // A transaction that never ran a statement here left nothing on the server.
            connection.begin_pending = None;
            self.pool.idle.lock().expect("pool lock").push(connection);
        }
    }
}

impl ShardPool {
    /// A pool for `endpoint`.
    pub fn new(
        index: usize,
        endpoint: Endpoint,
        config: BackendConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(config.pool_size.max(1)));
        Self {
            index,
            endpoint,
            config,
            idle: Mutex::new(Vec::new()),
            slots,
            in_use: metrics.pool_gauge(index),
        }
    }

    /// The shard's endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Checks out a connection: an idle one, or a new one. Waits up to 30 s for a free slot.
    pub async fn get(self: &Arc<Self>) -> Result<Leased, BackendError> {
        // A free slot is the common case: taken without arming the wait's timer.
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tokio::time::timeout(Duration::from_secs(30), self.slots.clone().acquire_owned())
                    .await
                    .map_err(|_| BackendError::Protocol {
                        shard: self.endpoint.name.clone(),
                        message: "timed out waiting for a free pooled connection".into(),
                    })?
                    .expect("pool semaphore is never closed")
            }
        };
        let idle = loop {
            let candidate = self.idle.lock().expect("pool lock").pop();
            match candidate {
                Some(mut connection) => {
                    if !connection.is_stale() {
                        break Some(connection);
                    }
                    tracing::debug!(
                        shard = self.endpoint.name,
                        "dropping a dead pooled connection"
                    );
                }
                None => break None,
            }
        };
        let connection = match idle {
            Some(connection) => connection,
            None => {
                let connect = BackendConnection::connect(&self.endpoint, &self.config);
                match tokio::time::timeout(Duration::from_secs(10), connect).await {
                    Ok(result) => Box::new(result?),
                    Err(_) => {
                        return Err(BackendError::Io {
                            shard: self.endpoint.name.clone(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "connecting timed out",
                            ),
                        });
                    }
                }
            }
        };
        self.in_use.inc();
        Ok(Leased {
            connection: Some(connection),
            discarded: false,
            pool: self.clone(),
            _slot: slot,
        })
    }

    /// Drops idle connections (after a shard failure).
    pub fn clear_idle(&self) {
        self.idle.lock().expect("pool lock").clear();
    }

    /// Number of idle connections.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

/// Pools for all shards of a topology.
#[derive(Debug)]
pub struct Pools {
    /// By shard index.
    pub shards: Vec<Arc<ShardPool>>,
}

impl Pools {
    /// Pools for `endpoints`.
    pub fn new(endpoints: &[Endpoint], config: &BackendConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            shards: endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    Arc::new(ShardPool::new(
                        i,
                        e.clone(),
                        config.clone(),
                        metrics.clone(),
                    ))
                })
                .collect(),
        }
    }
}
