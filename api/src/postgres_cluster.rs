//! PostgresCluster: a highly available PostgreSQL 18+ cluster (one primary, N replicas), optionally sharded.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{LocalObjectReference, S3Store, StorageSpec, default_true};

mod sharded;
pub use sharded::{
    LookupVindexSpec, RouterAutoscaling, RouterSpec, ShardKeyType, ShardedTableSpec, ShardingSpec,
    TableGroupSpec,
};

/// Annotation that asks the instance managers for a switchover to the named instance (pod name).
pub const SWITCHOVER_ANNOTATION: &str = "postgres.keiailab.io/switchover-to";
/// Annotation on a cluster or a pod that fences instances: `"*"` or a comma-separated list of pod names.
pub const FENCED_ANNOTATION: &str = "postgres.keiailab.io/fenced";
/// Annotation that hibernates a cluster (`"on"`), as `spec.hibernation` does.
pub const HIBERNATION_ANNOTATION: &str = "postgres.keiailab.io/hibernation";

/// Desired state of a PostgresCluster.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "postgres.keiailab.io",
    version = "v1alpha1",
    kind = "PostgresCluster",
    namespaced,
    status = "PostgresClusterStatus",
    shortname = "pgc",
    category = "postgres",
    printcolumn = r#"{"name":"Instances","type":"integer","jsonPath":".spec.instances"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyInstances"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.currentPrimary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.image) != has(self.imageCatalogRef)",
        "message": "set exactly one of image or imageCatalogRef: image names the PostgreSQL image directly, imageCatalogRef picks it from an ImageCatalog by postgresVersion"
    },
    {
        "rule": "!has(self.replication) || !has(self.replication.synchronous) || self.replication.synchronous.number < self.instances",
        "message": "replication.synchronous.number must be lower than instances: each synchronous standby is a replica, and the primary is not one of them"
    },
    {
        "rule": "!has(oldSelf.sharding) || (has(self.sharding) && self.sharding.shards == oldSelf.sharding.shards)",
        "message": "sharding.shards cannot be changed (nor sharding removed): a ShardSplitJob adds a shard (its targetShard) and moves a range onto it online"
    },
    {
        "rule": "has(oldSelf.sharding) || !has(self.sharding)",
        "message": "sharding cannot be turned on for an existing cluster: create a sharded cluster and move the data"
    },
    {
        "rule": "!has(self.replica) || !self.replica.enabled || (has(self.bootstrap) && has(self.bootstrap.recovery))",
        "message": "replica.enabled needs bootstrap.recovery: a replica cluster is restored from its source's backup (bootstrap.recovery.source, sourceCluster) and then follows that source's WAL archive"
    },
    {
        "rule": "!has(self.replica) || !self.replica.enabled || !has(self.bootstrap) || !has(self.bootstrap.recovery) || !has(self.bootstrap.recovery.target)",
        "message": "a replica cluster follows its source to the end of the WAL archive, so bootstrap.recovery.target does not apply: remove the target, or turn replica.enabled off for a point-in-time recovery"
    },
    {
        "rule": "!has(self.replica) || !self.replica.enabled || self.tls.mode != 'Disabled'",
        "message": "a replica cluster needs TLS (tls.mode OperatorCA or CertManager): until it is promoted its roles are the source's, with the source's passwords, so its instances replicate with certificates"
    },
    {
        "rule": "!has(self.sharding) || !has(self.bootstrap) || !has(self.bootstrap.volume)",
        "message": "a sharded cluster cannot be restored from one volume: each shard has its own data; restore the shards from their object store backups (bootstrap.recovery)"
    },
    {
        "rule": "!has(self.replica) || !self.replica.enabled || !has(self.sharding)",
        "message": "a sharded cluster cannot be a replica cluster: make each shard's source a replica cluster of its own instead"
    },
    {
        "rule": "!has(self.replica) || !self.replica.enabled || (has(oldSelf.replica) && oldSelf.replica.enabled)",
        "message": "replica.enabled can be turned off (which promotes the cluster) but not on: a replica cluster is created as one, from its source's backup, and a promoted cluster has a history of its own"
    },
    {
        "rule": "self.postgresVersion == oldSelf.postgresVersion",
        "message": "postgresVersion is immutable: this operator does not run major upgrades (pg_upgrade) yet, and an image of another major version cannot start on this data; move the data to a new cluster (pg_dump, or logical replication). Minor upgrades change the catalog's image for the same major version"
    }
]))]
pub struct PostgresClusterSpec {
    /// Number of PostgreSQL instances: one primary and `instances - 1` streaming replicas (per shard when sharded).
    #[serde(default = "default_instances")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 1", "message": "instances must be at least 1"},
        {"rule": "self <= 32", "message": "instances must be at most 32"}
    ]))]
    pub instances: i32,

    /// PostgreSQL major version. 18 or newer; with imageCatalogRef it selects the catalog's image.
    /// Immutable: major upgrades are not run by the operator yet.
    #[serde(default = "default_postgres_version")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 18", "message": "PostgreSQL major versions below 18 are not supported: set postgresVersion to 18 or newer"}
    ]))]
    pub postgres_version: i32,

    /// PostgreSQL container image. Exactly one of image and imageCatalogRef must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// ImageCatalog or ClusterImageCatalog that maps postgresVersion to an image. Changing the
    /// catalog's image rolls the cluster (minor upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_catalog_ref: Option<ImageCatalogRef>,

    /// Volume for the data directory (PGDATA).
    #[serde(default)]
    pub storage: StorageSpec,

    /// Separate volume for the write-ahead log; WAL lives on the data volume when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_storage: Option<StorageSpec>,

    /// CPU and memory requests and limits of the PostgreSQL container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// PostgreSQL configuration: parameters and pg_hba rules.
    #[serde(default)]
    pub postgresql: PostgresConfiguration,

    /// Streaming replication between the primary and its replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationSpec>,

    /// Failover and switchover timing.
    #[serde(default)]
    pub failover: FailoverSpec,

    /// How the cluster's data comes to be: a new database (initdb) or a recovery from a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,

    /// A replica cluster (disaster recovery in another Kubernetes cluster or region): restored
    /// from `bootstrap.recovery`'s source, it keeps replaying the source's WAL archive, read-only,
    /// until `replica.enabled` is turned off, which promotes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaSpec>,

    /// Where WAL archives and base backups go, and how long they are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupRepositorySpec>,

    /// TLS for client and replication connections.
    #[serde(default)]
    pub tls: TlsSpec,

    /// Metrics and alerting.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// Hibernation scales the cluster to zero pods and keeps its volumes; turning it off brings the same data back.
    #[serde(default)]
    pub hibernation: bool,

    /// Ask for a switchover to the named instance (pod name). The instance managers carry it out;
    /// the annotation `postgres.keiailab.io/switchover-to` does the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub switchover_to: Option<String>,

    /// Instances to fence: PostgreSQL is stopped on them and kept stopped until they leave this list.
    /// `"*"` fences every instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub fenced_instances: Vec<String>,

    /// Pod placement: affinity, tolerations, topology spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,

    /// Sharding: number of shards and the pg-router in front of them. Unset for a single-shard cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding: Option<ShardingSpec>,

    /// Delete the PersistentVolumeClaims when the cluster is deleted. By default they are kept.
    #[serde(default)]
    pub delete_volumes_on_deletion: bool,

    /// More environment variables of the PostgreSQL container: the instance manager, PostgreSQL
    /// and what they run (archive and restore commands, backups) see them. For example a proxy
    /// to the object store (`HTTPS_PROXY`, `NO_PROXY`). A value may come from a Secret or a
    /// ConfigMap (`valueFrom`). A change rolls the cluster. The variables the operator sets are
    /// its own (see `RESERVED_ENV`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [{
        "rule": "self.all(e, !(e.name in ['POD_NAME', 'POD_NAMESPACE', 'POD_IP', 'CLUSTER_NAME', 'PGDATA', 'PGWAL', 'PG_BIN', 'LOG_JSON', 'TLS_DIR', 'APP_DATABASE', 'APP_SECRET', 'DECLARATIVE_RESYNC_SECONDS', 'FAILOVER_DELAY_SECONDS', 'HTTP_ADDRESS', 'INITDB_DATA_CHECKSUMS', 'INITDB_ENCODING', 'INITDB_LOCALE', 'KUBECONFIG', 'LEASE_DURATION_SECONDS', 'LOG_LEVEL', 'MAX_LAG_BYTES', 'METRICS_CUSTOM_QUERIES', 'METRICS_DATABASE', 'METRICS_TIMEOUT_MILLIS', 'SOURCE_ARCHIVE_CHECK_SECONDS', 'PG_LISTEN_ADDRESS', 'PG_PORT', 'PG_RUN_AS_USER', 'PG_RUN_DIR', 'RENEW_DEADLINE_SECONDS', 'RW_SERVICE_ADDRESS', 'SWITCHOVER_TIMEOUT_SECONDS', 'SYNCHRONOUS_DURABILITY', 'SYNCHRONOUS_METHOD', 'SYNCHRONOUS_STANDBYS', 'TICK_MILLIS', 'BARMAN_BIN', 'BACKUP_REPOSITORY', 'BOOTSTRAP_RECOVERY', 'REPLICA_CLUSTER', 'REPLICA_SOURCE_HOST', 'REPLICA_SOURCE_PORT', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'RECOVERY_AWS_ACCESS_KEY_ID', 'RECOVERY_AWS_SECRET_ACCESS_KEY', 'BACKUP_CA_BUNDLE', 'RECOVERY_CA_BUNDLE']))",
        "message": "env may not set a variable the operator sets for the instance manager (POD_*, PG*, the instance manager's settings, backup credentials): use the matching spec field instead"
    }]))]
    pub env: Vec<k8s_openapi::api::core::v1::EnvVar>,

    /// How the `-rw` and `-ro` Services are exposed: ClusterIP (the default, inside the
    /// Kubernetes cluster), NodePort or LoadBalancer, with annotations for the cloud's load
    /// balancer and the client ranges it admits. The `-r` Service stays ClusterIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServicesSpec>,

    /// Who updates the primary in a rolling update (a new image, resources, a restart-only
    /// parameter...). `unsupervised`: the operator switches over to an updated replica and
    /// updates the old primary. `supervised`: the replicas are updated, then the cluster waits
    /// (`Progressing` reason `WaitingForUser`) until someone switches over (`kubectl pg
    /// switchover`, `spec.switchoverTo`), for example in a maintenance window; a single instance
    /// waits for its pod to be deleted.
    #[serde(default)]
    pub primary_update_strategy: PrimaryUpdateStrategy,

    /// Labels and annotations put on every object the operator creates for the cluster: pods,
    /// PersistentVolumeClaims, Services, the StatefulSet, ConfigMaps, Secrets, the
    /// PodDisruptionBudget and, when sharded, the shards and the router. Running pods and
    /// existing claims are updated in place (no restart); a key removed here is removed from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inherited_metadata: Option<InheritedMetadata>,
}

