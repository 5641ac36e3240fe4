//! The shared control plane runs the real controllers: a Deployment becomes a ReplicaSet whose
//! pods the scheduler binds to a registered Node, and deleting the Deployment garbage-collects
//! what it owned.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use testbed::ControlPlane;

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    while !check().await? {
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deployment_pods_are_scheduled_and_garbage_collected() -> anyhow::Result<()> {
    let plane = ControlPlane::shared()?;
    let client = plane.client().await?;

    // A Node the scheduler may bind to (no agent runs its pods in this test).
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "scheduling-node", "labels": {"kubernetes.io/hostname": "scheduling-node"}},
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity("8".to_string())),
        ("memory".to_string(), Quantity("16Gi".to_string())),
        ("pods".to_string(), Quantity("110".to_string())),
    ]);
    let status = json!({"status": {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}],
    }});
    nodes
        .patch_status(
            "scheduling-node",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "control-plane-test"}}))?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "control-plane-test");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example/web:1"}]},
            },
        },
    }))?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;

    // The Deployment and ReplicaSet controllers create the pods, the scheduler binds them.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "control-plane-test");
    wait_for(
        "two pods bound to scheduling-node",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default().labels("app=web")).await?;
                let bound = list
                    .items
                    .iter()
                    .filter(|pod| {
                        pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some("scheduling-node")
                    })
                    .count();
                Ok(bound == 2)
            }
        },
    )
    .await
    .map_err(|error| {
        anyhow::anyhow!(
            "{error}\ncontroller-manager:\n{}\nscheduler:\n{}",
            plane.log_tail("controller-manager"),
            plane.log_tail("scheduler")
        )
    })?;
    // The ServiceAccount admission plugin gave each pod its token volume.
    let pod = pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items
        .remove(0);
    let volumes = pod.spec.and_then(|s| s.volumes).unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v.name.starts_with("kube-api-access")),
        "pod has no service-account token volume: {volumes:?}"
    );

    // Background deletion: the garbage collector removes the ReplicaSet and its pods.
    deployments
        .delete("web", &DeleteParams::background())
        .await?;
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "control-plane-test");
    wait_for(
        "ReplicaSet and pods garbage-collected",
        Duration::from_secs(60),
        || {
            let (pods, replica_sets) = (pods.clone(), replica_sets.clone());
            async move {
                let sets = replica_sets.list(&ListParams::default()).await?;
                let left = pods.list(&ListParams::default().labels("app=web")).await?;
                // Bound pods with no kubelet stay Terminating until deleted with grace 0: the
                // garbage collector's deletion is what this asserts.
                let terminating = left
                    .items
                    .iter()
                    .all(|pod| pod.metadata.deletion_timestamp.is_some());
                Ok(sets.items.is_empty() && terminating)
            }
        },
    )
    .await?;
    Ok(())
}
