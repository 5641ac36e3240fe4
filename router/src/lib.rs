//! pg-router: a stateless PostgreSQL wire-protocol router over PostgreSQL 18 shards.
//!
//! Layers, each in its module: [`frontend`] (protocol v3 with clients, TLS, SCRAM) -> [`session`]
//! (transactions, settings) -> [`planner`] (SQL to a [`planner::Plan`], pure) -> [`executor`]
//! (backend connections from [`pool`], raw protocol in [`backend`]) -> [`merger`]
//! (scatter-gather results). [`topology`] and [`vindex`] decide placement; [`twophase`] commits
//! cross-shard transactions; [`server`] is the run loop; [`metrics`] the Prometheus endpoint;
//! [`telemetry`] the logs and the OpenTelemetry traces.

pub mod backend;
pub mod cancel;
pub mod copy_in;
pub mod error;
pub mod executor;
pub mod frontend;
pub mod kubernetes;
pub mod merger;
pub mod metrics;
pub mod plan_cache;
pub mod planner;
pub mod pool;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod topology;
pub mod twophase;
pub mod values;
pub mod vindex;

pub use server::Router;
pub use topology::RouterConfig;