/// Labels and annotations the operator copies onto the objects it creates for a cluster. Keys
/// under `postgres.keiailab.io/` and the `app.kubernetes.io/` labels the operator sets are its own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InheritedMetadata {
    /// Labels (keys and values as Kubernetes labels take them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 63},
        "x-kubernetes-validations" = [
            {
                "rule": "self.all(k, !k.startsWith('postgres.keiailab.io/') && !(k in ['app.kubernetes.io/name', 'app.kubernetes.io/instance', 'app.kubernetes.io/managed-by']))",
                "message": "inheritedMetadata.labels may not set the operator's own labels (keys under postgres.keiailab.io/, app.kubernetes.io/name, app.kubernetes.io/instance, app.kubernetes.io/managed-by)"
            },
            {
                "rule": "self.all(k, k.size() <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))",
                "message": "each inheritedMetadata.labels key must be a Kubernetes label key: an optional DNS prefix and '/', then a name of at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            },
            {
                "rule": "self.all(k, self[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$'))",
                "message": "each inheritedMetadata.labels value must be a Kubernetes label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (or empty)"
            }
        ]
    ))]
    pub labels: BTreeMap<String, String>,

    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 4096},
        "x-kubernetes-validations" = [
            {
                "rule": "self.all(k, !k.startsWith('postgres.keiailab.io/'))",
                "message": "inheritedMetadata.annotations may not set the operator's own annotations (keys under postgres.keiailab.io/)"
            },
            {
                "rule": "self.all(k, k.size() <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))",
                "message": "each inheritedMetadata.annotations key must be a Kubernetes annotation key: an optional DNS prefix and '/', then a name of at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            }
        ]
    ))]
    pub annotations: BTreeMap<String, String>,
}

