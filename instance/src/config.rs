//! Configuration of one instance manager: flags, each with the environment variable the operator
//! sets on the container.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use api::contract::{INSTANCE_HTTP_PORT, POSTGRES_PORT, env};
use clap::Parser;

/// The instance manager: supervises PostgreSQL in one pod (election, failover, fencing).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "pg-instance",
    version,
    about,
    after_help = "`pg-instance pooler-exporter --help`: the Pooler pods' metrics exporter."
)]
pub struct Config {
    /// Name of this instance's pod (downward API).
    #[arg(long, env = env::POD_NAME)]
    pub pod_name: String,
    /// Namespace of the pod and of the cluster.
    #[arg(long, env = env::POD_NAMESPACE, default_value = "default")]
    pub namespace: String,
    /// PostgresCluster name (Lease `<cluster>-primary`, Secrets `<cluster>-superuser`, ...).
    #[arg(long, env = env::CLUSTER_NAME)]
    pub cluster: String,
    /// PostgreSQL data directory.
    #[arg(long, env = env::PGDATA)]
    pub pgdata: PathBuf,
    /// WAL directory on its own volume (passed to initdb and pg_basebackup as `--waldir`).
    #[arg(long, env = env::PGWAL)]
    pub pgwal: Option<PathBuf>,
    /// Folder with the PostgreSQL 18 binaries.
    #[arg(long, env = env::PG_BIN, default_value = "/usr/lib/postgresql/18/bin")]
    pub pg_bin: PathBuf,
    /// Folder for the Unix socket and the password file (private to the pod); defaults to
    /// `<pgdata>/../run`.
    #[arg(long, env = "PG_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Address PostgreSQL listens on.
    #[arg(long, env = "PG_LISTEN_ADDRESS", default_value = "*")]
    pub listen_address: String,
    /// Port PostgreSQL listens on.
    #[arg(long, env = "PG_PORT", default_value_t = POSTGRES_PORT)]
    pub port: u16,
    /// Address of the HTTP endpoints (`/healthz`, `/readyz`, `/status`, `/metrics`).
    #[arg(long, env = "HTTP_ADDRESS", default_value_t = SocketAddr::from(([0, 0, 0, 0], INSTANCE_HTTP_PORT)))]
    pub http_address: SocketAddr,
    /// Kubeconfig file; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Unix user that runs PostgreSQL when the instance manager runs as root (PostgreSQL refuses
    /// to run as root). Ignored when not root.
    #[arg(long, env = "PG_RUN_AS_USER")]
    pub run_as_user: Option<String>,
    /// Lease duration in seconds (`spec.failover.leaseDurationSeconds`).
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 4)]
    pub lease_duration_seconds: u64,
    /// A primary that could not renew its Lease for this long fences itself
    /// (`spec.failover.renewDeadlineSeconds`).
    #[arg(long, env = "RENEW_DEADLINE_SECONDS", default_value_t = 2)]
    pub renew_deadline_seconds: u64,
    /// Number of synchronous standbys (`ANY n`); 0 for asynchronous replication.
    #[arg(long, env = "SYNCHRONOUS_STANDBYS", default_value_t = 0)]
    pub synchronous_standbys: u32,
    /// Replication lag (bytes) under which a replica reports ready.
    #[arg(long, env = "MAX_LAG_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_lag_bytes: u64,
    /// Largest time a switchover may take before it is abandoned, in seconds.
    #[arg(long, env = "SWITCHOVER_TIMEOUT_SECONDS", default_value_t = 60)]
    pub switchover_timeout_seconds: u64,
    /// `host:port` of the cluster's rw Service, which the Poolers point at: after a switchover
    /// they are resumed once it answers writable. Default `<cluster>-rw.<namespace>.svc:5432`.
    #[arg(long, env = "RW_SERVICE_ADDRESS")]
    pub rw_service_address: Option<String>,
    /// Application database (`bootstrap.initdb.database`); defaults to the application Secret's
    /// `dbname`, then to its user name.
    #[arg(long, env = "APP_DATABASE")]
    pub app_database: Option<String>,
    /// Secret with the application owner's `username` and `password`: the user's
    /// (`bootstrap.initdb.secret`) or the generated `<cluster>-app` (when unset).
    #[arg(long, env = "APP_SECRET")]
    pub app_secret: Option<String>,
    /// Encoding of a new cluster (initdb `-E`; `bootstrap.initdb.encoding`).
    #[arg(long, env = "INITDB_ENCODING", default_value = "UTF8")]
    pub initdb_encoding: String,
    /// Locale of a new cluster (initdb `--locale`; `bootstrap.initdb.locale`).
    #[arg(long, env = "INITDB_LOCALE", default_value = "C")]
    pub initdb_locale: String,
    /// Data page checksums in a new cluster (`bootstrap.initdb.dataChecksums`).
    #[arg(long, env = "INITDB_DATA_CHECKSUMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub initdb_data_checksums: bool,
    /// `any` (quorum, `ANY n`) or `first` (priority, `FIRST n`).
    #[arg(long, env = "SYNCHRONOUS_METHOD", default_value = "any", value_parser = ["any", "first"])]
    pub synchronous_method: String,
    /// `required` (writes wait for the standbys) or `preferred` (only streaming standbys count).
    #[arg(long, env = "SYNCHRONOUS_DURABILITY", default_value = "required", value_parser = ["required", "preferred"])]
    pub synchronous_durability: String,
    /// Extra wait after the Lease expired before a replica runs for primary, in seconds.
    #[arg(long, env = "FAILOVER_DELAY_SECONDS", default_value_t = 0)]
    pub failover_delay_seconds: u64,
    /// Period of the control loop, in milliseconds.
    #[arg(long, env = "TICK_MILLIS", default_value_t = 250)]
    pub tick_millis: u64,
    /// Extra PostgreSQL settings `name=value` (repeatable), written to the managed configuration.
    #[arg(long = "postgres-setting", value_name = "NAME=VALUE")]
    pub postgres_settings: Vec<String>,
    /// Period of the PostgresUser / PostgresDatabase reconcile that repairs drift, in seconds.
    #[arg(long, env = "DECLARATIVE_RESYNC_SECONDS", default_value_t = 60)]
    pub declarative_resync_seconds: u64,
    /// Folder with the backup engine's commands (`barman-cloud-*`).
    #[arg(long, env = api::backup::instance_env::BARMAN_BIN, default_value = "/usr/local/bin")]
    pub barman_bin: PathBuf,
    /// Backup repository: `spec.backup` of the PostgresCluster as JSON (WAL archiving, base
    /// backups, retention); its keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = api::backup::instance_env::BACKUP_REPOSITORY)]
    pub backup_repository: Option<String>,
    /// Recovery at bootstrap: `spec.bootstrap.recovery` as JSON; its keys come from
    /// RECOVERY_AWS_ACCESS_KEY_ID / RECOVERY_AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = api::backup::instance_env::BOOTSTRAP_RECOVERY)]
    pub bootstrap_recovery: Option<String>,
    /// A replica cluster (`spec.replica.enabled`): the primary is a designated primary that keeps
    /// replaying the recovery source's WAL archive instead of promoting at its end.
    #[arg(long, env = api::backup::instance_env::REPLICA_CLUSTER, default_value_t = false, action = clap::ArgAction::Set)]
    pub replica_cluster: bool,
    /// How often a replica cluster's designated primary lists its source's WAL archive to
    /// measure how far behind it is, in seconds.
    #[arg(long, env = "SOURCE_ARCHIVE_CHECK_SECONDS", default_value_t = 30)]
    pub source_archive_check_seconds: u64,
    /// A replica cluster's source primary to stream from (`spec.replica.streaming.host`); its CA
    /// and client certificate are in the TLS folder's `source/`.
    #[arg(long, env = api::backup::instance_env::REPLICA_SOURCE_HOST)]
    pub replica_source_host: Option<String>,
    /// Port of the source's primary.
    #[arg(long, env = api::backup::instance_env::REPLICA_SOURCE_PORT, default_value_t = 5432)]
    pub replica_source_port: u16,
    /// Read figures from PostgreSQL on `/metrics` (`spec.monitoring.enabled`).
    #[arg(long, env = "METRICS_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics_database: bool,
    /// Deadline of the PostgreSQL part of a `/metrics` scrape, in milliseconds.
    #[arg(long, env = "METRICS_TIMEOUT_MILLIS", default_value_t = 3000)]
    pub metrics_timeout_millis: u64,
    /// File of user-defined metrics queries (postgres_exporter's queries.yaml format).
    #[arg(long, env = "METRICS_CUSTOM_QUERIES")]
    pub metrics_custom_queries: Option<PathBuf>,
    /// Folder of the mounted TLS Secrets (`server/` and `replication/`, each with `tls.crt`,
    /// `tls.key`, `ca.crt`); PostgreSQL runs without TLS when unset.
    #[arg(long, env = api::contract::ENV_TLS_DIR)]
    pub tls_dir: Option<PathBuf>,
    /// Log filter, in the syntax of RUST_LOG (for example `info` or `instance=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log JSON lines (with the cluster, namespace and instance of the run's span) instead of
    /// text: in a pod, PostgreSQL's `jsonlog` lines share the stream, so `kubectl logs` is one
    /// JSON stream. The operator sets it in every instance pod.
    #[arg(long, env = api::contract::env::LOG_JSON, default_value_t = false)]
    pub log_json: bool,
}

