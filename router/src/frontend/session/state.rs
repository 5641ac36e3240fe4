//! The process-wide router state every session shares: topology, pools, plan cache, metrics,
//! and its reload on a topology change.

use super::*;

/// A topology with the pools that reach its shards (swapped together on reload).
#[derive(Debug)]
pub struct Runtime {
    /// The topology.
    pub topology: Arc<Topology>,
    /// Pools by shard index.
    pub pools: Arc<Pools>,
    /// Bumped on every reload (cached plans of prepared statements are re-made).
    pub version: u64,
    /// Plans of simple-protocol statement shapes, for this topology.
    pub plan_cache: crate::plan::cache::PlanCache,
}

/// State shared by all sessions of a router process.
#[derive(Debug)]
pub struct RouterState {
    pub(super) runtime: std::sync::RwLock<Arc<Runtime>>,
    pub(super) backend: BackendConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Global transaction ids.
    pub gxids: GxidSource,
    pub(super) versions: AtomicU64,
    pub(super) round_robin: AtomicUsize,
    /// Client sessions by BackendKeyData, for cancel requests.
    pub cancels: crate::backend::cancel::CancelRegistry,
}

impl RouterState {
    /// State for `topology`.
    pub fn new(topology: Topology, backend: BackendConfig, metrics: Arc<Metrics>) -> Self {
        let pools = Arc::new(Pools::new(&topology.shards, &backend, metrics.clone()));
        Self {
            runtime: std::sync::RwLock::new(Arc::new(Runtime {
                topology: Arc::new(topology),
                pools,
                version: 0,
                plan_cache: Default::default(),
            })),
            backend,
            metrics,
            gxids: GxidSource::default(),
            versions: AtomicU64::new(0),
            round_robin: AtomicUsize::new(0),
            cancels: crate::backend::cancel::CancelRegistry::default(),
        }
    }

    /// Whether simple-protocol statements may be auto-prepared on the shards.
    pub fn auto_prepare(&self) -> bool {
        self.backend.auto_prepare
    }

    /// The current topology and pools.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.read().expect("runtime lock").clone()
    }

    /// Reads the aggregates the shards define (`CREATE AGGREGATE`, from the first shard's
    /// catalog) and, when they changed, swaps in the topology with them (plans made without
    /// them are dropped).
    pub async fn refresh_aggregates(&self) {
        let runtime = self.runtime();
        let Some(pool) = runtime.pools.shards.first() else {
            return;
        };
        let Ok(mut connection) = pool.get().await else {
            return;
        };
        let rows = match connection
            .query_text(
                "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p \
                 WHERE p.prokind = 'a' AND p.pronamespace <> 'pg_catalog'::regnamespace \
                 ORDER BY 1",
            )
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::debug!(%error, "reading user-defined aggregates");
                return;
            }
        };
        drop(connection);
        let names: Vec<String> = rows
            .into_iter()
            .filter_map(|row| row.into_iter().next().flatten())
            .collect();
        if names != runtime.topology.aggregates {
            let mut topology = (*runtime.topology).clone();
            tracing::info!(aggregates = ?names, "user-defined aggregates changed");
            topology.aggregates = names;
            self.swap(topology);
        }
    }

    /// Swaps in a new topology (from the config file, or the Kubernetes source); pools are kept
    /// when the shard endpoints did not change. The shards' aggregates, which a configuration
    /// does not list, are kept as last read.
    pub fn reload(&self, mut topology: Topology) {
        if topology.aggregates.is_empty() {
            topology.aggregates = self.runtime().topology.aggregates.clone();
        }
        self.swap(topology);
    }

    pub(super) fn swap(&self, topology: Topology) {
        let current = self.runtime();
        let pools = if current.topology.shards == topology.shards {
            current.pools.clone()
        } else {
            Arc::new(Pools::new(
                &topology.shards,
                &self.backend,
                self.metrics.clone(),
            ))
        };
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        *self.runtime.write().expect("runtime lock") = Arc::new(Runtime {
            topology: Arc::new(topology),
            pools,
            version,
            plan_cache: Default::default(),
        });
        tracing::info!(version, "topology reloaded");
    }
}