fn default_instances() -> i32 {
    1
}

fn default_postgres_version() -> i32 {
    crate::common::MIN_POSTGRES_MAJOR
}

/// Reference to an ImageCatalog (namespaced) or ClusterImageCatalog.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageCatalogRef {
    /// `ImageCatalog` (same namespace) or `ClusterImageCatalog`.
    #[serde(default)]
    pub kind: ImageCatalogKind,
    /// Name of the catalog.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Kind of image catalog.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImageCatalogKind {
    /// A namespaced ImageCatalog.
    #[default]
    ImageCatalog,
    /// A cluster-scoped ClusterImageCatalog.
    ClusterImageCatalog,
}

/// PostgreSQL parameters and host-based authentication.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresConfiguration {
    /// postgresql.conf parameters. Parameters that only need a reload are applied without a restart;
    /// the others roll the cluster (replicas first). The operator owns listen_addresses, port,
    /// data_directory, hba_file, ident_file, primary_conninfo, primary_slot_name, restore_command,
    /// archive_command and synchronous_standby_names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 256,
        "x-kubernetes-validations" = [{
            "rule": "['listen_addresses', 'port', 'data_directory', 'hba_file', 'ident_file', 'primary_conninfo', 'primary_slot_name', 'restore_command', 'archive_command', 'synchronous_standby_names'].all(k, !(k in self))",
            "message": "postgresql.parameters may not set settings the operator manages: listen_addresses, port, data_directory, hba_file, ident_file, primary_conninfo, primary_slot_name, restore_command, archive_command, synchronous_standby_names"
        }]
    ))]
    pub parameters: BTreeMap<String, String>,

    /// Extra pg_hba.conf lines, placed before the operator's own rules (which allow replication and
    /// SCRAM-SHA-256 connections from the pod network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("items" = {
        "type": "string",
        "maxLength": 1024,
        "x-kubernetes-validations": [{
            "rule": "self.matches('^\\\\s*(local|host|hostssl|hostnossl|hostgssenc|hostnogssenc)\\\\s+\\\\S+')",
            "message": "each pg_hba line must start with local, host, hostssl, hostnossl, hostgssenc or hostnogssenc followed by the database"
        }]
    }))]
    pub pg_hba: Vec<String>,
}

