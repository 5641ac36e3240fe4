//! What happens to the volumes: hibernation keeps them and brings the same ones back; deletion
//! goes through the finalizer, which removes the Lease and keeps the PVCs unless the spec says
//! otherwise; a larger size grows the existing PVCs where the StorageClass allows it.

mod common;

use api::contract;
use common::{Env, spec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use serde_json::json;

async fn pvc_uids(env: &Env, cluster: &str) -> Vec<(String, String)> {
    let pvcs: Api<PersistentVolumeClaim> = env.api();
    let mut found: Vec<(String, String)> = pvcs
        .list(&ListParams::default().labels(&format!("{}={cluster}", contract::LABEL_CLUSTER)))
        .await
        .unwrap()
        .items
        .iter()
        .map(|pvc| (pvc.name_any(), pvc.uid().unwrap()))
        .collect();
    found.sort();
    found
}

async fn replicas(env: &Env, cluster: &str) -> i32 {
    let sts: StatefulSet = env.object(cluster).await;
    sts.spec.unwrap().replicas.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernation_scales_to_zero_keeps_the_volumes_and_brings_them_back() {
    let env = Env::start("hibernate").await;
    env.create_cluster("db", spec(2, "pg:18.1")).await;
    let _: StatefulSet = env.object("db").await;
    env.play_healthy_cluster("db", 2).await;
    env.cluster_in_phase("db", "Healthy").await;
    let volumes = pvc_uids(&env, "db").await;
    assert_eq!(volumes.len(), 2);

    env.patch_spec("db", json!({"hibernation": true})).await;
    let cluster = env.cluster_in_phase("db", "Hibernated").await;
    assert_eq!(replicas(&env, "db").await, 0);
    let ready = api::common::find_condition(&cluster.status.unwrap().conditions, "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Hibernated")
    );
    // The StatefulSet controller removes the pods (played); the claims stay.
    let pods: Api<Pod> = env.api();
    for pod in env.pod_names("db").await {
        pods.delete(&pod, &DeleteParams::default()).await.unwrap();
    }
    env.cluster_in_phase("db", "Hibernated").await;
    assert_eq!(pvc_uids(&env, "db").await, volumes);

    // Off again: the same claims come back with the pods.
    env.patch_spec("db", json!({"hibernation": false})).await;
    env.eventually("the StatefulSet scaled back up", || async {
        (replicas(&env, "db").await == 2).then_some(())
    })
    .await;
    env.play_pod("db", 0, "primary", true).await;
    env.play_pod("db", 1, "replica", true).await;
    env.cluster_in_phase("db", "Healthy").await;
    assert_eq!(
        pvc_uids(&env, "db").await,
        volumes,
        "the same volumes, so the same data"
    );

    // The annotation hibernates too.
    env.clusters()
        .patch(
            "db",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {
                api::postgres_cluster::HIBERNATION_ANNOTATION: "on"
            }}})),
        )
        .await
        .unwrap();
    env.eventually("hibernated by annotation", || async {
        (replicas(&env, "db").await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_runs_the_finalizer_keeping_volumes_unless_asked_to_delete_them() {
    let env = Env::start("deletion").await;
    env.create_cluster("keep", spec(1, "pg:18.1")).await;
    let mut doomed = spec(1, "pg:18.1");
    doomed.delete_volumes_on_deletion = true;
    env.create_cluster("drop", doomed).await;
    for name in ["keep", "drop"] {
        let _: StatefulSet = env.object(name).await;
        env.play_healthy_cluster(name, 1).await;
        let cluster = env.cluster_in_phase(name, "Healthy").await;
        assert_eq!(cluster.finalizers(), ["postgres.keiailab.io/finalizer"]);
    }
    let drop_sts: StatefulSet = env.object("drop").await;
    assert_eq!(
        drop_sts
            .spec
            .unwrap()
            .persistent_volume_claim_retention_policy
            .unwrap()
            .when_deleted
            .as_deref(),
        Some("Delete")
    );

    for name in ["keep", "drop"] {
        env.clusters()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let clusters = env.clusters();
    for name in ["keep", "drop"] {
        env.eventually(&format!("{name} is gone"), || {
            let clusters = clusters.clone();
            async move { clusters.get_opt(name).await.ok()?.is_none().then_some(()) }
        })
        .await;
    }
    let leases: Api<Lease> = env.api();
    assert!(leases.get_opt("keep-primary").await.unwrap().is_none());
    assert!(leases.get_opt("drop-primary").await.unwrap().is_none());
    // PVCs carry the pvc-protection finalizer (no controller-manager here to lift it), so a
    // deleted claim shows as terminating.
    let terminating = |cluster: &'static str| {
        let pvcs: Api<PersistentVolumeClaim> = env.api();
        async move {
            pvcs.list(
                &ListParams::default().labels(&format!("{}={cluster}", contract::LABEL_CLUSTER)),
            )
            .await
            .unwrap()
            .items
            .iter()
            .map(|pvc| pvc.metadata.deletion_timestamp.is_some())
            .collect::<Vec<bool>>()
        }
    };
    assert_eq!(
        terminating("keep").await,
        [false],
        "PVCs are kept by default"
    );
    assert_eq!(
        terminating("drop").await,
        [true],
        "deleteVolumesOnDeletion deletes them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_grow_with_the_spec_where_the_storage_class_allows_it() {
    use k8s_openapi::api::storage::v1::StorageClass;
    use kube::api::{Patch, PatchParams, PostParams};

    let env = Env::start("volumes").await;
    let classes: Api<StorageClass> = Api::all(env.client.clone());
    for (name, expandable) in [("expandable", true), ("fixed", false)] {
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": name},
            "provisioner": "example.org/none",
            "allowVolumeExpansion": expandable,
        }))
        .unwrap();
        classes
            .create(&PostParams::default(), &class)
            .await
            .unwrap();
    }
    let mut cluster_spec = spec(1, "pg:18.1");
    cluster_spec.storage.storage_class = Some("expandable".into());
    cluster_spec.wal_storage = Some(api::common::StorageSpec {
        size: "1Gi".into(),
        storage_class: Some("fixed".into()),
    });
    env.create_cluster("db", cluster_spec).await;
    let _: StatefulSet = env.object("db").await;
    env.play_healthy_cluster("db", 1).await;
    env.cluster_in_phase("db", "Healthy").await;
    // No PV controller here: the claims are marked bound as it would.
    let pvcs: Api<PersistentVolumeClaim> = env.api();
    for claim in ["pgdata-db-0", "pg-wal-db-0"] {
        pvcs.patch_status(
            claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}})),
        )
        .await
        .unwrap();
    }

    env.patch_spec(
        "db",
        json!({"storage": {"size": "2Gi"}, "walStorage": {"size": "2Gi"}}),
    )
    .await;
    let requested = |claim: &'static str| {
        let pvcs = pvcs.clone();
        async move {
            let storage = pvcs.get(claim).await.ok()?.spec?.resources?.requests?["storage"]
                .0
                .clone();
            Some(storage)
        }
    };
    env.eventually("the data volume grown to 2Gi", || async {
        (requested("pgdata-db-0").await? == "2Gi").then_some(())
    })
    .await;
    env.eventually(
        "a VolumeExpansionFailed event for the WAL volume",
        || async {
            env.event_reasons("db")
                .await
                .contains(&"VolumeExpansionFailed".to_string())
                .then_some(())
        },
    )
    .await;
    assert_eq!(requested("pg-wal-db-0").await.as_deref(), Some("1Gi"));
    // The StatefulSet's claim templates could not change; everything else still applies.
    env.cluster_in_phase("db", "Healthy").await;
}
