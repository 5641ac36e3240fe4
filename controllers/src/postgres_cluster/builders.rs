//! Pure builders: from a PostgresCluster (and what the reconciler resolved for it) to the objects
//! that should exist. No client calls here; the reconciler applies what these functions return.

use std::collections::BTreeMap;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume,
    VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use rand::Rng;

use super::parameters;
use crate::inherited;

/// User and group id the PostgreSQL container runs as (the `postgres` user of the official
/// Debian-based PostgreSQL images). The restricted Pod Security Standard forbids root.
pub const POSTGRES_UID: i64 = 999;
/// Name of the data volume claim template (PVCs are `pgdata-<pod>`).
pub const DATA_VOLUME: &str = "pgdata";
/// Name of the WAL volume claim template (PVCs are `pg-wal-<pod>`).
pub const WAL_VOLUME: &str = "pg-wal";
/// Name of the PostgreSQL container.
pub const POSTGRES_CONTAINER: &str = "postgres";
/// Length of generated passwords (alphanumeric: about 190 bits).
pub const PASSWORD_LENGTH: usize = 32;

/// What the reconciler resolved for a cluster before building: inputs that are not in its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// PostgreSQL image (from `spec.image` or the image catalog).
    pub image: String,
    /// Image that carries the instance manager binary (`pg-instance`), copied into each pod.
    pub instance_manager_image: String,
    /// Secret with the application owner's credentials (generated or named by the user).
    pub app_secret: String,
}

/// Labels on every object the operator creates for `cluster`.
pub fn labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (contract::LABEL_CLUSTER.to_string(), cluster.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "postgresql".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            cluster.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            contract::MANAGED_BY.to_string(),
        ),
    ])
}

/// Label selector that matches the pods (and PVCs) of `cluster`.
pub fn instance_selector(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(contract::LABEL_CLUSTER.to_string(), cluster.to_string())])
}

/// Selector string for list calls: every pod of `cluster`.
pub fn instance_selector_string(cluster: &str) -> String {
    format!("{}={}", contract::LABEL_CLUSTER, cluster)
}

pub(crate) fn name_of(cluster: &PostgresCluster) -> String {
    cluster.metadata.name.clone().unwrap_or_default()
}

/// Metadata of an owned object: name, namespace, labels (the user's inherited ones under the
/// operator's), inherited annotations and the controller owner reference.
pub(crate) fn owned_meta(cluster: &PostgresCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cluster.metadata.namespace.clone(),
        labels: Some(inherited::labels_with(cluster, labels(&name_of(cluster)))),
        annotations: inherited::annotations(cluster),
        owner_references: cluster.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    }
}

/// Pod names of the cluster's instances, in ordinal order (StatefulSet naming).
pub fn pod_names(cluster: &PostgresCluster) -> Vec<String> {
    let name = name_of(cluster);
    (0..cluster.spec.instances.max(0))
        .map(|ordinal| format!("{name}-{ordinal}"))
        .collect()
}

/// A strong random password (alphanumeric, [`PASSWORD_LENGTH`] characters).
pub fn generate_password() -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(PASSWORD_LENGTH)
        .map(char::from)
        .collect()
}

/// A `kubernetes.io/basic-auth` Secret with `username` and `password`. It is created once and
/// never applied again, so its inherited metadata is kept up to date like a pod's (it carries
/// the record of its inherited keys).
pub fn credentials_secret(
    cluster: &PostgresCluster,
    secret_name: String,
    username: &str,
    password: String,
) -> Secret {
    let mut metadata = owned_meta(cluster, secret_name);
    metadata.annotations = Some(inherited::template_annotations(cluster))
        .filter(|annotations| !annotations.is_empty());
    Secret {
        metadata,
        type_: Some("kubernetes.io/basic-auth".to_string()),
        string_data: Some(BTreeMap::from([
            ("username".to_string(), username.to_string()),
            ("password".to_string(), password),
        ])),
        ..Secret::default()
    }
}

/// The owner of the application database (a login role).
pub fn app_owner(cluster: &PostgresCluster) -> String {
    cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|bootstrap| bootstrap.initdb.as_ref())
        .map(|initdb| initdb.owner.clone())
        .unwrap_or_else(|| "app".to_string())
}