/// Streaming replication settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSpec {
    /// Synchronous replication; replication is asynchronous when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous: Option<SynchronousReplication>,
    /// Largest replication lag, in bytes, for a replica to count as ready and to be eligible for promotion.
    #[serde(default = "default_max_lag_bytes")]
    #[schemars(range(min = 0))]
    pub max_lag_bytes: i64,
}

fn default_max_lag_bytes() -> i64 {
    16 * 1024 * 1024
}

/// Synchronous replication: commits wait for `number` standbys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SynchronousReplication {
    /// `any` (quorum: any `number` of the replicas) or `first` (priority order).
    #[serde(default)]
    pub method: SynchronousMethod,
    /// How many standbys must confirm each commit. Must be lower than instances.
    #[serde(default = "default_sync_number")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 1", "message": "replication.synchronous.number must be at least 1"}
    ]))]
    pub number: i32,
    /// `required`: writes wait when too few standbys are healthy (no acknowledged commit is ever lost).
    /// `preferred`: the operator lowers the number to the healthy standbys so that writes go on.
    #[serde(default)]
    pub data_durability: DataDurability,
}

fn default_sync_number() -> i32 {
    1
}

/// Synchronous standby selection.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SynchronousMethod {
    /// `ANY n (...)`: quorum commit.
    #[default]
    Any,
    /// `FIRST n (...)`: priority commit.
    First,
}

pub use crate::common::{ServiceExposure, ServiceType};

