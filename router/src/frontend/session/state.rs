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
    /// The version of every topology swapped in: statements held for a paused range wait here.
    pub(super) versions_seen: tokio::sync::watch::Sender<u64>,
    /// Asks the topology source to read its objects again now (a shard's fence said this
    /// router's topology is stale).
    refresh_requested: tokio::sync::Notify,
    /// How many requested refreshes the source finished (applied or found unchanged).
    pub(super) refreshes_done: tokio::sync::watch::Sender<u64>,
    /// Whether a source answers refresh requests (Kubernetes mode).
    refresher: AtomicBool,
    /// Refresh requests so far (each request's ticket).
    refresh_tickets: AtomicU64,
    /// Whether the current topology has a paused range (a cheap check on every statement).
    pub(super) any_paused: AtomicBool,
    /// The routing epoch of the current topology.
    pub(super) epoch: AtomicI64,
}

impl RouterState {
    /// State for `topology`.
    pub fn new(topology: Topology, backend: BackendConfig, metrics: Arc<Metrics>) -> Self {
        let pools = Arc::new(Pools::new(&topology.shards, &backend, metrics.clone()));
        metrics.set_topology_epoch(topology.epoch, topology.paused.len());
        let paused = !topology.paused.is_empty();
        let epoch = topology.epoch;
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
            versions_seen: tokio::sync::watch::Sender::new(0),
            refresh_requested: tokio::sync::Notify::new(),
            refreshes_done: tokio::sync::watch::Sender::new(0),
            refresher: AtomicBool::new(false),
            refresh_tickets: AtomicU64::new(0),
            any_paused: AtomicBool::new(paused),
            epoch: AtomicI64::new(epoch),
        }
    }

    /// How long a write to a paused range waits for the range to be active again.
    pub fn write_pause_hold(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.backend.write_pause_hold_ms)
    }

    /// Asks the topology source for a refresh now (see [`RouterState::refresh_requested`]);
    /// the ticket is done when [`RouterState::refresh_done`] reaches it.
    pub fn request_refresh(&self) -> u64 {
        let ticket = self.refresh_tickets.fetch_add(1, Ordering::SeqCst) + 1;
        self.refresh_requested.notify_one();
        ticket
    }

    /// For the topology source, before it reads: the requests its refresh answers.
    pub fn refresh_ticket(&self) -> u64 {
        self.refresh_tickets.load(Ordering::SeqCst)
    }

    /// For the topology source: resolves when a refresh was requested, and marks the state as
    /// having a source that answers (until then a session does not wait for refreshes).
    pub async fn refresh_requested(&self) {
        self.refresher.store(true, Ordering::Relaxed);
        self.refresh_requested.notified().await;
    }

    /// For the topology source: the refresh that began at `ticket` is done (whether the
    /// topology changed or not).
    pub fn refresh_done(&self, ticket: u64) {
        self.refreshes_done
            .send_modify(|done| *done = (*done).max(ticket));
    }

    /// Does a topology source answer refresh requests?
    pub(super) fn has_refresher(&self) -> bool {
        self.refresher.load(Ordering::Relaxed)
    }

    /// Whether simple-protocol statements may be auto-prepared on the shards.
    pub fn auto_prepare(&self) -> bool {
        self.backend.auto_prepare
    }

    /// The current topology and pools.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.read().expect("runtime lock").clone()
    }

    /// Reads what the planner needs from the shards' catalog (the first shard's): the aggregates
    /// they define (`CREATE AGGREGATE`) and the column lists of their tables (for the binder).
    /// When either changed, swaps in the topology with them (plans made without them are
    /// dropped).
    pub async fn refresh_aggregates(&self) {
        let runtime = self.runtime();
        let Some(pool) = runtime.pools.shards.first() else {
            return;
        };
        let Ok(mut connection) = pool.get().await else {
            return;
        };
        let aggregates = connection
            .query_text(
                "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p \
                 WHERE p.prokind = 'a' AND p.pronamespace <> 'pg_catalog'::regnamespace \
                 ORDER BY 1",
            )
            .await;
        let columns = connection
            .query_text(
                "SELECT c.relname, a.attname FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND a.attnum > 0 \
                 AND NOT a.attisdropped AND pg_catalog.pg_table_is_visible(c.oid) \
                 ORDER BY c.relname, a.attnum",
            )
            .await;
        drop(connection);
        let (aggregates, columns) = match (aggregates, columns) {
            (Ok(aggregates), Ok(columns)) => (aggregates, columns),
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(%error, "reading the shards' catalog");
                return;
            }
        };
        let names: Vec<String> = aggregates
            .into_iter()
            .filter_map(|row| row.into_iter().next().flatten())
            .collect();
        let mut catalog = crate::plan::bind::Catalog::new();
        for row in columns {
            let mut fields = row.into_iter();
            if let (Some(Some(table)), Some(Some(column))) = (fields.next(), fields.next()) {
                catalog.entry(table).or_default().push(column);
            }
        }
        if names != runtime.topology.aggregates || catalog != runtime.topology.columns {
            let mut topology = (*runtime.topology).clone();
            if names != topology.aggregates {
                tracing::info!(aggregates = ?names, "user-defined aggregates changed");
            }
            topology.aggregates = names;
            topology.columns = catalog;
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
        if topology.columns.is_empty() {
            topology.columns = self.runtime().topology.columns.clone();
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
        let epoch = topology.epoch;
        let paused: Vec<String> = topology.paused.iter().map(|r| r.name.clone()).collect();
        *self.runtime.write().expect("runtime lock") = Arc::new(Runtime {
            topology: Arc::new(topology),
            pools,
            version,
            plan_cache: Default::default(),
        });
        self.metrics.set_topology_epoch(epoch, paused.len());
        self.any_paused.store(!paused.is_empty(), Ordering::SeqCst);
        self.epoch.store(epoch, Ordering::SeqCst);
        // Wakes the statements held for a paused range: they look at the new topology.
        self.versions_seen.send_replace(version);
        tracing::info!(version, epoch, ?paused, "topology reloaded");
    }
}
