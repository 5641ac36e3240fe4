//! The contract between the operator (controllers) and the instance manager (pg-instance): labels,
//! annotations, object names, ports and environment variables both sides agree on.

/// Label with the PostgresCluster name, on every object the operator creates for a cluster.
pub const LABEL_CLUSTER: &str = "postgres.keiailab.io/cluster";
/// Label with the instance (pod) name, on instance pods.
pub const LABEL_INSTANCE: &str = "postgres.keiailab.io/instance";
/// Label the instance manager sets on its own pod: `primary`, `replica` or `fenced` (and the
/// operator `unknown`, on a stale primary: [`role::UNKNOWN`]).
/// The `<cluster>-rw` Service selects `primary`, `<cluster>-ro` selects `replica`.
pub const LABEL_ROLE: &str = "postgres.keiailab.io/role";
/// Label with the shard name, on pods of a sharded cluster.
pub const LABEL_SHARD: &str = "postgres.keiailab.io/shard";
/// Common `app.kubernetes.io/managed-by` value.
pub const MANAGED_BY: &str = "postgres-operator";

/// Values of [`LABEL_ROLE`].
pub mod role {
    /// The instance that holds the Lease and accepts writes.
    pub const PRIMARY: &str = "primary";
    /// A streaming replica.
    pub const REPLICA: &str = "replica";
    /// An instance whose PostgreSQL is stopped on request or by self-fencing.
    pub const FENCED: &str = "fenced";
    /// Set by the operator on a pod still labelled primary a Lease duration after another pod
    /// took the Lease and labelled itself primary: its instance manager cannot reach the API
    /// server to take the label off (a network partition; it fenced itself) or is still
    /// restarting as a replica. Both Services leave the pod; its instance manager labels it
    /// again once it reports.
    pub const UNKNOWN: &str = "unknown";
}

/// Annotation the instance manager writes on its own pod: JSON of its `/status` (role, timeline,
/// LSNs, lag), so that peers and the operator can read it without reaching the pod.
pub const ANNOTATION_INSTANCE_STATUS: &str = "postgres.keiailab.io/instance-status";
/// Annotation on the cluster's Lease naming the pod a switchover should promote; set by the
/// operator (from `spec.switchoverTo` or the cluster annotation), cleared by the instance managers.
pub const ANNOTATION_SWITCHOVER_TO: &str = crate::postgres_cluster::SWITCHOVER_ANNOTATION;
/// Annotation on the PostgresCluster with the switchover target the operator last passed on to
/// the instance managers (so that a request still set does not undo a later failover). A client
/// that asks again for the same target removes it along with setting [`ANNOTATION_SWITCHOVER_TO`].
pub const ANNOTATION_SWITCHOVER_PASSED_ON: &str = "postgres.keiailab.io/switchover-passed-on";
/// Annotation on a pod (value `"true"`) or on the cluster (`"*"` or pod names, comma-separated)
/// that fences instances.
pub const ANNOTATION_FENCED: &str = crate::postgres_cluster::FENCED_ANNOTATION;
/// Annotation on a pod asking its instance manager to restart PostgreSQL (rolling updates); the
/// value is a token the instance manager echoes in its status when done.
pub const ANNOTATION_RESTART: &str = "postgres.keiailab.io/restart";

/// Name of the cluster's leader Lease (`coordination.k8s.io/v1`), held by the primary.
pub fn lease_name(cluster: &str) -> String {
    format!("{cluster}-primary")
}

/// Name of the read-write Service (the primary).
pub fn rw_service(cluster: &str) -> String {
    format!("{cluster}-rw")
}

/// Name of the read-only Service (the replicas).
pub fn ro_service(cluster: &str) -> String {
    format!("{cluster}-ro")
}

/// Name of the Service that selects every instance.
pub fn any_service(cluster: &str) -> String {
    format!("{cluster}-r")
}

/// Secret with the superuser's `username` and `password`.
pub fn superuser_secret(cluster: &str) -> String {
    format!("{cluster}-superuser")
}

/// Secret with the application owner's `username` and `password`.
pub fn app_secret(cluster: &str) -> String {
    format!("{cluster}-app")
}

/// Secret with the replication user's `username` and `password`.
pub fn replication_secret(cluster: &str) -> String {
    format!("{cluster}-replication")
}