/// The Secret of the application owner the user named in `bootstrap.initdb.secret`, if any.
pub fn user_app_secret(cluster: &PostgresCluster) -> Option<String> {
    cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|bootstrap| bootstrap.initdb.as_ref())
        .and_then(|initdb| initdb.secret.as_ref())
        .map(|secret| secret.name.clone())
}

/// ServiceAccount the instance managers run as.
pub fn service_account(cluster: &PostgresCluster) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_meta(cluster, contract::service_account(&name_of(cluster))),
        ..ServiceAccount::default()
    }
}

fn rule(group: &str, resources: &[&str], verbs: &[&str], names: Option<Vec<String>>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        resource_names: names,
        non_resource_urls: None,
    }
}

/// Role of the instance managers, least privilege: their own Lease, their own pods (patch only
/// the cluster's pod names), read access to the cluster's Secrets, ConfigMap and PostgresCluster.
pub fn role(cluster: &PostgresCluster, app_secret: &str) -> Role {
    let name = name_of(cluster);
    let secrets = vec![
        contract::superuser_secret(&name),
        contract::replication_secret(&name),
        app_secret.to_string(),
        // The primary creates the Poolers' auth role with this password (instance/src/pooler).
        contract::pooler_auth_secret(&name),
    ];
    Role {
        metadata: owned_meta(cluster, contract::service_account(&name)),
        rules: Some(vec![
            // `create` cannot be limited by name: the first primary creates the Lease.
            rule("coordination.k8s.io", &["leases"], &["create"], None),
            rule(
                "coordination.k8s.io",
                &["leases"],
                &["get", "list", "watch", "update", "patch"],
                Some(vec![contract::lease_name(&name)]),
            ),
            rule("", &["pods"], &["get", "list", "watch"], None),
            rule(
                "",
                &["pods"],
                &["patch", "update"],
                Some(pod_names(cluster)),
            ),
            rule("", &["secrets"], &["get"], Some(secrets)),
            rule(
                "",
                &["configmaps"],
                &["get", "list", "watch"],
                Some(vec![contract::config_map(&name)]),
            ),
            rule(
                api::common::GROUP,
                &["postgresclusters"],
                &["get", "list", "watch"],
                Some(vec![name.clone()]),
            ),
            // Declarative roles and databases, applied by the primary (instance/src/declarative):
            // watch them, keep their finalizer, write their status, and read or generate the
            // password Secrets they name (any name the user picks, so not limited by name).
            rule(
                api::common::GROUP,
                &["postgresusers", "postgresdatabases"],
                &["get", "list", "watch", "patch"],
                None,
            ),
            rule(
                api::common::GROUP,
                &["postgresusers/status", "postgresdatabases/status"],
                &["patch"],
                None,
            ),
            rule("", &["secrets"], &["get", "create", "update"], None),
            // The cluster's Poolers (their pause timeout), PAUSEd around a switchover and
            // RESUMEd by the new primary (instance/src/pooler/pause.rs).
            rule(api::common::GROUP, &["poolers"], &["get", "list"], None),
            // Events on its own pod (a re-clone it decided alone) and on the PostgresUser /
            // PostgresDatabase objects it applies.
            rule("events.k8s.io", &["events"], &["create", "patch"], None),
        ]),
    }
}

/// Binds the instance managers' ServiceAccount to their Role.
pub fn role_binding(cluster: &PostgresCluster) -> RoleBinding {
    let name = contract::service_account(&name_of(cluster));
    RoleBinding {
        metadata: owned_meta(cluster, name.clone()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_string(),
            kind: "Role".to_string(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name,
            namespace: cluster.metadata.namespace.clone(),
            api_group: None,
        }]),
    }
}

/// Quotes a postgresql.conf value: single quotes, with embedded quotes doubled.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The user's PostgreSQL parameters, as the ConfigMap carries them. The instance manager writes
/// the settings it owns (replication, listen address, synchronous_standby_names from
/// `SYNCHRONOUS_STANDBYS`) and includes this file after them, so that these win.
pub fn effective_parameters(cluster: &PostgresCluster) -> BTreeMap<String, String> {
    cluster.spec.postgresql.parameters.clone()
}

/// postgresql.conf text: one `name = 'value'` line per parameter, sorted by name.
pub fn postgresql_conf(parameters: &BTreeMap<String, String>) -> String {
    parameters
        .iter()
        .map(|(name, value)| format!("{name} = {}\n", quote(value)))
        .collect()
}

