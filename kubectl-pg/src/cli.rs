//! Command line of `kubectl pg` (clap) and the argument checks clap cannot express.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::Error;

/// kubectl pg: look after postgres-operator's PostgresClusters.
#[derive(Debug, Parser)]
#[command(name = "kubectl-pg", bin_name = "kubectl pg", version, about)]
pub struct Cli {
    /// Connection flags, as kubectl takes them.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The flags kubectl plugins take to reach the API server.
#[derive(Debug, Default, Args)]
pub struct KubeFlags {
    /// Path of the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Kubeconfig cluster to use (the Kubernetes cluster, as kubectl's --cluster; the
    /// PostgresCluster is the commands' first argument).
    #[arg(
        long = "cluster",
        id = "kube_cluster",
        global = true,
        value_name = "NAME"
    )]
    pub kube_cluster: Option<String>,
    /// Kubeconfig user to use.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Namespace of the PostgresCluster (default: the context's namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The cluster at a glance: phase, primary, instances with role, LSN, lag and timeline,
    /// conditions and recent backups.
    Status {
        /// PostgresCluster name.
        cluster: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Hand the primary role to a replica (the most advanced ready replica when none is named),
    /// through the cluster's switchover annotation, which the operator passes on to the instance
    /// managers.
    #[command(visible_alias = "promote")]
    Switchover {
        /// PostgresCluster name.
        cluster: String,
        /// Pod to promote (same as --to).
        #[arg(conflicts_with = "to")]
        pod: Option<String>,
        /// Pod to promote.
        #[arg(long)]
        to: Option<String>,
        /// Wait until the new primary has taken over.
        #[arg(long)]
        wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Fence an instance (or `*`: every instance): its PostgreSQL is stopped and kept stopped.
    Fence {
        /// PostgresCluster name.
        cluster: String,
        /// Pod name, or `*` for every instance.
        pod: String,
    },
    /// Lift the fence from an instance (or `*`: from every instance).
    Unfence {
        /// PostgresCluster name.
        cluster: String,
        /// Pod name, or `*` for every instance.
        pod: String,
    },
    /// Hibernate the cluster: no pods, volumes kept.
    Hibernate {
        /// PostgresCluster name.
        cluster: String,
    },
    /// Bring a hibernated cluster back on its volumes.
    Resume {
        /// PostgresCluster name.
        cluster: String,
    },
    /// Restart PostgreSQL on one instance, or on all of them one at a time (replicas first, the
    /// primary last), waiting for each instance manager to report the restart.
    Restart {
        /// PostgresCluster name.
        cluster: String,
        /// Restart only this instance.
        pod: Option<String>,
        /// Return once the request is made (only with a pod).
        #[arg(long)]
        no_wait: bool,
        /// Longest wait per instance, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Take a backup now: creates a BackupJob for the cluster.
    Backup {
        /// PostgresCluster name.
        cluster: String,
        /// Name of the BackupJob (default `<cluster>-<UTC time>`).
        #[arg(long)]
        name: Option<String>,
        /// Backup tool.
        #[arg(long, value_enum, default_value_t = Method::BarmanCloud)]
        method: Method,
        /// Backup type (pgBackRest).
        #[arg(long = "type", value_enum, default_value_t = BackupKind::Full)]
        backup_type: BackupKind,
        /// Take it from a healthy replica.
        #[arg(long)]
        prefer_replica: bool,
        /// Take it into a new PersistentVolumeClaim of this size (for example 10Gi) instead of
        /// the object store: restore it with `spec.bootstrap.volume.claimName`.
        #[arg(long)]
        volume_size: Option<String>,
        /// StorageClass of that claim (the cluster default when unset).
        #[arg(long, requires = "volume_size")]
        storage_class: Option<String>,
    },
    /// Open psql as the application owner (the app Secret's credentials) on the primary (the rw
    /// Service), a replica (`--replica`, the ro Service) or one pod (`--pod`). Arguments after
    /// `--` go to psql.
    Psql {
        /// PostgresCluster name.
        cluster: String,
        /// Connect to the replicas (the ro Service).
        #[arg(long, conflicts_with = "pod")]
        replica: bool,
        /// Connect to this instance's pod address.
        #[arg(long)]
        pod: Option<String>,
        /// Connect to this host instead of the Service's address (for example a port-forward).
        #[arg(long)]
        host: Option<String>,
        /// Connect to this port instead of the Service's or the pod's.
        #[arg(long)]
        port: Option<u16>,
        /// Database (default: the cluster's application database).
        #[arg(long, short = 'd')]
        dbname: Option<String>,
        /// psql to run (default `psql` on PATH, or $PSQL).
        #[arg(long, env = "PSQL", default_value = "psql")]
        psql: PathBuf,
        /// Arguments passed on to psql.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Print the PostgreSQL container's logs of one instance or of all of them.
    Logs {
        /// PostgresCluster name.
        cluster: String,
        /// Only this instance.
        pod: Option<String>,
        /// Keep streaming new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Last lines only.
        #[arg(long)]
        tail: Option<i64>,
        /// Container.
        #[arg(short = 'c', long, default_value = "postgres")]
        container: String,
    },
}

/// `status` output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables for people.
    Text,
    /// JSON for programs.
    Json,
}

/// Backup tool of `backup --method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// pgBackRest.
    #[value(name = "pgBackRest", alias = "pgbackrest")]
    PgBackRest,
    /// barman-cloud.
    #[value(name = "barmanCloud", alias = "barman-cloud")]
    BarmanCloud,
}

/// Backup type of `backup --type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackupKind {
    /// Full backup.
    Full,
    /// Differential.
    Diff,
    /// Incremental.
    Incr,
}