/// ConfigMap with the PostgreSQL parameters (key `postgresql.conf` holds `name = 'value'` lines).
pub fn config_map(cluster: &str) -> String {
    format!("{cluster}-config")
}

/// Name of the replication role.
pub const REPLICATION_USER: &str = "streaming_replica";
/// Name of the superuser role.
pub const SUPERUSER: &str = "postgres";

/// PostgreSQL port in the pod.
pub const POSTGRES_PORT: u16 = 5432;
/// Instance manager HTTP port (`/healthz`, `/readyz`, `/status`, `/metrics`).
pub const INSTANCE_HTTP_PORT: u16 = 8000;

/// Environment variables the operator sets on the instance manager container.
pub mod env {
    /// Pod name (downward API).
    pub const POD_NAME: &str = "POD_NAME";
    /// Namespace (downward API).
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// Pod IP (downward API).
    pub const POD_IP: &str = "POD_IP";
    /// PostgresCluster name.
    pub const CLUSTER_NAME: &str = "CLUSTER_NAME";
    /// Data directory.
    pub const PGDATA: &str = "PGDATA";
    /// WAL directory (when WAL has its own volume).
    pub const PGWAL: &str = "PGWAL";
    /// Folder with the PostgreSQL binaries.
    pub const PG_BIN: &str = "PG_BIN";
    /// `true`: the instance manager logs JSON lines, like PostgreSQL's `jsonlog` beside them.
    pub const LOG_JSON: &str = "LOG_JSON";
}

/// Annotation on the StatefulSet's pod template (and so on every pod made from it): a hash of
/// everything that needs a new pod or a PostgreSQL restart to change (the pod spec: image,
/// resources, scheduling, environment; the restart-only parameters). The operator rolls pods
/// whose value differs from the template's: replicas first, then a switchover, then the old
/// primary.
pub const ANNOTATION_SPEC_HASH: &str = "postgres.keiailab.io/spec-hash";

/// ServiceAccount the instance managers of a cluster run as.
pub fn service_account(cluster: &str) -> String {
    format!("{cluster}-instance")
}

/// Key of the cluster ConfigMap with `name = 'value'` lines for postgresql.conf. A change that only
/// needs a reload reaches the pods through this ConfigMap alone (mounted at [`CONFIG_MOUNT_PATH`]
/// and readable through the API): the instance manager reloads PostgreSQL when it changes.
pub const CONFIG_KEY_POSTGRESQL: &str = "postgresql.conf";
/// Key of the cluster ConfigMap with the user's pg_hba.conf lines (before the operator's own rules).
pub const CONFIG_KEY_PG_HBA: &str = "pg_hba.conf";
/// Where the cluster ConfigMap is mounted in the PostgreSQL container.
pub const CONFIG_MOUNT_PATH: &str = "/etc/postgres-operator/config";
/// Where the superuser, replication and application Secrets are mounted, one folder each
/// (`superuser/`, `replication/`, `app/`, each with `username` and `password`).
pub const SECRETS_MOUNT_PATH: &str = "/etc/postgres-operator/secrets";
/// Mount path of the data volume; PGDATA is its `pgdata` subfolder.
pub const DATA_MOUNT_PATH: &str = "/var/lib/postgresql/data";
/// Mount path of the WAL volume when the cluster has one; PGWAL is its `pg_wal` subfolder.
pub const WAL_MOUNT_PATH: &str = "/var/lib/postgresql/wal";
/// Where the init container copies the instance manager binary (`pg-instance`) so that it runs in
/// the PostgreSQL image.
pub const INSTANCE_MANAGER_MOUNT_PATH: &str = "/controller";

/// Name of the PostgreSQL container port on instance pods; the instance manager reads the port a
/// peer's PostgreSQL listens on from it (5432 when the pod has no port of that name).
pub const PORT_NAME_POSTGRES: &str = "postgresql";
/// Name of the instance manager's HTTP container port on instance pods (8000 when absent); peers
/// ask it for `/status` before a promotion and before self-fencing.
pub const PORT_NAME_STATUS: &str = "status";
/// Annotation the old primary sets on the Lease when it hands it over in a switchover: the WAL
/// position (`X/Y`) of its shutdown checkpoint, which the target must have received before it
/// promotes.
pub const ANNOTATION_SWITCHOVER_LSN: &str = "postgres.keiailab.io/switchover-lsn";
/// Annotation a primary sets on the Lease (value: its pod name) when it gives the role up with
/// PostgreSQL stopped (a clean shutdown, or PostgreSQL that died and could not restart): the Lease
/// counts as expired at once, so the best replica takes it without waiting for the duration. Any
/// new claim removes it.
pub const ANNOTATION_RELEASED_BY: &str = "postgres.keiailab.io/released-by";
/// Annotation on the cluster's Lease (value `"true"`), written by the primary once the cluster's
/// data exists on a second instance (a replica streams) or it has served alone for ten minutes.
/// Before it, a first primary that lost its volume bootstraps the cluster again; after it, an
/// empty instance only ever clones.
pub const ANNOTATION_BOOTSTRAPPED: &str = "postgres.keiailab.io/bootstrapped";