/// Environment variables the operator sets on the PostgreSQL container (the instance manager's
/// settings and the contract between them): `spec.env` may not set them. The instance manager's
/// tests check that every variable it reads is here, and the API's that the CEL rule on
/// `spec.env` names each.
pub const RESERVED_ENV: &[&str] = &[
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_IP",
    "CLUSTER_NAME",
    "PGDATA",
    "PGWAL",
    "PG_BIN",
    "LOG_JSON",
    "TLS_DIR",
    "APP_DATABASE",
    "APP_SECRET",
    "DECLARATIVE_RESYNC_SECONDS",
    "FAILOVER_DELAY_SECONDS",
    "HTTP_ADDRESS",
    "INITDB_DATA_CHECKSUMS",
    "INITDB_ENCODING",
    "INITDB_LOCALE",
    "KUBECONFIG",
    "LEASE_DURATION_SECONDS",
    "LOG_LEVEL",
    "MAX_LAG_BYTES",
    "METRICS_CUSTOM_QUERIES",
    "METRICS_DATABASE",
    "METRICS_TIMEOUT_MILLIS",
    "SOURCE_ARCHIVE_CHECK_SECONDS",
    "PG_LISTEN_ADDRESS",
    "PG_PORT",
    "PG_RUN_AS_USER",
    "PG_RUN_DIR",
    "RENEW_DEADLINE_SECONDS",
    "RW_SERVICE_ADDRESS",
    "SWITCHOVER_TIMEOUT_SECONDS",
    "SYNCHRONOUS_DURABILITY",
    "SYNCHRONOUS_METHOD",
    "SYNCHRONOUS_STANDBYS",
    "TICK_MILLIS",
    "BARMAN_BIN",
    "BACKUP_REPOSITORY",
    "BOOTSTRAP_RECOVERY",
    "REPLICA_CLUSTER",
    "REPLICA_SOURCE_HOST",
    "REPLICA_SOURCE_PORT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "RECOVERY_AWS_ACCESS_KEY_ID",
    "RECOVERY_AWS_SECRET_ACCESS_KEY",
    "BACKUP_CA_BUNDLE",
    "RECOVERY_CA_BUNDLE",
];

/// Exposure of the cluster's client Services.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicesSpec {
    /// The `-rw` Service (the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_write: Option<ServiceExposure>,
    /// The `-ro` Service (the replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<ServiceExposure>,
}

/// Who updates the primary in a rolling update.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryUpdateStrategy {
    /// The operator switches over and updates the old primary.
    #[default]
    Unsupervised,
    /// The operator waits for a user's switchover.
    Supervised,
}

/// What wins when too few synchronous standbys are healthy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataDurability {
    /// Durability wins: writes wait.
    #[default]
    Required,
    /// Availability wins: the required number drops to the healthy standbys.
    Preferred,
}

/// Failover and switchover timing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.renewDeadlineSeconds < self.leaseDurationSeconds", "message": "failover.renewDeadlineSeconds must be lower than leaseDurationSeconds, so that a primary that cannot renew fences itself before anyone else may take the lease"}
]))]
pub struct FailoverSpec {
    /// Duration of the primary's Lease. A replica may take over this long after the last renewal.
    #[serde(default = "default_lease_duration")]
    #[schemars(range(min = 2, max = 300))]
    pub lease_duration_seconds: i32,
    /// A primary that has not renewed its Lease for this long fences itself (stops accepting writes).
    #[serde(default = "default_renew_deadline")]
    #[schemars(range(min = 1, max = 299))]
    pub renew_deadline_seconds: i32,
    /// Extra wait after the Lease expired before a replica promotes.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub failover_delay_seconds: i32,
    /// Longest time a switchover waits for the target to catch up before it gives up.
    #[serde(default = "default_switchover_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub switchover_timeout_seconds: i32,
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            lease_duration_seconds: default_lease_duration(),
            renew_deadline_seconds: default_renew_deadline(),
            failover_delay_seconds: 0,
            switchover_timeout_seconds: default_switchover_timeout(),
        }
    }
}

fn default_lease_duration() -> i32 {
    4
}

fn default_renew_deadline() -> i32 {
    2
}

fn default_switchover_timeout() -> i32 {
    60
}