impl Command {
    /// Checks what clap cannot: names that Kubernetes would refuse and combinations that make no
    /// sense, so that the user hears it before anything is changed.
    pub fn check(&self) -> Result<(), Error> {
        match self {
            Command::Restart {
                pod: None,
                no_wait: true,
                ..
            } => Err(Error::Refused(
                "--no-wait needs a pod: restarting every instance is rolling (one at a time, the primary last), so it waits for each"
                    .into(),
            )),
            Command::Backup {
                name: Some(name), ..
            } if !is_dns_subdomain(name) => Err(Error::Refused(format!(
                "--name {name:?} is not a valid object name: use lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit"
            ))),
            Command::Switchover { timeout: 0, .. } | Command::Restart { timeout: 0, .. } => Err(
                Error::Refused("--timeout must be at least 1 second".into()),
            ),
            _ => Ok(()),
        }
    }
}

/// Whether `name` is a valid Kubernetes object name (RFC 1123 DNS subdomain).
pub fn is_dns_subdomain(name: &str) -> bool {
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| alphanumeric(c) || c == '-' || c == '.')
        && name.starts_with(alphanumeric)
        && name.ends_with(alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubectl-pg").chain(args.iter().copied()))
    }

    #[test]
    fn promote_is_switchover_and_the_target_is_positional_or_to() {
        let cli = parse(&["promote", "db", "db-2"]).unwrap();
        assert!(matches!(cli.command, Command::Switchover { pod: Some(ref p), .. } if p == "db-2"));
        let cli = parse(&["switchover", "db", "--to", "db-1", "-n", "prod"]).unwrap();
        assert!(matches!(cli.command, Command::Switchover { to: Some(ref p), .. } if p == "db-1"));
        assert_eq!(cli.kube.namespace.as_deref(), Some("prod"));
        assert!(parse(&["switchover", "db", "db-1", "--to", "db-2"]).is_err());
    }

    #[test]
    fn the_postgres_cluster_argument_is_not_the_kubeconfig_cluster() {
        let cli = parse(&["fence", "db", "db-1"]).unwrap();
        assert_eq!(cli.kube.kube_cluster, None);
        let cli = parse(&["status", "db", "--cluster", "prod-eu"]).unwrap();
        assert_eq!(cli.kube.kube_cluster.as_deref(), Some("prod-eu"));
        assert!(matches!(cli.command, Command::Status { ref cluster, .. } if cluster == "db"));
    }

    #[test]
    fn psql_passes_what_follows_the_double_dash_and_refuses_replica_with_pod() {
        let cli = parse(&["psql", "db", "--", "-c", "select 1"]).unwrap();
        match cli.command {
            Command::Psql { args, replica, .. } => {
                assert_eq!(args, ["-c", "select 1"]);
                assert!(!replica);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["psql", "db", "--replica", "--pod", "db-1"]).is_err());
    }

    #[test]
    fn argument_checks_refuse_what_would_fail_later() {
        let check = |args: &[&str]| parse(args).unwrap().command.check();
        assert!(check(&["restart", "db", "--no-wait"]).is_err());
        assert!(check(&["restart", "db", "db-0", "--no-wait"]).is_ok());
        assert!(check(&["backup", "db", "--name", "Nightly_1"]).is_err());
        assert!(check(&["backup", "db", "--name", "nightly-1"]).is_ok());
        assert!(check(&["switchover", "db", "--timeout", "0"]).is_err());
        assert!(check(&["status", "db"]).is_ok());
    }

    #[test]
    fn backup_flags_take_the_api_spelling() {
        let cli = parse(&["backup", "db", "--method", "barmanCloud", "--type", "incr"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Backup {
                method: Method::BarmanCloud,
                backup_type: BackupKind::Incr,
                ..
            }
        ));
    }

    #[test]
    fn a_storage_class_needs_a_volume_size() {
        let cli = parse(&[
            "backup",
            "db",
            "--volume-size",
            "10Gi",
            "--storage-class",
            "fast",
        ]);
        assert!(matches!(
            cli.unwrap().command,
            Command::Backup { volume_size: Some(size), storage_class: Some(class), .. }
                if size == "10Gi" && class == "fast"
        ));
        assert!(parse(&["backup", "db", "--storage-class", "fast"]).is_err());
    }

    #[test]
    fn object_names_follow_rfc_1123() {
        assert!(is_dns_subdomain("db-20261204t0400"));
        assert!(!is_dns_subdomain("-db"));
        assert!(!is_dns_subdomain("db-"));
        assert!(!is_dns_subdomain(""));
        assert!(!is_dns_subdomain(&"a".repeat(254)));
    }
}
