//! Shared arrangement of the integration tests: a real API server with the CRDs, the
//! PostgresCluster controller running in-process on one namespace, and helpers that play the
//! parts a kubelet, the StatefulSet controller and the instance managers would.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use api::contract;
use api::postgres_cluster::{PostgresCluster, PostgresClusterSpec};
use controllers::metrics::Metrics;
use controllers::postgres_cluster::{self, Context, Settings};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use testbed::ApiServer;

/// Image of the instance manager in the tests.
pub const MANAGER_IMAGE: &str = "example.org/pg-instance:test";

/// One API server with the operator's controller on `namespace`.
pub struct Env {
    pub client: Client,
    pub namespace: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    controller: Option<tokio::task::JoinHandle<()>>,
    pub server: ApiServer,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(controller) = self.controller.take() {
            controller.abort();
        }
    }
}

impl Env {
    /// Starts the API server, installs the CRDs, creates `namespace` and runs the controller.
    pub async fn start(namespace: &str) -> Env {
        let env = Env::without_controller(namespace).await;
        env.with_controller()
    }

    /// The API server and namespace only.
    pub async fn without_controller(namespace: &str) -> Env {
        let server = ApiServer::start().await.expect("starting the API server");
        server
            .install_crds(&api::all_crds())
            .await
            .expect("installing the CRDs");
        let client = server.client().await.expect("client");
        testbed::apiserver::create_namespace(&client, namespace)
            .await
            .expect("creating the namespace");
        Env {
            client,
            namespace: namespace.to_string(),
            stop: None,
            controller: None,
            server,
        }
    }

    fn with_controller(self) -> Env {
        self.with_settings(Settings {
            instance_manager_image: MANAGER_IMAGE.to_string(),
            ..Settings::default()
        })
    }

    /// Starts the API server and the controller with `settings`.
    pub async fn start_with_settings(namespace: &str, settings: Settings) -> Env {
        Env::without_controller(namespace)
            .await
            .with_settings(settings)
    }

    fn with_settings(mut self, settings: Settings) -> Env {
        let ctx = self.context(settings);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let namespace = self.namespace.clone();
        self.controller = Some(tokio::spawn(async move {
            postgres_cluster::run(ctx, Some(namespace), 8, async {
                let _ = stopped.await;
            })
            .await
        }));
        self.stop = Some(stop);
        self
    }

    /// A controller context on this Env's client with `settings`.
    fn context(&self, settings: Settings) -> Arc<Context> {
        Arc::new(Context {
            client: self.client.clone(),
            recorder: Recorder::new(
                self.client.clone(),
                Reporter {
                    controller: "postgres-operator".into(),
                    instance: Some("test".into()),
                },
            ),
            metrics: Arc::new(Metrics::new()),
            settings,
        })
    }