/// How the cluster's data comes to be: initdb, recovery from an object store, or a volume
/// (initdb when none is set). Recovery and volume together restore the base backup from the
/// volume and then replay the source's WAL archive (`recovery.source`) to `recovery.target`, or
/// follow it as a replica cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.initdb) || (!has(self.recovery) && !has(self.volume))", "message": "bootstrap.initdb creates an empty cluster: it cannot be combined with recovery (from an object store) or volume (from a BackupJob's volume)"},
    {"rule": "!has(self.volume) || !has(self.recovery) || !has(self.recovery.backupId)", "message": "with bootstrap.volume the base backup is the volume: remove recovery.backupId (recovery then only names the WAL archive to replay, and the target)"},
    {"rule": "self == oldSelf", "message": "bootstrap is immutable: it only describes how the cluster was first created"}
]))]
pub struct BootstrapSpec {
    /// Create a new database cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initdb: Option<InitdbBootstrap>,
    /// Restore from a backup, optionally to a point in time. With `volume`, only the WAL archive
    /// of `source` and the `target` are read from it: the base backup is the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryBootstrap>,
    /// Restore from a base backup a BackupJob took to a volume (its `status.volumeClaim`): the
    /// first instance's data volume is filled from that claim by a Job before the instance
    /// starts, and the cluster starts at the backup's end; with `recovery` as well, it replays
    /// the source's archived WAL from there (to `recovery.target`, or with no end as a replica
    /// cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeBootstrap>,
}

/// A backup on a volume to restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBootstrap {
    /// PersistentVolumeClaim in the cluster's namespace holding the backup (a BackupJob's
    /// `status.volumeClaim`). It is only read.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

/// Replica cluster settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSpec {
    /// While true, the cluster replays `bootstrap.recovery.source`'s WAL archive and accepts no
    /// writes (its primary is a designated primary: a standby its replicas stream from). Set to
    /// false to promote the cluster: it then accepts writes and archives to its own `backup`.
    pub enabled: bool,
    /// Stream the source's WAL from its primary as well as replaying its archive: the replica
    /// cluster then trails the source by seconds, not by the archive's pace (`archive_timeout`).
    /// The archive stays the fallback while the source cannot be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<ReplicaStreaming>,
}

/// Where the source's primary is, and the certificates to stream from it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStreaming {
    /// Host name of the source's read-write endpoint as this cluster's pods reach it (its
    /// `<source>-rw.<namespace>.svc` in the same Kubernetes cluster, or a load balancer's name
    /// listed in the source's `tls.serverAltDnsNames`): the source's server certificate must
    /// name it (`sslmode=verify-full`).
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port.
    #[serde(default = "default_postgres_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Secret with the source's CA certificate (`ca.crt`) and a client certificate of the
    /// source's `streaming_replica` role signed by that CA (`tls.crt`, `tls.key`): the source's
    /// `<source>-replication-tls` Secret holds all three.
    pub certificate_secret: LocalObjectReference,
}

fn default_postgres_port() -> i32 {
    5432
}

/// initdb options.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitdbBootstrap {
    /// Application database to create.
    #[serde(default = "default_app_name")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z_][a-z0-9_]*$"),
        extend("x-kubernetes-validations" = [
            {"rule": "!(self in ['postgres', 'template0', 'template1'])", "message": "database may not be postgres, template0 or template1: those exist in every cluster and belong to the superuser"}
        ])
    )]
    pub database: String,
    /// Owner of the application database; a login role with a generated password in `<cluster>-app`.
    #[serde(default = "default_app_name")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z_][a-z0-9_]*$"),
        extend("x-kubernetes-validations" = [
            {"rule": "!self.startsWith('pg_')", "message": "owner may not start with pg_: PostgreSQL reserves those role names"},
            {"rule": "!(self in ['postgres', 'streaming_replica', 'pgbouncer_auth'])", "message": "owner may not be postgres, streaming_replica or pgbouncer_auth: those roles belong to the operator"}
        ])
    )]
    pub owner: String,
    /// Secret (keys `username`, `password`) for the owner; generated when unset. Its `username`
    /// must be `owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<LocalObjectReference>,
    /// Enable data page checksums.
    #[serde(default = "default_true")]
    pub data_checksums: bool,
    /// Database encoding.
    #[serde(default = "default_encoding")]
    #[schemars(length(max = 32))]
    pub encoding: String,
    /// Locale of the new cluster.
    #[serde(default = "default_locale")]
    #[schemars(length(max = 64))]
    pub locale: String,
}

