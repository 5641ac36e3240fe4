//! Prometheus metrics: queries by plan kind, latency histograms, pool usage, 2PC outcomes, and a
//! split's cut-over (routing epoch, writes held for a paused range).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// All metrics of one router process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    queries: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    pool_in_use: Family<Labels, Gauge>,
    two_phase: Family<Labels, Counter>,
    topology_epoch: Gauge,
    write_paused_ranges: Gauge,
    write_pause_holds: Counter,
    write_pause_hold_seconds: Histogram,
    forwarded: Counter,
    query_handles: std::sync::RwLock<Vec<(&'static str, Counter, Histogram)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pg_router");
        let queries = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let latency: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let pool_in_use = Family::<Labels, Gauge>::default();
        let two_phase = Family::<Labels, Counter>::default();
        registry.register(
            "queries",
            "Statements routed, by plan kind",
            queries.clone(),
        );
        registry.register(
            "errors",
            "Statements that failed, by SQLSTATE class",
            errors.clone(),
        );
        registry.register(
            "query_duration_seconds",
            "Time to plan and run a statement, by plan kind",
            latency.clone(),
        );
        registry.register(
            "pool_connections_in_use",
            "Backend connections checked out, by shard",
            pool_in_use.clone(),
        );
        registry.register(
            "two_phase_commits",
            "Multi-shard transactions by outcome (committed, aborted, in_doubt, recovered_commit, recovered_abort)",
            two_phase.clone(),
        );
        let topology_epoch = Gauge::default();
        let write_paused_ranges = Gauge::default();
        let write_pause_holds = Counter::default();
        let write_pause_hold_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "topology_epoch",
            "Routing epoch of the current topology (the highest ShardRange epoch)",
            topology_epoch.clone(),
        );
        registry.register(
            "write_paused_ranges",
            "Ranges of the current topology whose writes are held (a split's cut-over)",
            write_paused_ranges.clone(),
        );
        registry.register(
            "write_pause_holds",
            "Statements held because they write to a range paused for a split's cut-over",
            write_pause_holds.clone(),
        );
        registry.register(
            "write_pause_hold_seconds",
            "How long statements were held for a paused range (released or timed out)",
            write_pause_hold_seconds.clone(),
        );
        let forwarded = Counter::default();
        registry.register(
            "forwarded",
            "Statements answered by forwarding their shard's messages as sent (one shard, outside a transaction)",
            forwarded.clone(),
        );
        Self {
            registry,
            forwarded,
            topology_epoch,
            write_paused_ranges,
            write_pause_holds,
            write_pause_hold_seconds,
            queries,
            errors,
            latency,
            pool_in_use,
            two_phase,
            query_handles: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// Counts a routed statement and its latency.
    pub fn observe_query(&self, plan: &'static str, seconds: f64) {
        // Handles are cached per plan kind: no label allocation on the hot path.
        {
            let cache = self.query_handles.read().expect("metrics lock");
            if let Some((_, counter, histogram)) = cache.iter().find(|(kind, _, _)| *kind == plan) {
                counter.inc();
                histogram.observe(seconds);
                return;
            }
        }
        let labels = vec![("plan".to_string(), plan.to_string())];
        let counter = self.queries.get_or_create_owned(&labels);
        let histogram = self.latency.get_or_create_owned(&labels);
        counter.inc();
        histogram.observe(seconds);
        self.query_handles
            .write()
            .expect("metrics lock")
            .push((plan, counter, histogram));
    }

    /// Counts a statement answered by the forwarding fast path.
    pub fn observe_forwarded(&self) {
        self.forwarded.inc();
    }

    /// Counts a failed statement by its SQLSTATE class.
    pub fn observe_error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("XX").to_string();
        self.errors
            .get_or_create(&vec![("class".to_string(), class)])
            .inc();
    }

    /// The in-use gauge of a shard's pool (kept by the pool).
    pub fn pool_gauge(&self, shard: usize) -> Gauge {
        self.pool_in_use
            .get_or_create_owned(&vec![("shard".to_string(), shard.to_string())])
    }

    /// Counts a 2PC outcome.
    pub fn two_phase(&self, outcome: &str) {
        self.two_phase
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
    }

    /// Records the routing epoch of the topology just swapped in, and how many of its ranges
    /// are paused.
    pub fn set_topology_epoch(&self, epoch: i64, paused_ranges: usize) {
        self.topology_epoch.set(epoch);
        self.write_paused_ranges.set(paused_ranges as i64);
    }

    /// Counts a statement held for a paused range, and how long it waited.
    pub fn observe_write_pause_hold(&self, seconds: f64) {
        self.write_pause_holds.inc();
        self.write_pause_hold_seconds.observe(seconds);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}
