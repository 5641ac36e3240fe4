//! Creating a PostgresCluster on a real API server: every owned object with its spec, labels and
//! owner reference; generated Secrets kept once they exist; status conditions from Creating to
//! Healthy; invalid specs refused by the API server itself.

mod common;

use std::collections::BTreeMap;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use common::{Env, spec};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

fn password(secret: &Secret) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()["password"].0.clone()).unwrap()
}

fn condition(cluster: &PostgresCluster, type_: &str) -> (String, String) {
    let status = cluster.status.as_ref().unwrap();
    let found = api::common::find_condition(&status.conditions, type_).unwrap();
    (found.status.clone(), found.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_cluster_creates_every_owned_object_and_reports_status() {
    let env = Env::start("team-a").await;
    // The API server's PodSecurity admission enforces the restricted standard in this namespace:
    // the pods made from the operator's template below must pass it.
    Api::<Namespace>::all(env.client.clone())
        .patch(
            "team-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"
            }}})),
        )
        .await
        .unwrap();
    let unhardened: Pod = serde_json::from_value(json!({
        "metadata": {"name": "unhardened"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    let refused = env
        .api::<Pod>()
        .create(&PostParams::default(), &unhardened)
        .await
        .expect_err("the restricted standard is enforced");
    assert!(
        refused
            .to_string()
            .contains("violates PodSecurity \"restricted"),
        "{refused}"
    );
    // A superuser Secret that already exists is kept as it is.
    let secrets: Api<Secret> = env.api();
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("db-superuser".into()),
                    ..ObjectMeta::default()
                },
                string_data: Some(BTreeMap::from([
                    ("username".into(), "postgres".into()),
                    ("password".into(), "chosen-by-the-user".into()),
                ])),
                ..Secret::default()
            },
        )
        .await
        .unwrap();
    let mut cluster_spec = spec(3, "registry.example/postgres:18.1");
    cluster_spec.wal_storage = Some(api::common::StorageSpec {
        size: "2Gi".into(),
        storage_class: None,
    });
    cluster_spec
        .postgresql
        .parameters
        .insert("work_mem".into(), "16MB".into());
    let created = env.create_cluster("db", cluster_spec).await;
    let uid = created.uid().unwrap();

    let sts: StatefulSet = env.object("db").await;
    let sts_spec = sts.spec.clone().unwrap();
    assert_eq!(sts_spec.replicas, Some(3));
    assert_eq!(
        sts_spec.update_strategy.unwrap().type_.as_deref(),
        Some("OnDelete")
    );
    let claims: Vec<String> = sts_spec
        .volume_claim_templates
        .unwrap()
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(claims, ["pgdata", "pg-wal"]);
    let pod = sts_spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("db-instance"));
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    let postgres = &pod.containers[0];
    assert_eq!(
        postgres.image.as_deref(),
        Some("registry.example/postgres:18.1")
    );
    assert!(postgres.readiness_probe.is_some());
    assert_eq!(
        pod.init_containers.unwrap()[0].image.as_deref(),
        Some(common::MANAGER_IMAGE)
    );

    let services: Api<Service> = env.api();
    for (name, role) in [
        ("db-rw", Some("primary")),
        ("db-ro", Some("replica")),
        ("db-r", None),
    ] {
        let service: Service = env.object(name).await;
        let selector = service.spec.unwrap().selector.unwrap();
        assert_eq!(selector[contract::LABEL_CLUSTER], "db");
        assert_eq!(
            selector.get(contract::LABEL_ROLE).map(String::as_str),
            role,
            "{name}"
        );
        let _ = &services;
    }
    let config: ConfigMap = env.object("db-config").await;
    let conf = &config.data.clone().unwrap()[contract::CONFIG_KEY_POSTGRESQL];
    assert!(conf.contains("work_mem = '16MB'"), "{conf}");

    let superuser: Secret = env.object("db-superuser").await;
    assert_eq!(password(&superuser), "chosen-by-the-user");
    let replication: Secret = env.object("db-replication").await;
    let app: Secret = env.object("db-app").await;
    for secret in [&replication, &app] {
        assert_eq!(password(secret).len(), 32);
        assert_eq!(secret.owner_references()[0].uid, uid);
    }
    assert_eq!(
        app.data.as_ref().unwrap()["username"],
        ByteString(b"app".to_vec())
    );
    assert_ne!(password(&replication), password(&app));

    let owned_metas = [
        env.object::<ServiceAccount>("db-instance").await.metadata,
        env.object::<Role>("db-instance").await.metadata,
        env.object::<RoleBinding>("db-instance").await.metadata,
        env.object::<PodDisruptionBudget>("db").await.metadata,
        env.object::<NetworkPolicy>("db").await.metadata,
        config.metadata.clone(),
        sts.metadata.clone(),
    ];
    for meta in owned_metas {
        let owner = &meta.owner_references.clone().unwrap()[0];
        assert_eq!(owner.uid, uid, "{:?}", meta.name);
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.labels.unwrap()[contract::LABEL_CLUSTER], "db");
    }

    let cluster = env.cluster_in_phase("db", "Creating").await;
    assert!(
        cluster
            .finalizers()
            .contains(&"postgres.keiailab.io/finalizer".to_string())
    );
    assert_eq!(
        condition(&cluster, "Progressing"),
        ("True".into(), "CreatingInstances".into())
    );
    assert_eq!(condition(&cluster, "Ready").0, "False");

    // The instances come up (played here: no kubelet).
    env.play_healthy_cluster("db", 3).await;
    let cluster = env.cluster_in_phase("db", "Healthy").await;
    let status = cluster.status.clone().unwrap();
    assert_eq!(status.ready_instances, 3);
    assert_eq!(status.current_primary.as_deref(), Some("db-0"));
    assert_eq!(status.timeline, Some(1));
    assert_eq!(status.instances.len(), 3);
    assert_eq!(
        condition(&cluster, "Ready"),
        ("True".into(), "AllInstancesReady".into())
    );
    assert_eq!(condition(&cluster, "Degraded").0, "False");

    // Another reconciliation (any change to the cluster) keeps the generated passwords.
    let app_password = password(&app);
    env.clusters()
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    env.patch_spec(
        "db",
        json!({"postgresql": {"parameters": {"work_mem": "32MB"}}}),
    )
    .await;
    env.eventually("the new work_mem in the ConfigMap", || async {
        let config: ConfigMap = env.api().get("db-config").await.ok()?;
        config.data?[contract::CONFIG_KEY_POSTGRESQL]
            .contains("work_mem = '32MB'")
            .then_some(())
    })
    .await;
    let app: Secret = env.object("db-app").await;
    assert_eq!(password(&app), app_password);

    // A primary that loses readiness makes the cluster Degraded with a reason.
    env.set_ready("db-0", false).await;
    let cluster = env.cluster_in_phase("db", "Degraded").await;
    assert_eq!(
        condition(&cluster, "Degraded"),
        ("True".into(), "InstancesNotReady".into())
    );
    assert!(
        env.event_reasons("db")
            .await
            .contains(&"Healthy".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_rejected_by_the_api_server_with_a_clear_message() {
    let env = Env::without_controller("team-b").await;
    let clusters: Api<PostgresCluster> = env.api();
    let create = |spec: serde_json::Value| {
        let clusters = clusters.clone();
        async move {
            let cluster: PostgresCluster = serde_json::from_value(json!({
                "apiVersion": "postgres.keiailab.io/v1alpha1",
                "kind": "PostgresCluster",
                "metadata": {"name": "bad"},
                "spec": spec,
            }))
            .unwrap();
            clusters
                .create(&PostParams::default(), &cluster)
                .await
                .expect_err("the API server refuses the spec")
                .to_string()
        }
    };
    let message = create(json!({"image": "pg:17", "postgresVersion": 17})).await;
    assert!(message.contains("below 18 are not supported"), "{message}");
    let message = create(json!({
        "image": "pg:18",
        "imageCatalogRef": {"name": "catalog"}
    }))
    .await;
    assert!(
        message.contains("set exactly one of image or imageCatalogRef"),
        "{message}"
    );
    let message = create(json!({
        "image": "pg:18",
        "postgresql": {"parameters": {"port": "5433"}}
    }))
    .await;
    assert!(
        message.contains("may not set settings the operator manages"),
        "{message}"
    );
}
