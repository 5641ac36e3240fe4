//! What an instance publishes about itself: on `/status`, in its pod's
//! `postgres.keiailab.io/instance-status` annotation, and as metrics.

use serde::{Deserialize, Serialize};

/// The status of one instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Pod name.
    pub pod: String,
    /// `primary`, `replica` or `fenced`.
    pub role: String,
    /// Whether PostgreSQL is stopped on request or by self-fencing.
    pub fenced: bool,
    /// Whether PostgreSQL accepts connections.
    pub postgres_ready: bool,
    /// Whether PostgreSQL is in recovery (a replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_recovery: Option<bool>,
    /// Current timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Primary: current WAL write position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_lsn: Option<String>,
    /// Replica: last WAL position received and flushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_lsn: Option<String>,
    /// Replica: last WAL position replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<String>,
    /// Replica: received but not yet replayed WAL, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// Replica: seconds since the last replayed transaction, when behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Replica: the WAL receiver is streaming.
    pub streaming: bool,
    /// Whether the last call to the API server succeeded (peers ask this before self-fencing).
    pub api_reachable: bool,
    /// Primary: pods in `synchronous_standby_names`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub synchronous_standbys: Vec<String>,
    /// Primary: `ANY n` of [`Self::synchronous_standbys`] acknowledge each commit.
    #[serde(default)]
    pub synchronous_number: u32,
    /// Primary: replicas streaming from it (pod names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streaming_replicas: Vec<String>,
    /// Client connections.
    #[serde(default)]
    pub connections: i64,
    /// Committed transactions (all databases).
    #[serde(default)]
    pub commits: i64,
    /// Rolled back transactions (all databases).
    #[serde(default)]
    pub rollbacks: i64,
    /// WAL bytes generated.
    #[serde(default)]
    pub wal_bytes: i64,
    /// Free bytes on the data directory's file system. A full disk is reported here (and in the
    /// metrics), never a reason to fail over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_disk_available_bytes: Option<u64>,
    /// Times the instance manager restarted a crashed PostgreSQL.
    #[serde(default)]
    pub postgres_restarts: u64,
    /// How this instance last joined: `initdb`, `basebackup`, `rewind`, `reclone` or `restart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_join: Option<String>,
    /// The last `postgres.keiailab.io/restart` token handled (PostgreSQL restarted for it, or
    /// started after it was set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_token: Option<String>,
    /// A new cluster's primary whose application role and database are not made yet: not ready,
    /// so that no client is sent to it before they exist.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootstrapping: bool,
    /// The last error the run loop met (for the operator and the logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why this instance cannot start by itself: its data directory is empty, the cluster was
    /// bootstrapped, and no primary holds a copy to clone from. Says what the user can do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_lost: Option<String>,
    /// WAL archiving to the backup repository (primary with `spec.backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_archive: Option<crate::backup::archiver::ArchiveStatus>,
    /// The fence process that stops a primary whose manager hangs (none when the manager runs
    /// inside a test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<crate::watchdog::FenceReport>,
    /// A replica cluster's designated primary: how far it is behind its source's WAL archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_archive: Option<crate::backup::source_lag::SourceArchiveLag>,
    /// Digest of the CA bundle PostgreSQL was last given (`ca.crt` of the mounted TLS Secrets,
    /// [`api::contract::ca_bundle_digest`]): the operator lets a renewed CA sign once every
    /// instance reports the bundle that trusts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
    /// Validity of the installed certificates (TLS on): the server's, the replication
    /// client's, the latest-expiring CA of the bundle, and a replica cluster's copies of its
    /// source's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<crate::tls::CertificateValidity>,
}

impl InstanceStatus {
    /// The received (replica) or current (primary) LSN as a number.
    pub fn position(&self) -> Option<u64> {
        let text = self
            .received_lsn
            .as_deref()
            .or(self.current_lsn.as_deref())?;
        crate::decision::parse_lsn(text)
    }
}
