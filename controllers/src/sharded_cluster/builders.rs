//! Pure builders of what a sharded PostgresCluster owns: one child PostgresCluster per shard, the
//! initial ShardRange objects, and the pg-router Deployment, Service, autoscaler and RBAC.

use std::collections::BTreeMap;

use api::common::ClusterReference;
use api::contract;
use api::postgres_cluster::{PostgresCluster, ShardingSpec, TableGroupSpec};
use api::postgres_user::PostgresUser;
use api::sharding::{ShardRange, ShardRangeSpec, ShardRangeState};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    Service, ServiceAccount, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::inherited;
use crate::postgres_cluster::builders::restricted_container_security;

pub use api::contract::LABEL_ROUTER;
/// Label naming the table group of a ShardRange.
pub const LABEL_TABLE_GROUP: &str = "postgres.keiailab.io/table-group";
/// Default pg-router image.
pub const DEFAULT_ROUTER_IMAGE: &str = "ghcr.io/keiailab/postgres-operator/pg-router:latest";
/// Port pg-router listens on for clients.
pub const ROUTER_PORT: u16 = 5432;
/// Port of pg-router's `/metrics`.
pub const ROUTER_METRICS_PORT: u16 = 9187;
/// Uid of the router process (the image's non-root user).
pub const ROUTER_UID: i64 = 65532;

/// The setting every shard runs with, unless the parent's parameters say otherwise.
pub const SHARD_WAL_LEVEL: (&str, &str) = ("wal_level", "logical");

/// Name of shard `index`, as ShardRange objects name it.
pub fn shard_name(index: i32) -> String {
    format!("shard-{index}")
}

/// Name of the child PostgresCluster that runs shard `shard` of `parent`.
pub fn shard_cluster_name(parent: &str, shard: &str) -> String {
    format!("{parent}-{shard}")
}

/// Name of the router's Deployment, Service, ServiceAccount, Role and RoleBinding.
pub fn router_name(parent: &str) -> String {
    contract::router_service(parent)
}

/// Name of the ShardRange of `group` that initially belongs to shard `index`.
pub fn range_name(parent: &str, group: &str, index: i32) -> String {
    format!("{parent}-{group}-{index}")
}

fn owner(cluster: &PostgresCluster) -> Option<Vec<OwnerReference>> {
    cluster.controller_owner_ref(&()).map(|owner| vec![owner])
}

/// Metadata of an object the sharded cluster owns: `labels` over the user's inherited ones,
/// the inherited annotations.
fn meta(cluster: &PostgresCluster, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cluster.namespace(),
        labels: Some(inherited::labels_with(cluster, labels)),
        annotations: inherited::annotations(cluster),
        owner_references: owner(cluster),
        ..ObjectMeta::default()
    }
}

/// Labels of the router's objects and its pod selector.
pub fn router_labels(parent: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_ROUTER.to_string(), parent.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "pg-router".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), parent.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            contract::MANAGED_BY.to_string(),
        ),
    ])
}

/// The child PostgresCluster of shard `index`: the parent's spec without `sharding` (every
/// shard is a full single-shard cluster: primary, replicas, Lease, Services, volumes), owned by
/// the parent so that it goes with it.
pub fn child_cluster(parent: &PostgresCluster, index: i32) -> PostgresCluster {
    let parent_name = parent.name_any();
    let shard = shard_name(index);
    let mut spec = parent.spec.clone();
    spec.sharding = None;
    // A ShardSplitJob moves rows with logical replication from the shard that holds them, which
    // needs logical decoding there (the instance manager's default is `replica`). Set at
    // creation so that a later split needs no restart; a user's own value is kept.
    spec.postgresql
        .parameters
        .entry(SHARD_WAL_LEVEL.0.to_string())
        .or_insert_with(|| SHARD_WAL_LEVEL.1.to_string());
    let mut labels = BTreeMap::from([
        (contract::LABEL_SHARD.to_string(), shard.clone()),
        (
            "app.kubernetes.io/part-of".to_string(),
            parent_name.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            contract::MANAGED_BY.to_string(),
        ),
    ]);
    labels.insert(LABEL_ROUTER.to_string(), parent_name.clone());
    PostgresCluster {
        metadata: meta(parent, shard_cluster_name(&parent_name, &shard), labels),
        spec,
        status: None,
    }
}