    /// Runs the Pooler controller in this Env's namespace, with `settings`, beside the cluster
    /// controller.
    pub fn start_pooler_controller(&self, settings: Settings) -> tokio::task::JoinHandle<()> {
        let ctx = self.context(settings);
        let namespace = self.namespace.clone();
        tokio::spawn(async move {
            controllers::pooler::run(ctx, Some(namespace), 4, std::future::pending()).await
        })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn clusters(&self) -> Api<PostgresCluster> {
        self.api()
    }

    /// Creates a cluster from `spec`.
    pub async fn create_cluster(&self, name: &str, spec: PostgresClusterSpec) -> PostgresCluster {
        self.clusters()
            .create(&PostParams::default(), &PostgresCluster::new(name, spec))
            .await
            .expect("creating the PostgresCluster")
    }

    /// Merge-patches the cluster's spec.
    pub async fn patch_spec(&self, name: &str, spec: serde_json::Value) {
        self.clusters()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await
            .expect("patching the PostgresCluster");
    }

    /// Waits until `check` returns `Some` (polling), or panics after 180 s with `what`.
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("gave up waiting: {what}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The cluster once its status satisfies `condition`.
    pub async fn cluster_where(
        &self,
        name: &str,
        what: &str,
        condition: impl Fn(&PostgresCluster) -> bool,
    ) -> PostgresCluster {
        let api = self.clusters();
        self.eventually(what, || {
            let api = api.clone();
            let condition = &condition;
            async move {
                let cluster = api.get_opt(name).await.ok()??;
                condition(&cluster).then_some(cluster)
            }
        })
        .await
    }

    /// The cluster once it reports `phase` for its current generation.
    pub async fn cluster_in_phase(&self, name: &str, phase: &str) -> PostgresCluster {
        self.cluster_where(name, &format!("{name} in phase {phase}"), |cluster| {
            cluster.status.as_ref().is_some_and(|status| {
                status.phase.as_deref() == Some(phase)
                    && status.observed_generation == cluster.metadata.generation
            })
        })
        .await
    }

    /// Waits for an object `name` of kind `K`.
    pub async fn object<K>(&self, name: &str) -> K
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = self.api();
        self.eventually(&format!("object {name} exists"), || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok()? }
        })
        .await
    }

    /// Plays the StatefulSet controller and a kubelet: creates pod `<cluster>-<ordinal>` from
    /// the StatefulSet's current template (with its PVCs), then the instance manager: sets the
    /// role label, the status annotation and the Ready condition.
    pub async fn play_pod(&self, cluster: &str, ordinal: i32, role: &str, ready: bool) {
        let sts: StatefulSet = self.object(cluster).await;
        let spec = sts.spec.unwrap();
        let pod_name = format!("{cluster}-{ordinal}");
        let template = spec.template;
        let mut metadata = template.metadata.unwrap_or_default();
        metadata.name = Some(pod_name.clone());
        metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(contract::LABEL_ROLE.to_string(), role.to_string());
        metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(
                contract::ANNOTATION_INSTANCE_STATUS.to_string(),
                json!({"role": role, "timeline": 1, "lsn": "0/3000060"}).to_string(),
            );
        let mut pod_spec = template.spec.unwrap();
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        for claim in spec.volume_claim_templates.unwrap_or_default() {
            let template_name = claim.metadata.name.clone().unwrap();
            let claim_name = format!("{template_name}-{pod_name}");
            let mut pvc = claim.clone();
            pvc.metadata.name = Some(claim_name.clone());
            if pvcs.get_opt(&claim_name).await.unwrap().is_none() {
                pvcs.create(&PostParams::default(), &pvc)
                    .await
                    .expect("creating a PVC");
            }
            pod_spec.volumes.get_or_insert_with(Vec::new).push(Volume {
                name: template_name,
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name,
                    read_only: None,
                }),
                ..Volume::default()
            });
        }
        pod_spec.hostname = Some(pod_name.clone());
        let pod = Pod {
            metadata,
            spec: Some(pod_spec),
            status: None,
        };
        let pods: Api<Pod> = self.api();
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("creating a pod");
        self.set_ready(&pod_name, ready).await;
    }

    /// Sets the pod's Ready condition, as the kubelet would from the readiness probe.
    pub async fn set_ready(&self, pod: &str, ready: bool) {
        let pods: Api<Pod> = self.api();
        let status = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}
        ]}});
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patching pod status");
    }

    /// Sets the role label, as the instance manager does on its own pod.
    pub async fn set_role(&self, pod: &str, role: &str) {
        let pods: Api<Pod> = self.api();
        let patch = json!({"metadata": {"labels": {contract::LABEL_ROLE: role}}});
        pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("labelling a pod");
    }

    /// Creates the cluster's leader Lease held by `holder`, as the first primary does.
    pub async fn create_lease(&self, cluster: &str, holder: &str) {
        let leases: Api<Lease> = self.api();
        leases
            .create(
                &PostParams::default(),
                &Lease {
                    metadata: ObjectMeta {
                        name: Some(contract::lease_name(cluster)),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(holder.to_string()),
                        lease_duration_seconds: Some(4),
                        ..LeaseSpec::default()
                    }),
                },
            )
            .await
            .expect("creating the Lease");
    }

    /// Names of the cluster's pods that exist.
    pub async fn pod_names(&self, cluster: &str) -> Vec<String> {
        let pods: Api<Pod> = self.api();
        let mut names: Vec<String> = pods
            .list(&ListParams::default().labels(&format!("{}={cluster}", contract::LABEL_CLUSTER)))
            .await
            .unwrap()
            .items
            .iter()
            .map(|pod| pod.name_any())
            .collect();
        names.sort();
        names
    }

    /// Plays a healthy cluster: pod 0 primary, the others replicas, all ready, and the Lease.
    pub async fn play_healthy_cluster(&self, cluster: &str, instances: i32) {
        for ordinal in 0..instances {
            let role = if ordinal == 0 { "primary" } else { "replica" };
            self.play_pod(cluster, ordinal, role, true).await;
        }
        self.create_lease(cluster, &format!("{cluster}-0")).await;
    }

    /// Reasons of the events recorded for `cluster`, oldest first.
    pub async fn event_reasons(&self, cluster: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> = self.api();
        let mut items = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|event| {
                event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(cluster)
            })
            .collect::<Vec<_>>();
        items.sort_by_key(|event| event.metadata.creation_timestamp.clone().map(|t| t.0));
        items.into_iter().filter_map(|event| event.reason).collect()
    }
}