/// pg_hba.conf text: the user's lines, then the operator's rules (local peer, replication and
/// SCRAM-SHA-256 connections from anywhere the NetworkPolicy lets through).
pub fn pg_hba_conf(cluster: &PostgresCluster) -> String {
    let mut lines: Vec<String> = cluster.spec.postgresql.pg_hba.clone();
    lines.push("local all all peer".to_string());
    lines.push(format!(
        "host replication {} all scram-sha-256",
        contract::REPLICATION_USER
    ));
    lines.push("host all all all scram-sha-256".to_string());
    lines.iter().map(|line| format!("{line}\n")).collect()
}

/// The ConfigMap with postgresql.conf and pg_hba.conf.
pub fn config_map(cluster: &PostgresCluster) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(cluster, contract::config_map(&name_of(cluster))),
        data: Some(BTreeMap::from([
            (
                contract::CONFIG_KEY_POSTGRESQL.to_string(),
                postgresql_conf(&effective_parameters(cluster)),
            ),
            (
                contract::CONFIG_KEY_PG_HBA.to_string(),
                pg_hba_conf(cluster),
            ),
        ])),
        ..ConfigMap::default()
    }
}

/// Which instances a Service selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// `<cluster>-rw`: the primary (pods labelled role=primary by their instance manager).
    ReadWrite,
    /// `<cluster>-ro`: the replicas.
    ReadOnly,
    /// `<cluster>-r`: every instance.
    Any,
}

/// One of the cluster's three Services. The selectors follow the role label the instance
/// managers set, so the `-rw` Service moves with the primary as soon as the promoted instance
/// relabels itself: its endpoints are empty only between the old primary's demotion and the new
/// one's promotion.
pub fn service(cluster: &PostgresCluster, kind: ServiceKind) -> Service {
    let cluster_name = name_of(cluster);
    let mut selector = instance_selector(&cluster_name);
    let name = match kind {
        ServiceKind::ReadWrite => {
            selector.insert(
                contract::LABEL_ROLE.to_string(),
                contract::role::PRIMARY.to_string(),
            );
            contract::rw_service(&cluster_name)
        }
        ServiceKind::ReadOnly => {
            selector.insert(
                contract::LABEL_ROLE.to_string(),
                contract::role::REPLICA.to_string(),
            );
            contract::ro_service(&cluster_name)
        }
        ServiceKind::Any => contract::any_service(&cluster_name),
    };
    let services = cluster.spec.services.as_ref();
    let exposure = match kind {
        ServiceKind::ReadWrite => services.and_then(|services| services.read_write.clone()),
        ServiceKind::ReadOnly => services.and_then(|services| services.read_only.clone()),
        ServiceKind::Any => None,
    }
    .unwrap_or_default();
    let mut metadata = owned_meta(cluster, name);
    if !exposure.annotations.is_empty() {
        let mut annotations = metadata.annotations.take().unwrap_or_default();
        annotations.extend(exposure.annotations);
        metadata.annotations = Some(annotations);
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(exposure.type_.as_str().to_string()),
            load_balancer_source_ranges: (!exposure.load_balancer_source_ranges.is_empty())
                .then_some(exposure.load_balancer_source_ranges),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("postgresql".to_string()),
                port: i32::from(contract::POSTGRES_PORT),
                target_port: Some(IntOrString::String(
                    contract::PORT_NAME_POSTGRES.to_string(),
                )),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Replicas of the StatefulSet: zero while hibernated (the PVCs stay).
pub fn desired_replicas(cluster: &PostgresCluster) -> i32 {
    if is_hibernated(cluster) {
        0
    } else {
        cluster.spec.instances
    }
}

/// Whether the cluster is asked to hibernate (spec field or annotation `"on"`).
pub fn is_hibernated(cluster: &PostgresCluster) -> bool {
    cluster.spec.hibernation
        || cluster
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(api::postgres_cluster::HIBERNATION_ANNOTATION))
            .is_some_and(|value| value == "on" || value == "true")
}

/// Hash of everything that needs a restart to change: the pod spec the instances are made from
/// (image, resources, scheduling, environment, mounts) and the restart-only parameters (which
/// live in the ConfigMap, not the pod). Pods whose [`contract::ANNOTATION_SPEC_HASH`] differs
/// are rolled: with `OnDelete` nothing else would bring a new template to them.
pub fn spec_hash(cluster: &PostgresCluster, resolved: &Resolved) -> String {
    hash_annotation(&pod_template(cluster, resolved))
}

/// The spec hash a built StatefulSet's pod template carries (see [`spec_hash`]).
pub fn template_hash(stateful_set: &StatefulSet) -> String {
    stateful_set
        .spec
        .as_ref()
        .map(|spec| hash_annotation(&spec.template))
        .unwrap_or_default()
}

fn hash_annotation(template: &PodTemplateSpec) -> String {
    template
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.annotations.as_ref())
        .and_then(|annotations| annotations.get(contract::ANNOTATION_SPEC_HASH))
        .cloned()
        .unwrap_or_default()
}