/// Bounds of `shards` equal ranges of the signed 64-bit space, in order: `(start, end)` with the
/// open ends as `None`. They cover the space without gaps or overlaps.
pub fn equal_ranges(shards: i32) -> Vec<(Option<i64>, Option<i64>)> {
    let count = i128::from(shards.max(1));
    let width = (1i128 << 64) / count;
    let bound = |i: i128| (i64::MIN as i128 + i * width) as i64;
    (0..count)
        .map(|i| {
            let start = (i > 0).then(|| bound(i));
            let end = (i + 1 < count).then(|| bound(i + 1));
            (start, end)
        })
        .collect()
}

/// The initial ShardRange objects of `group`: one equal range per shard.
pub fn initial_ranges(
    cluster: &PostgresCluster,
    sharding: &ShardingSpec,
    group: &TableGroupSpec,
) -> Vec<ShardRange> {
    let parent = cluster.name_any();
    equal_ranges(sharding.shards)
        .into_iter()
        .enumerate()
        .map(|(index, (start, end))| {
            let index = index as i32;
            let labels = BTreeMap::from([
                (contract::LABEL_CLUSTER.to_string(), parent.clone()),
                (LABEL_TABLE_GROUP.to_string(), group.name.clone()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    contract::MANAGED_BY.to_string(),
                ),
            ]);
            ShardRange {
                metadata: meta(cluster, range_name(&parent, &group.name, index), labels),
                spec: ShardRangeSpec {
                    cluster: ClusterReference {
                        name: parent.clone(),
                    },
                    table_group: group.name.clone(),
                    shard: shard_name(index),
                    start,
                    end,
                    state: ShardRangeState::Active,
                    vindex: group.vindex,
                    epoch: 0,
                },
                status: None,
            }
        })
        .collect()
}

/// The router's ServiceAccount.
pub fn router_service_account(cluster: &PostgresCluster) -> ServiceAccount {
    let parent = cluster.name_any();
    ServiceAccount {
        metadata: meta(cluster, router_name(&parent), router_labels(&parent)),
        ..ServiceAccount::default()
    }
}

/// The password Secrets of the cluster's login PostgresUsers (what the router watches to follow
/// client logins), sorted.
pub fn router_password_secrets(cluster: &PostgresCluster, users: &[PostgresUser]) -> Vec<String> {
    let parent = cluster.name_any();
    let names: std::collections::BTreeSet<String> = users
        .iter()
        .filter(|user| user.spec.cluster.name == parent && user.spec.attributes.login)
        .filter_map(|user| Some(user.spec.password.as_ref()?.secret_name.clone()))
        .collect();
    names.into_iter().collect()
}

/// What the router reads: its cluster (table groups and tables), the ShardRanges, the shards'
/// primaries (pods labelled `role=primary` and their Leases) and the roles PostgresUser objects declare (`users`:
/// the namespace's; those of this cluster count). Secrets: `get` (the shards' CA Secrets and the
/// password Secrets when it starts), and `list`/`watch` of the password Secrets by name only, so
/// that it follows password changes without being able to list every Secret of the namespace.
pub fn router_role(cluster: &PostgresCluster, users: &[PostgresUser]) -> Role {
    let parent = cluster.name_any();
    let read = |groups: &[&str], resources: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|g| g.to_string()).collect()),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: ["get", "list", "watch"]
            .iter()
            .map(|v| v.to_string())
            .collect(),
        ..PolicyRule::default()
    };
    let mut rules = vec![
        read(
            &[api::common::GROUP],
            &["postgresclusters", "shardranges", "postgresusers"],
        ),
        read(&[""], &["pods"]),
        // The shards' Leases: a pod labelled primary is the primary only while it holds its
        // shard's Lease (a primary cut off from the API server keeps its label).
        read(&["coordination.k8s.io"], &["leases"]),
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_string()]),
            verbs: vec!["get".to_string()],
            ..PolicyRule::default()
        },
    ];
    let watched = router_password_secrets(cluster, users);
    // An empty `resourceNames` would mean every Secret: no rule at all then.
    if !watched.is_empty() {
        rules.push(PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_string()]),
            resource_names: Some(watched),
            verbs: vec!["list".to_string(), "watch".to_string()],
            ..PolicyRule::default()
        });
    }
    Role {
        metadata: meta(cluster, router_name(&parent), router_labels(&parent)),
        rules: Some(rules),
    }
}

