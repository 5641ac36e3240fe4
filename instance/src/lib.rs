//! `pg-instance`, the instance manager that runs in every PostgreSQL pod: it supervises
//! PostgreSQL, bootstraps it (initdb or pg_basebackup), elects the primary on a Kubernetes Lease,
//! fences, fails over, rejoins with pg_rewind, switches over and serves HTTP status endpoints.
//!
//! # Modules
//! - [`decision`]: the pure part (role state machine, candidacy, synchronous standbys).
//! - [`manager`]: the run loop that observes and acts.
//! - [`postgres`]: the local PostgreSQL (files, programs, child process); [`connect`]: connects
//!   bounded as a whole.
//! - [`cluster`] and [`lease`]: the Kubernetes objects (Lease, pods, Secrets).
//! - [`http`], [`metrics`], [`status`]: what the instance publishes.
//! - [`declarative`]: PostgresUser and PostgresDatabase, applied by the primary.
//! - [`backup`]: WAL archiving, base backups, restore and point-in-time recovery.
//! - [`database_metrics`]: figures read from PostgreSQL at scrape time (built-in and user queries).
//! - [`tls`]: PostgreSQL's TLS from the mounted certificate Secrets (settings, pg_hba, renewal).
//! - [`pooler`]: the Poolers' auth role and function, PAUSE/RESUME around a switchover.
//! - [`watchdog`]: stops a primary whose Lease lapsed while the run loop was busy.
//! - [`volume_backup`]: the Jobs of base backups to a volume and of restores from one.
//!
//! # How instances find each other
//! The Lease `<cluster>-primary` names the primary's pod; the instance pods carry the label
//! `postgres.keiailab.io/cluster=<cluster>`. A peer's address is its pod's `status.podIP` and the
//! container ports named `postgresql` (PostgreSQL, default 5432) and `status` (HTTP, default 8000).
//! No DNS is involved. Each instance writes its role in the `postgres.keiailab.io/role` label and
//! its [`status::InstanceStatus`] as JSON in the `postgres.keiailab.io/instance-status`
//! annotation of its own pod.
//!
//! # Safety rules
//! - The Lease gates every promotion (optimistic-concurrency update on its resourceVersion).
//! - A primary that has not renewed for `renewDeadlineSeconds` stops PostgreSQL (immediate
//!   shutdown) unless every peer answers on `/status` that it cannot reach the API server either;
//!   replicas count a Lease's expiry from the moment they saw it change on their own clock, and
//!   restart that clock after an API outage, so the primary is down before anyone can take over.
//! - With synchronous replication (`ANY n` over a set that only loses pods that are deleted), a
//!   replica promotes only after seeing `N - n + 1` members of the set (itself included) and being
//!   the most advanced of them: it then holds every acknowledged commit.
//! - A fenced instance (annotation `postgres.keiailab.io/fenced` on its pod, or on the
//!   PostgresCluster) stops PostgreSQL and neither renews nor takes the Lease.
//! - PostgreSQL never runs as root: as root, `--run-as-user` names the user it runs as.

pub mod backup;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod database_metrics;
pub mod decision;
pub mod declarative;
pub mod error;
pub mod http;
pub mod lease;
pub mod manager;
pub mod metrics;
pub mod pooler;
pub mod postgres;
pub mod postgres_log;
pub mod quote;
pub mod status;
pub mod tls;
pub mod volume_backup;
pub mod watchdog;

pub use config::Config;
pub use error::{Error, Result};
pub use manager::run;