/// [`spec_hash`] of a built pod spec (the template's metadata is left out: it carries the hash).
fn hash_of(cluster: &PostgresCluster, pod: &PodSpec) -> String {
    let mut text = serde_json::to_string(pod).unwrap_or_default();
    text.push('\n');
    for (name, value) in parameters::restart_only(&effective_parameters(cluster)) {
        text.push_str(&format!("{name}={value}\n"));
    }
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

pub(crate) use api::contract::fnv1a64;

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

fn value_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value),
        value_from: None,
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(contract::INSTANCE_HTTP_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

/// Container security context of the restricted Pod Security Standard.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

pub(crate) fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn empty_dir(name: &str, medium: Option<&str>) -> Volume {
    Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(str::to_string),
            size_limit: None,
        }),
        ..Volume::default()
    }
}

fn secret_volume(name: &str, secret: String) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn claim_template(
    cluster: &PostgresCluster,
    name: &str,
    size: &str,
    class: Option<String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(inherited::labels_with(cluster, labels(&name_of(cluster)))),
            annotations: Some(inherited::template_annotations(cluster))
                .filter(|annotations| !annotations.is_empty()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: class,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(size.to_string()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// Preferred anti-affinity between the cluster's instances (one per node where possible).
fn default_affinity(cluster_name: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(instance_selector(cluster_name)),
                            match_expressions: None,
                        }),
                        topology_key: "kubernetes.io/hostname".to_string(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            required_during_scheduling_ignored_during_execution: None,
        }),
        ..Affinity::default()
    }
}