/// Binds the router's Role to its ServiceAccount.
pub fn router_role_binding(cluster: &PostgresCluster) -> RoleBinding {
    let parent = cluster.name_any();
    RoleBinding {
        metadata: meta(cluster, router_name(&parent), router_labels(&parent)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_string(),
            kind: "Role".to_string(),
            name: router_name(&parent),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name: router_name(&parent),
            namespace: cluster.namespace(),
            ..Subject::default()
        }]),
    }
}

/// How long pg-router holds a write to a range paused for a split's cut-over before failing it
/// with 40001: longer than the longest pause any ShardSplitJob may take
/// ([`api::sharding::MAX_WRITE_PAUSE_MILLIS`], after which the job resumes writes on the source
/// itself), plus the time the range's change takes to reach the router's watch. A held write
/// thus waits out every cut-over instead of failing in the middle of one.
pub const ROUTER_WRITE_PAUSE_HOLD_MILLIS: i32 = api::sharding::MAX_WRITE_PAUSE_MILLIS + 5_000;

/// The pg-router Deployment: Kubernetes mode (topology from the ShardRange objects), backend
/// credentials from the cluster's superuser Secret, restricted pod security, and writes to a
/// paused range held for [`ROUTER_WRITE_PAUSE_HOLD_MILLIS`].
pub fn router_deployment(cluster: &PostgresCluster, sharding: &ShardingSpec) -> Deployment {
    let parent = cluster.name_any();
    let labels = router_labels(&parent);
    let env = |name: &str, value: &str| EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    };
    let secret = |name: &str, key: &str| EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: contract::superuser_secret(&parent),
                key: key.to_string(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
    };
    let container = Container {
        name: "pg-router".to_string(),
        image: Some(
            sharding
                .router
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_ROUTER_IMAGE.to_string()),
        ),
        args: Some(vec![
            "--kubernetes-cluster".to_string(),
            parent.clone(),
            "--listen".to_string(),
            format!("0.0.0.0:{ROUTER_PORT}"),
            "--metrics-listen".to_string(),
            format!("0.0.0.0:{ROUTER_METRICS_PORT}"),
            "--write-pause-hold-ms".to_string(),
            ROUTER_WRITE_PAUSE_HOLD_MILLIS.to_string(),
        ]),
        env: Some(vec![
            EnvVar {
                name: "POD_NAMESPACE".to_string(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.namespace".to_string(),
                        api_version: None,
                    }),
                    ..EnvVarSource::default()
                }),
            },
            secret("PG_ROUTER_BACKEND_USER", "username"),
            secret("PG_ROUTER_BACKEND_PASSWORD", "password"),
            env("LOG_LEVEL", "info"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("postgres".to_string()),
                container_port: i32::from(ROUTER_PORT),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".to_string()),
                container_port: i32::from(ROUTER_METRICS_PORT),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(ROUTER_PORT)),
                host: None,
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: sharding.router.resources.clone(),
        security_context: Some(restricted_container_security()),
        ..Container::default()
    };
    Deployment {
        metadata: meta(cluster, router_name(&parent), labels.clone()),
        spec: Some(DeploymentSpec {
            // With an autoscaler, the autoscaler owns the replica count.
            replicas: sharding
                .router
                .autoscaling
                .is_none()
                .then_some(sharding.router.replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(inherited::labels_with(cluster, labels)),
                    annotations: inherited::annotations(cluster),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(router_name(&parent)),
                    automount_service_account_token: Some(true),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(ROUTER_UID),
                        run_as_group: Some(ROUTER_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_string(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// Annotation on the router pod template: a hash of the TLS certificate the routers serve, so
/// that a renewed certificate rolls them (pg-router reads its certificate at start).
pub const ANNOTATION_TLS_HASH: &str = "postgres.keiailab.io/tls-certificate-hash";

/// TLS for the router's clients: the cluster's server certificate Secret (whose names include
/// the `-router` Service) mounted read-only for the router's group, and the flags that load it.
pub fn add_router_tls(deployment: &mut Deployment, parent: &str, certificate_hash: &str) {
    let Some(template) = deployment.spec.as_mut().map(|spec| &mut spec.template) else {
        return;
    };
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(
            ANNOTATION_TLS_HASH.to_string(),
            certificate_hash.to_string(),
        );
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    if let Some(security) = pod.security_context.as_mut() {
        security.fs_group = Some(ROUTER_UID);
    }
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "tls".to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(contract::tls_server_secret(parent)),
            // The key: readable by the router's group only.
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    for container in &mut pod.containers {
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: "tls".to_string(),
                mount_path: contract::ROUTER_TLS_MOUNT_PATH.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        let args = container.args.get_or_insert_with(Vec::new);
        for (flag, file) in [
            ("--tls-cert-file", contract::tls_keys::CERTIFICATE),
            ("--tls-key-file", contract::tls_keys::KEY),
        ] {
            args.push(flag.to_string());
            args.push(format!("{}/{file}", contract::ROUTER_TLS_MOUNT_PATH));
        }
    }
}

/// The router Service clients connect to (`<cluster>-router:5432`).
pub fn router_service(cluster: &PostgresCluster) -> Service {
    let parent = cluster.name_any();
    Service {
        metadata: meta(cluster, router_name(&parent), router_labels(&parent)),
        spec: Some(ServiceSpec {
            selector: Some(router_labels(&parent)),
            ports: Some(vec![ServicePort {
                name: Some("postgres".to_string()),
                port: i32::from(ROUTER_PORT),
                target_port: Some(IntOrString::String("postgres".to_string())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The router's HorizontalPodAutoscaler, when `sharding.router.autoscaling` asks for one.
pub fn router_autoscaler(
    cluster: &PostgresCluster,
    sharding: &ShardingSpec,
) -> Option<HorizontalPodAutoscaler> {
    let autoscaling = sharding.router.autoscaling.as_ref()?;
    let parent = cluster.name_any();
    Some(HorizontalPodAutoscaler {
        metadata: meta(cluster, router_name(&parent), router_labels(&parent)),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_string()),
                kind: "Deployment".to_string(),
                name: router_name(&parent),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_string(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_string(),
                    target: MetricTarget {
                        type_: "Utilization".to_string(),
                        average_utilization: Some(autoscaling.target_cpu_utilization_percent),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: None,
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sharded parent `db` in namespace `ns` with two shards of `instances` instances.
    fn parent(instances: i32) -> (PostgresCluster, ShardingSpec) {
        let sharding = ShardingSpec {
            shards: 2,
            router: Default::default(),
            table_groups: Vec::new(),
            sharded_tables: Vec::new(),
            reference_tables: Vec::new(),
        };
        let mut spec = api::PostgresClusterSpec::with_image(instances, "example.org/pg:18");
        spec.sharding = Some(sharding.clone());
        let mut parent = PostgresCluster::new("db", spec);
        parent.metadata.namespace = Some("ns".into());
        (parent, sharding)
    }

    #[test]
    fn equal_ranges_cover_the_signed_space_without_gaps_or_overlaps() {
        for shards in [1, 2, 3, 7, 256] {
            let ranges = equal_ranges(shards);
            assert_eq!(ranges.len(), shards as usize);
            assert_eq!(ranges[0].0, None);
            assert_eq!(ranges[ranges.len() - 1].1, None);
            for pair in ranges.windows(2) {
                assert!(pair[0].1.is_some());
                assert_eq!(pair[0].1, pair[1].0, "{shards} shards");
            }
            for (start, end) in &ranges {
                if let (Some(start), Some(end)) = (start, end) {
                    assert!(start < end);
                }
            }
        }
        assert_eq!(equal_ranges(2)[0].1, Some(0));
    }

    #[test]
    fn a_child_cluster_has_the_parent_spec_without_sharding_and_an_owner() {
        let (mut parent, _) = parent(3);
        parent.metadata.uid = Some("uid-1".into());
        let child = child_cluster(&parent, 1);
        assert_eq!(child.name_any(), "db-shard-1");
        assert!(child.spec.sharding.is_none());
        assert_eq!(child.spec.instances, 3);
        assert_eq!(
            child
                .spec
                .postgresql
                .parameters
                .get("wal_level")
                .map(String::as_str),
            Some("logical"),
            "a split needs logical decoding on its source shard"
        );
        let mut own = parent.clone();
        own.spec
            .postgresql
            .parameters
            .insert("wal_level".into(), "replica".into());
        assert_eq!(
            child_cluster(&own, 0).spec.postgresql.parameters["wal_level"],
            "replica",
            "the user's own value is kept"
        );
        let owner = &child.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.name.as_str(), owner.controller), ("db", Some(true)));
    }

    #[test]
    fn inherited_metadata_reaches_the_shards_and_the_routers_objects_and_pods() {
        let (mut parent, sharding) = parent(1);
        parent.spec.inherited_metadata = Some(api::postgres_cluster::InheritedMetadata {
            labels: BTreeMap::from([("team".to_string(), "payments".to_string())]),
            annotations: BTreeMap::from([("cost-center".to_string(), "42".to_string())]),
        });
        let child = child_cluster(&parent, 0);
        // The shard's own objects get it from its spec.
        assert_eq!(
            child.spec.inherited_metadata,
            parent.spec.inherited_metadata
        );
        let deployment = router_deployment(&parent, &sharding);
        let template = deployment.spec.unwrap().template.metadata.unwrap();
        for meta in [
            child.metadata,
            deployment.metadata,
            template,
            router_service(&parent).metadata,
            router_service_account(&parent).metadata,
        ] {
            assert_eq!(
                meta.labels.as_ref().unwrap()["team"],
                "payments",
                "{:?}",
                meta.name
            );
            assert_eq!(meta.annotations.as_ref().unwrap()["cost-center"], "42");
        }
    }

    #[test]
    fn the_router_holds_a_paused_write_longer_than_any_cut_over_may_pause() {
        let (parent, sharding) = parent(1);
        let deployment = router_deployment(&parent, &sharding);
        let args = deployment.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        let flag = args
            .iter()
            .position(|a| a == "--write-pause-hold-ms")
            .expect("the router's hold is set");
        let hold: i64 = args[flag + 1].parse().unwrap();
        // The largest pause a job may ask for, as the ShardSplitJob schema bounds it.
        let crd =
            serde_json::to_value(<api::sharding::ShardSplitJob as kube::CustomResourceExt>::crd())
                .unwrap();
        let bound = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["maxWritePauseMillis"]["maximum"]
            .as_f64()
            .expect("maxWritePauseMillis has a maximum");
        assert_eq!(bound, f64::from(api::sharding::MAX_WRITE_PAUSE_MILLIS));
        assert!(
            hold as f64 > bound,
            "hold {hold} ms, a cut-over may pause {bound} ms"
        );
    }
}