impl Default for InitdbBootstrap {
    fn default() -> Self {
        Self {
            database: default_app_name(),
            owner: default_app_name(),
            secret: None,
            data_checksums: true,
            encoding: default_encoding(),
            locale: default_locale(),
        }
    }
}

fn default_app_name() -> String {
    "app".to_string()
}

fn default_encoding() -> String {
    "UTF8".to_string()
}

fn default_locale() -> String {
    "C".to_string()
}

/// Recovery from a backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryBootstrap {
    /// Object store holding the source cluster's backups and WAL.
    pub source: S3Store,
    /// Name of the source cluster in that store.
    #[schemars(length(min = 1, max = 63))]
    pub source_cluster: String,
    /// Backup label to restore; the latest suitable backup when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub backup_id: Option<String>,
    /// Point-in-time recovery target; recovers to the end of the archived WAL when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RecoveryTarget>,
}

/// A point-in-time recovery target: exactly one of time, lsn, xid, name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.time), has(self.lsn), has(self.xid), has(self.name)].filter(x, x).size() == 1", "message": "a recovery target takes exactly one of time, lsn, xid or name"}
]))]
pub struct RecoveryTarget {
    /// RFC 3339 timestamp, for example `2026-11-24T10:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$')", "message": "target.time must be an RFC 3339 timestamp such as 2026-11-24T10:00:00Z"}
    ]))]
    pub time: Option<String>,
    /// WAL location, for example `0/3000060`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
    )]
    pub lsn: Option<String>,
    /// Transaction id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 3))]
    pub xid: Option<i64>,
    /// Restore point created with pg_create_restore_point().
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub name: Option<String>,
    /// Stop just after (true) or just before (false) the target.
    #[serde(default = "default_true")]
    pub inclusive: bool,
}

/// Where WAL archives and base backups go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRepositorySpec {
    /// S3-compatible object store.
    pub s3: S3Store,
    /// Archive WAL continuously (required for point-in-time recovery). When false, no WAL is
    /// archived continuously (the `ContinuousArchiving` condition says `Disabled`), and each base
    /// backup uploads only the WAL it needs to be restored on its own.
    #[serde(default = "default_true")]
    pub wal_archiving: bool,
    /// How long backups are kept, as `<n>d`, `<n>w` or `<n>m` (days, weeks, months).
    #[serde(default = "default_retention")]
    #[schemars(length(max = 8), regex(pattern = r"^[1-9][0-9]*[dwm]$"))]
    pub retention: String,
}

fn default_retention() -> String {
    "30d".to_string()
}

/// TLS for client and replication connections.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'CertManager' || has(self.certManager)", "message": "tls.mode CertManager needs tls.certManager.issuerRef"},
    {"rule": "!has(self.serverAltDnsNames) || size(self.serverAltDnsNames) == 0 || self.mode != 'Disabled'", "message": "tls.serverAltDnsNames needs TLS: set mode OperatorCA or CertManager"}
]))]
pub struct TlsSpec {
    /// `OperatorCA` (the operator's own CA signs the server certificate), `CertManager`, or `Disabled`.
    #[serde(default)]
    pub mode: TlsMode,
    /// cert-manager issuer, for mode CertManager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManagerTls>,
    /// More DNS names for the server certificate, beside the Services' own: the names clients
    /// use from outside the Kubernetes cluster (a load balancer's, see `services`) to verify the
    /// server (`sslmode=verify-full`). A change reissues the certificate; PostgreSQL reloads it
    /// without a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("items" = {
        "type": "string",
        "maxLength": 253,
        "x-kubernetes-validations": [{
            "rule": "self.matches('^(\\\\*\\\\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": "each serverAltDnsNames entry must be a lowercase DNS name such as db.example.com (a leading *. for a wildcard)"
        }]
    }))]
    pub server_alt_dns_names: Vec<String>,
}

/// Who issues the server certificate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TlsMode {
    /// A CA the operator creates per cluster.
    #[default]
    OperatorCA,
    /// A cert-manager Issuer or ClusterIssuer.
    CertManager,
    /// No TLS (not recommended outside tests).
    Disabled,
}

/// cert-manager issuer reference.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerTls {
    /// Issuer reference.
    pub issuer_ref: IssuerRef,
}

