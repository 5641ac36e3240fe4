//! Sharded PostgresCluster (`spec.sharding`): one child PostgresCluster per shard (reconciled by
//! the single-shard reconciler, so each shard has everything a cluster has), the initial
//! ShardRange objects of every table group, and the pg-router Deployment and Service that route
//! by them.
//!
//! Decide, then act: [`builders`] is pure; [`reconcile`] talks to the API server. The
//! PostgresCluster reconciler hands a cluster with `spec.sharding` to [`reconcile::apply`].

pub mod builders;
pub mod reconcile;
