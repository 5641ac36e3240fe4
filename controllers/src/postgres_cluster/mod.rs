//! PostgresCluster reconciler: owned objects by server-side apply, status and conditions, rolling
//! updates, image catalogs, hibernation, switchover and fencing passthrough, deletion with a
//! finalizer.
//!
//! Decide, then act: [`builders`], [`parameters`], [`instances`], [`rolling`], [`status`] and
//! [`volumes`] are pure; [`reconcile`] talks to the API server.

pub mod archiving;
pub mod backup_env;
pub mod builders;
pub mod instances;
pub mod monitoring;
pub mod parameters;
pub mod reconcile;
pub mod replica;
pub mod rolling;
mod secrets;
mod stale_primary;
pub mod status;
mod volume_restore;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use api::contract;
use api::postgres_cluster::{ImageCatalogKind, PostgresCluster};
use api::postgres_user::PostgresUser;
use api::{ClusterImageCatalog, ImageCatalog};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::metrics::Metrics;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "postgres-operator";
/// Finalizer the operator puts on every PostgresCluster.
pub const FINALIZER: &str = "postgres.keiailab.io/finalizer";
/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "postgrescluster";

/// Settings of the reconciler that do not come from a cluster's spec.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image that carries the instance manager binary.
    pub instance_manager_image: String,
    /// Requeue interval of a healthy cluster (periodic resync).
    pub resync: Duration,
    /// Validity and renewal threshold of the certificates the operator issues (or asks
    /// cert-manager for).
    pub tls: crate::tls::certificates::Lifetimes,
    /// How long the operator's API client waits on a silent connection (its read timeout).
    pub api_timeout: Duration,
}

impl Settings {
    /// How the controllers watch the API server with this read timeout: see [`crate::watches`].
    pub fn watch_config(&self) -> watcher::Config {
        crate::watches::config(self.api_timeout)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            instance_manager_image: "ghcr.io/keiailab/postgres-operator/pg-instance:latest"
                .to_string(),
            resync: Duration::from_secs(300),
            tls: crate::tls::certificates::Lifetimes::default(),
            api_timeout: crate::operator::DEFAULT_API_TIMEOUT,
        }
    }
}

/// What every reconciliation shares.
pub struct Context {
    /// Client of the API server.
    pub client: Client,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Reconciler settings.
    pub settings: Settings,
}

/// Errors of a reconciliation. Problems in the user's surroundings (a missing Secret) are not
/// errors: they show as the Degraded condition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{what} failed: {source}")]
    Kube {
        /// What the operator was doing, on which object.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Adding, running or removing the finalizer failed.
    #[error("finalizer of PostgresCluster {name}: {source}")]
    Finalizer {
        /// Cluster name.
        name: String,
        /// The finalizer error.
        #[source]
        source: Box<kube::runtime::finalizer::Error<Error>>,
    },
    /// The TLS stage (operator CA, certificates, cert-manager) failed.
    #[error("TLS of PostgresCluster {name}: {source}")]
    Tls {
        /// Cluster name.
        name: String,
        /// What failed.
        #[source]
        source: crate::tls::Error,
    },
    /// The object has no namespace (PostgresCluster is namespaced, so this is a bug).
    #[error("PostgresCluster {0} has no namespace")]
    NoNamespace(String),
}

