//! Rolling updates on a real API server, with the test playing the StatefulSet controller and
//! the instance managers: an image change goes replicas first, then a switchover, then the old
//! primary; a reloadable parameter changes only the ConfigMap; a restart parameter rolls.

mod common;

use api::contract;
use common::{Env, spec, template_hash, template_image};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::json;

async fn pod_uids(env: &Env, cluster: &str) -> Vec<String> {
    let pods: Api<Pod> = env.api();
    let mut uids: Vec<String> = pods
        .list(&ListParams::default().labels(&format!("{}={cluster}", contract::LABEL_CLUSTER)))
        .await
        .unwrap()
        .items
        .iter()
        .map(|pod| pod.uid().unwrap())
        .collect();
    uids.sort();
    uids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_change_updates_replicas_first_then_switches_over_then_the_old_primary() {
    let env = Env::start("rolling").await;
    env.create_cluster("db", spec(3, "pg:18.1")).await;
    let _: StatefulSet = env.object("db").await;
    env.play_healthy_cluster("db", 3).await;
    env.cluster_in_phase("db", "Healthy").await;

    env.patch_spec("db", json!({"image": "pg:18.2"})).await;
    env.cluster_where("db", "the rolling update starts", |cluster| {
        cluster
            .status
            .as_ref()
            .is_some_and(|s| s.phase.as_deref() == Some("Upgrading"))
    })
    .await;
    let history = env.play_rolling_update("db", 3).await;
    assert_eq!(
        history,
        [
            "recreated db-2",
            "recreated db-1",
            "switchover db-0 -> db-1",
            "recreated db-0",
        ]
    );
    let sts: StatefulSet = env.object("db").await;
    assert_eq!(template_image(&sts), "pg:18.2");
    let cluster = env.cluster_in_phase("db", "Healthy").await;
    let status = cluster.status.unwrap();
    assert_eq!(status.image.as_deref(), Some("pg:18.2"));
    assert_eq!(status.current_primary.as_deref(), Some("db-1"));
    let reasons = env.event_reasons("db").await;
    assert!(
        reasons.contains(&"InstanceRecreated".to_string()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"SwitchoverRequested".to_string()),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloadable_parameters_are_applied_in_place_and_restart_parameters_roll() {
    let env = Env::start("params").await;
    env.create_cluster("db", spec(2, "pg:18.1")).await;
    let _: StatefulSet = env.object("db").await;
    env.play_healthy_cluster("db", 2).await;
    env.cluster_in_phase("db", "Healthy").await;
    let hash_before = template_hash(&env.object::<StatefulSet>("db").await);
    let pods_before = pod_uids(&env, "db").await;

    // work_mem: a reload. The ConfigMap changes, the template does not, no pod goes away.
    env.patch_spec(
        "db",
        json!({"postgresql": {"parameters": {"work_mem": "64MB"}}}),
    )
    .await;
    env.eventually("a ParametersReloaded event", || async {
        env.event_reasons("db")
            .await
            .contains(&"ParametersReloaded".to_string())
            .then_some(())
    })
    .await;
    let config: ConfigMap = env.object("db-config").await;
    assert!(config.data.unwrap()[contract::CONFIG_KEY_POSTGRESQL].contains("work_mem = '64MB'"));
    env.cluster_in_phase("db", "Healthy").await;
    assert_eq!(
        template_hash(&env.object::<StatefulSet>("db").await),
        hash_before
    );
    assert_eq!(pod_uids(&env, "db").await, pods_before);

    // shared_buffers: a restart. The template changes and the cluster rolls, replica first.
    env.patch_spec(
        "db",
        json!({"postgresql": {"parameters": {"work_mem": "64MB", "shared_buffers": "256MB"}}}),
    )
    .await;
    env.eventually("a RestartRequired event", || async {
        env.event_reasons("db")
            .await
            .contains(&"RestartRequired".to_string())
            .then_some(())
    })
    .await;
    // The event comes from the parameters stage, the template from a later stage of the same
    // reconcile: wait for it rather than read it at once.
    env.eventually("the template changed", || async {
        (template_hash(&env.object::<StatefulSet>("db").await) != hash_before).then_some(())
    })
    .await;
    let history = env.play_rolling_update("db", 2).await;
    assert_eq!(
        history,
        [
            "recreated db-1",
            "switchover db-0 -> db-1",
            "recreated db-0"
        ]
    );
    let config: ConfigMap = env.object("db-config").await;
    assert!(
        config.data.unwrap()[contract::CONFIG_KEY_POSTGRESQL].contains("shared_buffers = '256MB'")
    );
}