/// Secret with the cluster's CA certificate only (key `ca.crt`): what applications mount to
/// connect with `sslmode=verify-full`.
pub fn tls_ca_secret(cluster: &str) -> String {
    format!("{cluster}-ca")
}

/// Secret with the operator CA's certificate and private key (`ca.crt`, `ca.key`); read by the
/// operator only, never mounted into a pod. While the CA is being renewed it also holds the next
/// CA (`next-ca.crt`, `next-ca.key`) or, once that signs, the previous CA's certificate
/// (`previous-ca.crt`) until it expires: every `ca.crt` the operator publishes is then the
/// bundle of all of them, so that peers and clients trust both sides of the change.
pub fn tls_ca_private_secret(cluster: &str) -> String {
    format!("{cluster}-ca-private")
}

/// FNV-1a, 64 bits: stable across releases (unlike `DefaultHasher`), which a hash stored in the
/// API must be. Not a security measure: it compares public texts.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Digest of a CA bundle (`ca.crt`) as the instance manager reports the one PostgreSQL has
/// loaded (`tlsCa` of its status annotation) and the operator compares with the one it
/// published, before it lets a renewed CA sign.
pub fn ca_bundle_digest(pem: &[u8]) -> String {
    format!("{:016x}", fnv1a64(pem))
}

/// Secret (`kubernetes.io/tls`: `tls.crt`, `tls.key`, `ca.crt`) with PostgreSQL's server
/// certificate, whose names are the cluster's Service DNS names.
pub fn tls_server_secret(cluster: &str) -> String {
    format!("{cluster}-server-tls")
}

/// Secret (`kubernetes.io/tls`) with the client certificate of [`REPLICATION_USER`]: replicas
/// authenticate to the primary with it (`hostssl replication ... cert`).
pub fn tls_replication_secret(cluster: &str) -> String {
    format!("{cluster}-replication-tls")
}

/// Where the TLS Secrets are mounted in the PostgreSQL container: `server/` and `replication/`,
/// each with `tls.crt`, `tls.key` and `ca.crt`.
pub const TLS_MOUNT_PATH: &str = "/etc/postgres-operator/tls";

/// Environment variable (instance manager) with the folder of the TLS Secrets
/// ([`TLS_MOUNT_PATH`]); unset when the cluster's TLS is `Disabled`.
pub const ENV_TLS_DIR: &str = "TLS_DIR";

/// Files of a mounted `kubernetes.io/tls` Secret.
pub mod tls_keys {
    /// The certificate (PEM).
    pub const CERTIFICATE: &str = "tls.crt";
    /// Its private key (PEM).
    pub const KEY: &str = "tls.key";
    /// The CAs to trust (PEM): the one that signed it, and during a CA renewal the other one.
    pub const CA: &str = "ca.crt";
    /// The CA's private key (PEM), in the operator's private CA Secret only.
    pub const CA_KEY: &str = "ca.key";
    /// A renewed CA not signing yet (private CA Secret, during a renewal).
    pub const NEXT_CA: &str = "next-ca.crt";
    /// Its private key.
    pub const NEXT_CA_KEY: &str = "next-ca.key";
    /// The CA a renewal replaced, trusted until it expires (private CA Secret).
    pub const PREVIOUS_CA: &str = "previous-ca.crt";
}

/// Secret (per cluster) with the credentials of [`POOLER_AUTH_USER`]: the operator creates it
/// for the first Pooler of the cluster (keys `username`, `password`, `userlist.txt`); the
/// primary's instance manager creates the role with that password.
pub fn pooler_auth_secret(cluster: &str) -> String {
    format!("{cluster}-pooler-auth")
}