/// A cert-manager Issuer or ClusterIssuer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Issuer name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    #[schemars(regex(pattern = r"^(Issuer|ClusterIssuer)$"))]
    pub kind: String,
}

fn default_issuer_kind() -> String {
    "Issuer".to_string()
}

/// Metrics and alerting.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Read figures from PostgreSQL at each scrape of an instance's `/metrics` (database sizes,
    /// connections, replication, WAL, ...); false leaves only the instance manager's own figures.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Create a PodMonitor (Prometheus Operator).
    #[serde(default)]
    pub pod_monitor: bool,
    /// Create a PrometheusRule with the default alerts.
    #[serde(default)]
    pub prometheus_rule: bool,
    /// User-defined metrics: a key of a ConfigMap in the cluster's namespace holding queries in
    /// postgres_exporter's queries.yaml format. Mounted into every instance and re-read when it
    /// changes; a query that fails is reported in `pg_instance_scrape_query_errors{query}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_queries: Option<CustomQueriesSource>,
}

/// A ConfigMap key holding user-defined metrics queries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomQueriesSource {
    /// ConfigMap name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the ConfigMap.
    #[serde(default = "default_custom_queries_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_custom_queries_key() -> String {
    "queries.yaml".to_string()
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            pod_monitor: false,
            prometheus_rule: false,
            custom_queries: None,
        }
    }
}

/// Pod placement.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Affinity rules; the operator adds a preferred anti-affinity between instances when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Topology spread constraints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// Observed state of a PostgresCluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterStatus {
    /// Coarse state: Creating, Healthy, Degraded, Upgrading, SwitchingOver, Hibernated, Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Instances that are running and ready.
    #[serde(default)]
    pub ready_instances: i32,
    /// Pod name of the current primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,
    /// Timeline of the current primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<i64>,
    /// Image the instances run (resolved from the catalog when one is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Per-instance state as the instance managers report it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,
    /// Ready, Progressing and Degraded conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One instance's reported state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Pod name.
    pub name: String,
    /// primary, replica, fenced, starting, or unknown.
    pub role: String,
    /// Whether the instance is ready.
    #[serde(default)]
    pub ready: bool,
    /// PostgreSQL timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<i64>,
    /// Replication lag in bytes (replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// How the instance last got its data: `initdb`, `reinitdb` (a bootstrap cut short, started
    /// over), `restore`, `basebackup`, `rewind`, `reclone` or `restart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_join: Option<String>,
    /// A new cluster's primary that is still making the application role and database: not
    /// ready until they exist.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootstrapping: bool,
    /// The last error the instance manager met, until a later step succeeds (shortened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl PostgresClusterSpec {
    /// A minimal valid spec with `instances` instances of `image`.
    pub fn with_image(instances: i32, image: &str) -> Self {
        Self {
            instances,
            postgres_version: crate::common::MIN_POSTGRES_MAJOR,
            image: Some(image.to_string()),
            image_catalog_ref: None,
            storage: StorageSpec::default(),
            wal_storage: None,
            resources: None,
            postgresql: PostgresConfiguration::default(),
            replication: None,
            failover: FailoverSpec::default(),
            bootstrap: None,
            replica: None,
            backup: None,
            tls: TlsSpec::default(),
            monitoring: MonitoringSpec::default(),
            hibernation: false,
            switchover_to: None,
            fenced_instances: Vec::new(),
            scheduling: None,
            sharding: None,
            delete_volumes_on_deletion: false,
            env: Vec::new(),
            services: None,
            primary_update_strategy: PrimaryUpdateStrategy::Unsupervised,
            inherited_metadata: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// The CEL rule on `spec.env` is written out by hand: it must name every reserved variable.
    #[test]
    fn the_env_rule_refuses_every_reserved_variable() {
        let crd = serde_json::to_string(&PostgresCluster::crd()).unwrap();
        let start = crd.find("self.all(e, !(e.name in [").expect("the env rule");
        let rule = &crd[start..start + crd[start..].find(']').unwrap()];
        for name in RESERVED_ENV {
            assert!(
                rule.contains(&format!("'{name}'")),
                "{name} missing from {rule}"
            );
        }
        assert_eq!(rule.matches('\'').count(), RESERVED_ENV.len() * 2, "{rule}");
    }
}