/// The instance pods' template: the instance manager (copied in by an init container from its
/// own image) runs as PID 1 of the PostgreSQL image and supervises PostgreSQL.
pub fn pod_template(cluster: &PostgresCluster, resolved: &Resolved) -> PodTemplateSpec {
    let name = name_of(cluster);
    let spec = &cluster.spec;
    let initdb = spec
        .bootstrap
        .as_ref()
        .and_then(|bootstrap| bootstrap.initdb.clone())
        .unwrap_or_default();
    let synchronous = spec
        .replication
        .as_ref()
        .and_then(|replication| replication.synchronous.clone())
        .unwrap_or(api::postgres_cluster::SynchronousReplication {
            method: Default::default(),
            number: 0,
            data_durability: Default::default(),
        });
    let manager_path = format!("{}/pg-instance", contract::INSTANCE_MANAGER_MOUNT_PATH);
    let mut env = vec![
        field_env(contract::env::POD_NAME, "metadata.name"),
        field_env(contract::env::POD_NAMESPACE, "metadata.namespace"),
        field_env(contract::env::POD_IP, "status.podIP"),
        value_env(contract::env::CLUSTER_NAME, name.clone()),
        value_env(
            contract::env::PGDATA,
            format!("{}/pgdata", contract::DATA_MOUNT_PATH),
        ),
        value_env(
            contract::env::PG_BIN,
            format!("/usr/lib/postgresql/{}/bin", spec.postgres_version),
        ),
        // The instance manager's own settings (its flags' environment variables).
        value_env("PG_RUN_DIR", "/var/run/postgresql".to_string()),
        // JSON lines, as PostgreSQL's jsonlog beside them: one stream for `kubectl logs`.
        value_env(contract::env::LOG_JSON, "true".to_string()),
        value_env(
            "LEASE_DURATION_SECONDS",
            spec.failover.lease_duration_seconds.to_string(),
        ),
        value_env(
            "RENEW_DEADLINE_SECONDS",
            spec.failover.renew_deadline_seconds.to_string(),
        ),
        value_env(
            "SWITCHOVER_TIMEOUT_SECONDS",
            spec.failover.switchover_timeout_seconds.to_string(),
        ),
        value_env(
            "FAILOVER_DELAY_SECONDS",
            spec.failover.failover_delay_seconds.to_string(),
        ),
        value_env(
            "SYNCHRONOUS_METHOD",
            match synchronous.method {
                api::postgres_cluster::SynchronousMethod::Any => "any",
                api::postgres_cluster::SynchronousMethod::First => "first",
            }
            .to_string(),
        ),
        value_env(
            "SYNCHRONOUS_DURABILITY",
            match synchronous.data_durability {
                api::postgres_cluster::DataDurability::Required => "required",
                api::postgres_cluster::DataDurability::Preferred => "preferred",
            }
            .to_string(),
        ),
        value_env("APP_DATABASE", initdb.database.clone()),
        value_env("APP_SECRET", resolved.app_secret.clone()),
        value_env("INITDB_ENCODING", initdb.encoding.clone()),
        value_env("INITDB_LOCALE", initdb.locale.clone()),
        value_env("INITDB_DATA_CHECKSUMS", initdb.data_checksums.to_string()),
        value_env(
            "SYNCHRONOUS_STANDBYS",
            spec.replication
                .as_ref()
                .and_then(|replication| replication.synchronous.as_ref())
                .map_or(0, |synchronous| synchronous.number)
                .to_string(),
        ),
        value_env(
            "MAX_LAG_BYTES",
            spec.replication
                .as_ref()
                .map_or(16 * 1024 * 1024, |replication| replication.max_lag_bytes)
                .to_string(),
        ),
    ];
    let mut mounts = vec![
        mount(DATA_VOLUME, contract::DATA_MOUNT_PATH, false),
        mount("config", contract::CONFIG_MOUNT_PATH, true),
        mount(
            "superuser",
            &format!("{}/superuser", contract::SECRETS_MOUNT_PATH),
            true,
        ),
        mount(
            "replication",
            &format!("{}/replication", contract::SECRETS_MOUNT_PATH),
            true,
        ),
        mount(
            "app",
            &format!("{}/app", contract::SECRETS_MOUNT_PATH),
            true,
        ),
        mount("controller", contract::INSTANCE_MANAGER_MOUNT_PATH, true),
        mount("run", "/var/run/postgresql", false),
        mount("tmp", "/tmp", false),
        mount("shm", "/dev/shm", false),
    ];
    if spec.wal_storage.is_some() {
        env.push(value_env(
            contract::env::PGWAL,
            format!("{}/pg_wal", contract::WAL_MOUNT_PATH),
        ));
        mounts.push(mount(WAL_VOLUME, contract::WAL_MOUNT_PATH, false));
    }
    env.extend(super::backup_env::instance_env(cluster));
    // The user's own last (the API refuses the names above).
    env.extend(spec.env.iter().cloned());
    let postgres = Container {
        name: POSTGRES_CONTAINER.to_string(),
        image: Some(resolved.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        command: Some(vec![manager_path.clone()]),
        // The user's parameters reach PostgreSQL through the ConfigMap, included last.
        args: Some(vec![
            "--postgres-setting".to_string(),
            format!(
                "include_if_exists={}/{}",
                contract::CONFIG_MOUNT_PATH,
                contract::CONFIG_KEY_POSTGRESQL
            ),
        ]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(contract::PORT_NAME_POSTGRES.to_string()),
                container_port: i32::from(contract::POSTGRES_PORT),
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(contract::PORT_NAME_STATUS.to_string()),
                container_port: i32::from(contract::INSTANCE_HTTP_PORT),
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
        ]),
        startup_probe: Some(http_probe("/healthz", 5, 720)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        resources: spec.resources.clone(),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let install_manager = Container {
        name: "install-instance-manager".to_string(),
        image: Some(resolved.instance_manager_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        command: Some(vec![
            "cp".to_string(),
            "/usr/local/bin/pg-instance".to_string(),
            manager_path,
        ]),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![mount(
            "controller",
            contract::INSTANCE_MANAGER_MOUNT_PATH,
            false,
        )]),
        ..Container::default()
    };
    let scheduling = spec.scheduling.clone().unwrap_or_default();
    let mut pod_labels = labels(&name);
    pod_labels.extend(instance_selector(&name));
    // Inherited metadata is in the template for new pods; running pods get it in place
    // (`inherited.rs`), so it is not in the spec hash and a change restarts nothing.
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(inherited::labels_with(cluster, pod_labels)),
            annotations: Some(inherited::template_annotations(cluster)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(contract::service_account(&name)),
            automount_service_account_token: Some(true),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(i64::from(
                spec.failover.switchover_timeout_seconds.max(30),
            )),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(POSTGRES_UID),
                run_as_group: Some(POSTGRES_UID),
                fs_group: Some(POSTGRES_UID),
                fs_group_change_policy: Some("OnRootMismatch".to_string()),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_string(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            init_containers: Some(vec![install_manager]),
            containers: vec![postgres],
            volumes: Some(vec![
                Volume {
                    name: "config".to_string(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: contract::config_map(&name),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                secret_volume("superuser", contract::superuser_secret(&name)),
                secret_volume("replication", contract::replication_secret(&name)),
                secret_volume("app", resolved.app_secret.clone()),
                empty_dir("controller", None),
                empty_dir("run", None),
                empty_dir("tmp", None),
                empty_dir("shm", Some("Memory")),
            ]),
            affinity: Some(
                scheduling
                    .affinity
                    .unwrap_or_else(|| default_affinity(&name)),
            ),
            node_selector: (!scheduling.node_selector.is_empty())
                .then_some(scheduling.node_selector),
            tolerations: (!scheduling.tolerations.is_empty()).then_some(scheduling.tolerations),
            topology_spread_constraints: (!scheduling.topology_spread_constraints.is_empty())
                .then_some(scheduling.topology_spread_constraints),
            priority_class_name: scheduling.priority_class_name,
            ..PodSpec::default()
        }),
    };
    super::monitoring::configure_pod(&mut template, &spec.monitoring);
    crate::tls::pod::configure_pod(&mut template, cluster);
    let hash = template
        .spec
        .as_ref()
        .map(|pod| hash_of(cluster, pod))
        .unwrap_or_default();
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(contract::ANNOTATION_SPEC_HASH.to_string(), hash);
    template
}

/// The StatefulSet of the instances: `OnDelete` updates (the operator picks the order of a
/// rolling update), PVC templates for data and WAL, zero replicas while hibernated.
pub fn stateful_set(cluster: &PostgresCluster, resolved: &Resolved) -> StatefulSet {
    let name = name_of(cluster);
    let spec = &cluster.spec;
    let mut claims = vec![claim_template(
        cluster,
        DATA_VOLUME,
        &spec.storage.size,
        spec.storage.storage_class.clone(),
    )];
    if let Some(wal) = &spec.wal_storage {
        claims.push(claim_template(
            cluster,
            WAL_VOLUME,
            &wal.size,
            wal.storage_class.clone(),
        ));
    }
    let when_deleted = if spec.delete_volumes_on_deletion {
        "Delete"
    } else {
        "Retain"
    };
    StatefulSet {
        metadata: owned_meta(cluster, name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(desired_replicas(cluster)),
            service_name: Some(contract::any_service(&name)),
            selector: LabelSelector {
                match_labels: Some(instance_selector(&name)),
                match_expressions: None,
            },
            pod_management_policy: Some("OrderedReady".to_string()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_string()),
                rolling_update: None,
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(when_deleted.to_string()),
                    when_scaled: Some("Retain".to_string()),
                },
            ),
            template: pod_template(cluster, resolved),
            volume_claim_templates: Some(claims),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// At most one instance may be disrupted voluntarily at a time.
pub fn pod_disruption_budget(cluster: &PostgresCluster) -> PodDisruptionBudget {
    let name = name_of(cluster);
    PodDisruptionBudget {
        metadata: owned_meta(cluster, name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(instance_selector(&name)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// Ingress to the instances only on the PostgreSQL port and the instance manager's HTTP port.
pub fn network_policy(cluster: &PostgresCluster) -> NetworkPolicy {
    let name = name_of(cluster);
    let port = |number: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(number))),
        protocol: Some("TCP".to_string()),
        end_port: None,
    };
    NetworkPolicy {
        metadata: owned_meta(cluster, name.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(instance_selector(&name)),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                ports: Some(vec![
                    port(contract::POSTGRES_PORT),
                    port(contract::INSTANCE_HTTP_PORT),
                ]),
                from: None,
            }]),
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests;
