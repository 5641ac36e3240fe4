//! postgres-operator, the operator manager: one reconciler per kind, the leader election and the
//! HTTP endpoints of the binary. `main.rs` only parses the configuration and calls
//! [`operator::run`].

pub mod backup_job;
pub mod inherited;
pub mod leader;
pub mod metrics;
pub mod monitoring;
pub mod operator;
pub mod pods;
pub mod pooler;
pub mod postgres_cluster;
pub mod scheduled_backup;
pub mod shard_split;
pub mod sharded_cluster;
pub mod telemetry;
pub mod tls;
pub mod volume_backup;
pub mod watches;
