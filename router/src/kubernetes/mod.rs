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
