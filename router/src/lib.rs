//! pg-router: a stateless PostgreSQL wire-protocol router over PostgreSQL 18 shards.
//!
//! Layers, bottom to top, each importing only those below it:
//! - [`protocol`]: protocol v3 messages, typed values and COPY data shared by both sides;
//! - [`plan`]: SQL to a [`plan::Plan`] (parse, bind, route, rewrite, explain), pure: no sockets;
//! - [`backend`]: shard connections, per-shard pools, cancellation;
//! - [`exec`]: running a plan on the shards (cursors, scatter-gather merge, two-phase commit);
//! - [`frontend`]: the client side (protocol v3, TLS, SCRAM) and its session (transactions,
//!   settings, COPY, multi-stage plans);
//! - [`server`]: the run loop.
//!
//! Beside them: [`topology`] and [`vindex`] decide placement, [`error`] is the router's error,
//! [`metrics`] the Prometheus endpoint, [`telemetry`] the logs and OpenTelemetry traces.

pub mod backend;
pub mod error;
pub mod exec;
pub mod frontend;
pub mod metrics;
pub mod plan;
pub mod protocol;
pub mod server;
pub mod telemetry;
pub mod topology;
pub mod vindex;

pub use server::Router;
pub use topology::RouterConfig;
