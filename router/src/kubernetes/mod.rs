//! Kubernetes mode: the router takes its topology from a sharded PostgresCluster (table groups,
//! sharded and reference tables), its ShardRange objects (the source of truth for placement) and
//! each shard's primary pod (labelled `role=primary` by its instance manager: what the shard's
//! `<cluster>-shard-<n>-rw` Service selects; its pod IP and `postgres` port; of two pods so
//! labelled, the one holding the shard's Lease), and swaps
//! it live with `RouterState::reload` whenever one of them changes. A statement holds the
//! runtime (topology and pools) it started with, so statements in flight finish on the old one.
//!
//! [`topology`] and [`trust`] (the shards' CAs while one is rotated) are pure; [`watch`] and
//! [`auth`] (client logins from PostgresUser objects) talk to the API server.

pub mod auth;
pub mod topology;
pub mod trust;
pub mod watch;

pub use watch::{KubernetesSource, WatchError};

use std::time::Duration;

use kube::runtime::watcher;

/// How long the router waits on an API server connection that says nothing (`--api-timeout-seconds`).
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(30);

/// The router's API client: a read that waits `timeout` without a byte fails, and the request's
/// connection is dropped. A connection that died without a word (a load balancer or NAT that
/// forgot it, a control plane that moved) otherwise holds a request forever: kube's client has
/// no read timeout of its own and no HTTP/2 health ping like client-go's, and its pooled idle
/// connections are reused as if alive. Watches are kept below that silence by [`watch_config`].
pub async fn client(timeout: Duration) -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.read_timeout = Some(timeout);
    kube::Client::try_from(config)
}

/// The narrowest `--api-timeout-seconds`: it leaves [`watch_config`] a 5 s watch.
pub const MIN_API_TIMEOUT: Duration = Duration::from_secs(15);

/// A watch the API server ends (and the watcher opens again, from where it was) 10 seconds
/// before [`client`]'s read timeout, so a quiet watch is never mistaken for a dead connection.
/// kube's watcher gives up on a watch whose end has not come 5 s after it was due, quietly (it
/// opens the watch again), and that must come before the read timeout, which ends the watch
/// with an error and a pause (the operator's `controllers/src/watches.rs` measured why).
pub fn watch_config(timeout: Duration) -> watcher::Config {
    let seconds = timeout.as_secs().saturating_sub(10).max(1);
    watcher::Config::default().timeout(u32::try_from(seconds).unwrap_or(u32::MAX))
}