/// Spec of `instances` instances of `image`.
pub fn spec(instances: i32, image: &str) -> PostgresClusterSpec {
    PostgresClusterSpec::with_image(instances, image)
}

/// The pod template spec hash of the StatefulSet.
pub fn template_hash(sts: &StatefulSet) -> String {
    sts.spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|meta| meta.annotations.as_ref())
        .and_then(|annotations| annotations.get(contract::ANNOTATION_SPEC_HASH).cloned())
        .unwrap_or_default()
}

/// The image of the StatefulSet's PostgreSQL container.
pub fn template_image(sts: &StatefulSet) -> String {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap()
}

impl Env {
    /// Plays the StatefulSet controller and the instance managers through a rolling update of
    /// `cluster` until every pod runs the StatefulSet's template and the cluster is Healthy.
    /// Returns what happened, in order: `recreated <pod>` and `switchover <from> -> <to>`.
    /// Panics if two instances are ever down at once, or a primary is deleted.
    pub async fn play_rolling_update(&self, cluster: &str, instances: i32) -> Vec<String> {
        let pods: Api<Pod> = self.api();
        let leases: Api<Lease> = self.api();
        let sts_api: Api<StatefulSet> = self.api();
        let mut history = Vec::new();
        let mut primary = format!("{cluster}-0");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rolling update did not finish; so far: {history:?}"
            );
            let hash = template_hash(&sts_api.get(cluster).await.unwrap());
            let present = self.pod_names(cluster).await;
            let missing: Vec<String> = (0..instances)
                .map(|ordinal| format!("{cluster}-{ordinal}"))
                .filter(|name| !present.contains(name))
                .collect();
            assert!(
                missing.len() <= 1,
                "two instances down at once: {missing:?}; {history:?}"
            );
            for pod in missing {
                assert_ne!(pod, primary, "the primary was deleted before a switchover");
                history.push(format!("recreated {pod}"));
                let ordinal: i32 = pod.rsplit('-').next().unwrap().parse().unwrap();
                self.play_pod(cluster, ordinal, "replica", true).await;
            }
            let lease = leases.get(&contract::lease_name(cluster)).await.unwrap();
            if let Some(target) = lease
                .annotations()
                .get(contract::ANNOTATION_SWITCHOVER_TO)
                .cloned()
            {
                // The instance managers: demote, promote, move the Lease, clear the request.
                history.push(format!("switchover {primary} -> {target}"));
                self.set_role(&primary, "replica").await;
                self.set_role(&target, "primary").await;
                let patch = json!({
                    "metadata": {"annotations": {contract::ANNOTATION_SWITCHOVER_TO: null}},
                    "spec": {"holderIdentity": target},
                });
                leases
                    .patch(
                        &contract::lease_name(cluster),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .unwrap();
                primary = target;
            }
            let all_updated = pods
                .list(
                    &ListParams::default()
                        .labels(&format!("{}={cluster}", contract::LABEL_CLUSTER)),
                )
                .await
                .unwrap()
                .items
                .iter()
                .filter(|pod| pod.annotations().get(contract::ANNOTATION_SPEC_HASH) == Some(&hash))
                .count() as i32
                == instances;
            let cluster_object = self.clusters().get(cluster).await.unwrap();
            let healthy = cluster_object.status.as_ref().is_some_and(|status| {
                status.phase.as_deref() == Some("Healthy")
                    && status.observed_generation == cluster_object.metadata.generation
            });
            if all_updated && healthy {
                return history;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The text of key `key` of a Secret.
pub fn secret_text(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// The DNS names (SANs) of a PEM certificate.
pub fn dns_names(pem: &str) -> Vec<String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let certificate = pem.parse_x509().unwrap();
    let mut names = Vec::new();
    for extension in certificate.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::DNSName(name) = name {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}