/// Role PgBouncer logs in as to run its `auth_query` (SCRAM, login, never a superuser).
pub const POOLER_AUTH_USER: &str = "pgbouncer_auth";
/// Schema of [`POOLER_AUTH_FUNCTION`].
pub const POOLER_AUTH_SCHEMA: &str = "public";
/// Name of the `SECURITY DEFINER` function PgBouncer's `auth_query` calls with the client's user
/// name; only [`POOLER_AUTH_USER`] may execute it. It exists in every database that allows
/// connections (PgBouncer 1.18 runs `auth_query` in the client's database).
pub const POOLER_AUTH_FUNCTION: &str = "pgbouncer_user_lookup";
/// Label with the Pooler name on its objects and PgBouncer pods: the instance managers find the
/// pods of their cluster's Poolers by it, to PAUSE and RESUME them around a primary change.
pub const LABEL_POOLER: &str = "postgres.keiailab.io/pooler";
/// The container port named `name` of `pod` (`postgresql`, `status`), or `default` when no
/// container declares it: how the operator and the instance managers find a peer's ports.
pub fn container_port(pod: &k8s_openapi::api::core::v1::Pod, name: &str, default: u16) -> u16 {
    pod.spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some(name))
        .and_then(|port| u16::try_from(port.container_port).ok())
        .unwrap_or(default)
}

/// Name of the container port of PgBouncer on Pooler pods (its admin console is on it too).
pub const PORT_NAME_PGBOUNCER: &str = "pgbouncer";
/// Port of the Pooler pods' metrics exporter (`pg-instance pooler-exporter`, container port
/// named `metrics`): pgbouncer_exporter's port, so that its scrape configs keep working.
pub const POOLER_METRICS_PORT: u16 = 9127;

/// Label naming the sharded cluster a router pod belongs to. Router pods never carry
/// [`LABEL_CLUSTER`], so no cluster's instance selectors pick them up.
pub const LABEL_ROUTER: &str = "postgres.keiailab.io/router";

/// The pg-router Deployment and Service of sharded cluster `cluster` (clients connect here).
pub fn router_service(cluster: &str) -> String {
    format!("{cluster}-router")
}

/// Where pg-router's TLS certificate (the cluster's server certificate Secret) is mounted.
pub const ROUTER_TLS_MOUNT_PATH: &str = "/etc/pg-router/tls";

/// Base backups to and from a volume (a BackupJob's `spec.volume`, a cluster's
/// `spec.bootstrap.volume`): what the operator's Jobs run and what they report back.
pub mod volume_backup {
    use serde::{Deserialize, Serialize};

    /// `pg-instance volume-backup`: pg_basebackup from an instance into the mounted claim.
    pub const BACKUP_SUBCOMMAND: &str = "volume-backup";
    /// `pg-instance volume-restore`: the claim's backup into the first instance's volumes.
    pub const RESTORE_SUBCOMMAND: &str = "volume-restore";
    /// Where the Jobs mount the backup's claim.
    pub const MOUNT_PATH: &str = "/backup";
    /// Folder of the claim with the copied data directory (`pg_basebackup -D`).
    pub const DATA_FOLDER: &str = "data";
    /// File of the claim with the [`Report`] of the backup.
    pub const REPORT_FILE: &str = "backup.json";
    /// File beside PGDATA (on the data volume) that says the data was restored from a volume
    /// and has never run: the first instance manager takes the Lease and starts it as the new
    /// cluster's primary, then removes the file.
    pub const RESTORED_MARKER: &str = "restored-from-volume";

    /// What a backup Job reports in its container's termination message (and in
    /// [`REPORT_FILE`]): the backup, or why it failed.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
    #[serde(rename_all = "camelCase")]
    pub struct Report {
        /// The label pg_basebackup wrote (the BackupJob's name).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub backup_id: Option<String>,
        /// WAL location where the backup starts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub begin_lsn: Option<String>,
        /// WAL location where it ends: the restored cluster starts consistent from here.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub end_lsn: Option<String>,
        /// Timeline of the backup.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub timeline: Option<u32>,
        /// When pg_basebackup started (RFC 3339).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub begin_time: Option<String>,
        /// When it finished (RFC 3339).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub end_time: Option<String>,
        /// Bytes of the copied data directory (WAL included).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub size_bytes: Option<i64>,
        /// Why the backup failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
    }
}