/// Wraps a client error with what was being done.
pub(crate) fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// Retry after an error: soon, since most are conflicts or a busy API server.
pub fn error_policy(cluster: Arc<PostgresCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(
        cluster = %cluster.name_any(),
        namespace = cluster.namespace().unwrap_or_default(),
        error = %error,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

/// An Api over one namespace, or every namespace when `namespace` is unset.
pub(crate) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Clusters in `store` that use the image catalog `(kind, namespace, name)`.
fn clusters_using_catalog(
    store: &Store<PostgresCluster>,
    kind: ImageCatalogKind,
    namespace: Option<String>,
    name: String,
) -> Vec<ObjectRef<PostgresCluster>> {
    store
        .state()
        .into_iter()
        .filter(|cluster| {
            cluster
                .spec
                .image_catalog_ref
                .as_ref()
                .is_some_and(|reference| {
                    reference.kind == kind
                        && reference.name == name
                        && (kind == ImageCatalogKind::ClusterImageCatalog
                            || cluster.namespace() == namespace)
                })
        })
        .map(|cluster| ObjectRef::from(cluster.as_ref()))
        .collect()
}

/// The shards of the sharded cluster whose private CA Secret `secret` is (none for any other
/// Secret).
fn shards_of_ca_owner(
    store: &Store<PostgresCluster>,
    secret: &Secret,
) -> Vec<ObjectRef<PostgresCluster>> {
    let name = secret.name_any();
    let namespace = secret.namespace();
    let Some(parent) = name.strip_suffix(&contract::tls_ca_private_secret("")) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|cluster| {
            cluster.namespace() == namespace
                && crate::tls::sharded_parent(cluster).as_deref() == Some(parent)
        })
        .map(|cluster| ObjectRef::from_obj(cluster.as_ref()))
        .collect()
}

/// The cluster that owns managed Secret `secret` (its owner reference) and, for a sharded
/// cluster's private CA Secret, that cluster's shards.
fn owner_and_shards(
    store: &Store<PostgresCluster>,
    secret: &Secret,
) -> Vec<ObjectRef<PostgresCluster>> {
    let namespace = secret.namespace();
    let mut clusters: Vec<ObjectRef<PostgresCluster>> = secret
        .owner_references()
        .iter()
        .filter_map(|owner| ObjectRef::from_owner_ref(namespace.as_deref(), owner, ()))
        .collect();
    clusters.extend(shards_of_ca_owner(store, secret));
    clusters
}

/// Runs the PostgresCluster controller until `shutdown` resolves. With `namespace`, only that
/// namespace is watched; otherwise every namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let watch = ctx.settings.watch_config();
    let client = ctx.client.clone();
    let namespace = namespace.as_deref();
    let managed = watch.clone().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        contract::MANAGED_BY
    ));
    let managed_secrets = managed.clone();
    let controller = Controller::new(
        scoped::<PostgresCluster>(&client, namespace),
        watch.clone().any_semantic(),
    );
    let store = controller.store();
    let cluster_catalog_store = store.clone();
    let sharded_store = store.clone();
    let shards_store = store.clone();
    let controller = controller
        .owns(scoped::<StatefulSet>(&client, namespace), managed.clone())
        .owns(scoped::<Service>(&client, namespace), managed.clone())
        .owns(scoped::<ConfigMap>(&client, namespace), managed.clone())
        // A sharded cluster's shards (child clusters) and router.
        .owns(
            scoped::<PostgresCluster>(&client, namespace),
            watch.clone().labels(contract::LABEL_SHARD),
        )
        .owns(scoped::<Deployment>(&client, namespace), managed)
        .watches(
            scoped::<Pod>(&client, namespace),
            watch.clone().labels(contract::LABEL_CLUSTER),
            |pod: Pod| {
                let cluster = pod.labels().get(contract::LABEL_CLUSTER).cloned();
                let namespace = pod.namespace();
                cluster.map(|cluster| {
                    let reference = ObjectRef::<PostgresCluster>::new(&cluster);
                    match namespace {
                        Some(namespace) => reference.within(&namespace),
                        None => reference,
                    }
                })
            },
        )
        // Managed Secrets wake the cluster that owns them (as `owns` would) and, for a sharded
        // cluster's private CA Secret, its shards too: they are issued from that CA, so a step
        // of its renewal reaches their Secrets at once, not at their resync. One watch for
        // both: the API server lists and sends each Secret (certificates, keys) once, not twice.
        .watches(
            scoped::<Secret>(&client, namespace),
            managed_secrets,
            move |secret: Secret| owner_and_shards(&shards_store, &secret),
        )
        // A sharded cluster's router Role names its PostgresUsers' password Secrets.
        .watches(
            scoped::<PostgresUser>(&client, namespace),
            watch.clone(),
            move |user: PostgresUser| {
                let reference = ObjectRef::<PostgresCluster>::new(&user.spec.cluster.name)
                    .within(&user.namespace().unwrap_or_default());
                let sharded = sharded_store
                    .get(&reference)
                    .is_some_and(|cluster| cluster.spec.sharding.is_some());
                sharded.then_some(reference)
            },
        )
        .watches(
            scoped::<ImageCatalog>(&client, namespace),
            watch.clone(),
            move |catalog: ImageCatalog| {
                clusters_using_catalog(
                    &store,
                    ImageCatalogKind::ImageCatalog,
                    catalog.namespace(),
                    catalog.name_any(),
                )
            },
        )
        .watches(
            Api::<ClusterImageCatalog>::all(client.clone()),
            watch.clone(),
            move |catalog: ClusterImageCatalog| {
                clusters_using_catalog(
                    &cluster_catalog_store,
                    ImageCatalogKind::ClusterImageCatalog,
                    None,
                    catalog.name_any(),
                )
            },
        )
        .trigger_backoff(crate::watches::TriggerBackoff::default())
        .with_config(
            ControllerConfig::default()
                .debounce(Duration::from_millis(200))
                .concurrency(concurrency),
        );
    crate::telemetry::run_until_shutdown(
        controller,
        "postgrescluster",
        crate::telemetry::traced(reconcile::reconcile),
        error_policy,
        ctx,
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::runtime::reflector::store::Writer;

    fn owned_by(name: &str) -> OwnerReference {
        OwnerReference {
            api_version: PostgresCluster::api_version(&()).to_string(),
            kind: "PostgresCluster".to_string(),
            name: name.to_string(),
            uid: format!("uid-{name}"),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn cluster(name: &str, parent: Option<&str>) -> PostgresCluster {
        let mut cluster: PostgresCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": PostgresCluster::api_version(&()),
            "kind": "PostgresCluster",
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {"image": "postgres:18"},
        }))
        .expect("a minimal cluster");
        cluster.metadata.owner_references = parent.map(|parent| vec![owned_by(parent)]);
        cluster
    }

    fn secret(name: &str, owner: &str) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.to_string());
        secret.metadata.namespace = Some("apps".to_string());
        secret.metadata.owner_references = Some(vec![owned_by(owner)]);
        secret
    }

    fn names(refs: Vec<ObjectRef<PostgresCluster>>) -> Vec<String> {
        let mut names: Vec<String> = refs
            .into_iter()
            .map(|reference| {
                assert_eq!(reference.namespace.as_deref(), Some("apps"));
                reference.name
            })
            .collect();
        names.sort();
        names
    }

    /// The one Secret watch does what `owns` did (the owner wakes) and, for a sharded
    /// cluster's private CA Secret, wakes its shards as well.
    #[test]
    fn a_managed_secret_wakes_its_owner_and_a_private_ca_its_shards_too() {
        let mut writer: Writer<PostgresCluster> = Writer::default();
        for cluster in [
            cluster("big", None),
            cluster("big-0", Some("big")),
            cluster("big-1", Some("big")),
            cluster("db", None),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(cluster));
        }
        let store = writer.as_reader();
        assert_eq!(
            names(owner_and_shards(&store, &secret("db-server", "db"))),
            ["db"]
        );
        assert_eq!(
            names(owner_and_shards(
                &store,
                &secret(&contract::tls_ca_private_secret("big"), "big")
            )),
            ["big", "big-0", "big-1"]
        );
        // A Secret of a shard is the shard's own business.
        assert_eq!(
            names(owner_and_shards(&store, &secret("big-0-server", "big-0"))),
            ["big-0"]
        );
    }
}