impl Config {
    /// Lease duration.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_seconds)
    }

    /// Renew deadline.
    pub fn renew_deadline(&self) -> Duration {
        Duration::from_secs(self.renew_deadline_seconds)
    }

    /// Extra wait after the Lease expired before a replica runs for primary.
    pub fn failover_delay(&self) -> Duration {
        Duration::from_secs(self.failover_delay_seconds)
    }

    /// How commits wait for standbys.
    pub fn sync_policy(&self) -> crate::decision::SyncPolicy {
        crate::decision::SyncPolicy {
            number: self.synchronous_standbys,
            first: self.synchronous_method == "first",
            preferred: self.synchronous_durability == "preferred",
        }
    }

    /// `host:port` of the cluster's rw Service.
    pub fn rw_service_address(&self) -> String {
        self.rw_service_address.clone().unwrap_or_else(|| {
            format!(
                "{}.{}.svc:{}",
                api::contract::rw_service(&self.cluster),
                self.namespace,
                api::contract::POSTGRES_PORT
            )
        })
    }

    /// Control loop period.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_millis)
    }

    /// Folder of the socket and password file.
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            self.pgdata
                .parent()
                .map(|parent| parent.join("run"))
                .unwrap_or_else(|| PathBuf::from("/tmp/pg-instance-run"))
        })
    }

    /// Files named by the `include` and `include_if_exists` extra settings: the configuration
    /// the operator mounts from its ConfigMap, watched for changes.
    pub fn included_config_files(&self) -> Vec<PathBuf> {
        self.extra_settings()
            .into_iter()
            .filter(|(name, _)| name == "include" || name == "include_if_exists")
            .map(|(_, value)| PathBuf::from(value.trim_matches('\'')))
            .collect()
    }

    /// The extra settings as (name, value) pairs; entries without `=` are ignored.
    pub fn extra_settings(&self) -> Vec<(String, String)> {
        self.postgres_settings
            .iter()
            .filter_map(|entry| entry.split_once('='))
            .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Config;

    /// A variable the instance manager reads that a user could also set through the cluster's
    /// `spec.env` would override what the operator passes: every one is reserved in the API.
    #[test]
    fn every_variable_the_instance_manager_reads_is_reserved_from_the_users_env() {
        let command = Config::command();
        let names: Vec<String> = command
            .get_arguments()
            .filter_map(|argument| argument.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        assert!(names.len() > 20, "{names:?}");
        for name in names {
            assert!(
                api::postgres_cluster::RESERVED_ENV.contains(&name.as_str()),
                "{name} is read by the instance manager but missing from RESERVED_ENV"
            );
        }
    }
}
