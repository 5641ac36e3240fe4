//! `spec.monitoring` on a real API server: without the Prometheus Operator's CRDs the cluster says
//! what to install; with them (taken from the pinned prometheus-operator Go module) the operator
//! creates the PodMonitor and the PrometheusRule, a PodMonitor per Pooler of the cluster and one
//! for the pg-router pods of a sharded cluster, and deletes them all when switched off.

mod common;

use std::path::PathBuf;
use std::process::Command;

use api::pooler::{PgBouncerSpec, Pooler, PoolerSpec, PoolerType};
use api::postgres_cluster::{RouterSpec, ShardingSpec};
use common::{Env, MANAGER_IMAGE, spec};
use controllers::monitoring;
use controllers::postgres_cluster::Settings;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;

/// Release of the Prometheus Operator whose CRDs the test installs.
const PROMETHEUS_OPERATOR: &str = "v0.85.0";

/// The PodMonitor and PrometheusRule CRDs from the Go module (downloaded into the module cache).
fn prometheus_operator_crds() -> Vec<CustomResourceDefinition> {
    let module =
        format!("github.com/prometheus-operator/prometheus-operator@{PROMETHEUS_OPERATOR}");
    let output = Command::new("go")
        .args(["mod", "download", "-json", &module])
        .output()
        .expect("running go mod download (Go is part of the test bed)");
    assert!(
        output.status.success(),
        "go mod download {module}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let info: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("go mod download -json");
    let dir = PathBuf::from(info["Dir"].as_str().expect("module Dir"))
        .join("example/prometheus-operator-crd");
    ["podmonitors", "prometheusrules"]
        .iter()
        .map(|plural| {
            let path = dir.join(format!("monitoring.coreos.com_{plural}.yaml"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
            serde_yaml::from_str(&text).expect("a CRD")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_monitor_and_prometheus_rule_follow_spec_monitoring() {
    let env = Env::start("monitoring").await;
    let mut cluster_spec = spec(2, "postgres:18");
    cluster_spec.monitoring.pod_monitor = true;
    cluster_spec.monitoring.prometheus_rule = true;
    env.create_cluster("db", cluster_spec).await;

    // Without the CRDs: a condition says what to install.
    env.cluster_where(
        "db",
        "a condition naming the missing PodMonitor CRD",
        |cluster| {
            cluster.status.as_ref().is_some_and(|status| {
                status.conditions.iter().any(|c| {
                    c.message.contains("PodMonitor")
                        && c.message.contains("Prometheus Operator CRDs")
                })
            })
        },
    )
    .await;

    env.server
        .install_crds(&prometheus_operator_crds())
        .await
        .expect("installing the Prometheus Operator CRDs");
    let pod_monitors: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &monitoring::resource("PodMonitor"),
    );
    let rules: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &monitoring::resource("PrometheusRule"),
    );
    let monitor = env
        .eventually("the PodMonitor", || {
            let api = pod_monitors.clone();
            async move { api.get_opt("db").await.ok().flatten() }
        })
        .await;
    assert_eq!(
        monitor.data["spec"]["podMetricsEndpoints"][0]["port"],
        json!("status")
    );
    assert_eq!(
        monitor.metadata.owner_references.as_ref().unwrap()[0].name,
        "db"
    );
    let rule = env
        .eventually("the PrometheusRule", || {
            let api = rules.clone();
            async move { api.get_opt("db").await.ok().flatten() }
        })
        .await;
    let alerts: Vec<&str> = rule.data["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| rule["alert"].as_str().unwrap())
        .collect();
    assert_eq!(alerts.len(), monitoring::alerts::alerts().len());
    assert!(alerts.contains(&"PostgresNoPrimary"), "{alerts:?}");

    // A Pooler of the cluster gets a PodMonitor of its PgBouncer pods.
    let _pooler_controller = start_pooler_controller(&env);
    let mut pooler = Pooler::new(
        "pool",
        PoolerSpec {
            cluster: api::common::ClusterReference { name: "db".into() },
            type_: PoolerType::Rw,
            instances: 1,
            pgbouncer: PgBouncerSpec::default(),
            resources: None,
            service: None,
        },
    );
    pooler.metadata.namespace = Some(env.namespace.clone());
    env.api::<Pooler>()
        .create(&PostParams::default(), &pooler)
        .await
        .unwrap();
    let pooler_monitor = env
        .eventually("the Pooler's PodMonitor", || {
            let api = pod_monitors.clone();
            async move { api.get_opt("pool-pooler").await.ok().flatten() }
        })
        .await;
    let endpoint = &pooler_monitor.data["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], json!("metrics"));
    assert_eq!(
        endpoint["relabelings"],
        json!([
            {"action": "replace", "targetLabel": "pooler", "replacement": "pool"},
            {"action": "replace", "targetLabel": "cluster", "replacement": "db"},
        ])
    );
    assert_eq!(
        pooler_monitor.data["spec"]["selector"]["matchLabels"]["postgres.keiailab.io/pooler"],
        json!("pool")
    );
    assert_eq!(
        pooler_monitor.metadata.owner_references.as_ref().unwrap()[0].kind,
        "Pooler"
    );
    // The port it scrapes exists: the PgBouncer pods' exporter container, from the instance
    // manager's image.
    let deployment: k8s_openapi::api::apps::v1::Deployment = env.object("pool").await;
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let exporter = pod
        .containers
        .iter()
        .find(|container| {
            container.ports.iter().flatten().any(|port| {
                Some(port.name.as_deref().unwrap_or_default()) == endpoint["port"].as_str()
            })
        })
        .expect("a container with the PodMonitor's port");
    assert_eq!(exporter.image.as_deref(), Some(MANAGER_IMAGE));
    assert_eq!(
        exporter.command.as_deref().unwrap(),
        ["/usr/local/bin/pg-instance", "pooler-exporter"]
    );

    // A sharded cluster also gets a PodMonitor of its pg-router pods.
    let mut sharded = spec(1, "postgres:18");
    sharded.monitoring.pod_monitor = true;
    sharded.sharding = Some(ShardingSpec {
        shards: 2,
        router: RouterSpec::default(),
        table_groups: Vec::new(),
        sharded_tables: Vec::new(),
        reference_tables: Vec::new(),
    });
    env.create_cluster("sharded", sharded).await;
    let router_monitor = env
        .eventually("the router's PodMonitor", || {
            let api = pod_monitors.clone();
            async move { api.get_opt("sharded-router").await.ok().flatten() }
        })
        .await;
    assert_eq!(
        router_monitor.data["spec"]["selector"]["matchLabels"],
        json!({"postgres.keiailab.io/router": "sharded", "app.kubernetes.io/name": "pg-router"})
    );
    assert_eq!(
        router_monitor.data["spec"]["podMetricsEndpoints"][0]["port"],
        json!("metrics")
    );
    assert!(
        pod_monitors.get_opt("db-router").await.unwrap().is_none(),
        "no router PodMonitor for a cluster without sharding"
    );

    // Switched off: all go (the Pooler's at its next reconcile).
    env.patch_spec(
        "db",
        json!({"monitoring": {"podMonitor": false, "prometheusRule": false}}),
    )
    .await;
    env.patch_spec("sharded", json!({"monitoring": {"podMonitor": false}}))
        .await;
    env.eventually("the PodMonitors and PrometheusRule deleted", || {
        let (monitors, rules) = (pod_monitors.clone(), rules.clone());
        async move {
            let mut gone = rules.get_opt("db").await.ok()?.is_none();
            for name in ["db", "pool-pooler", "sharded-router"] {
                gone &= monitors.get_opt(name).await.ok()?.is_none();
            }
            gone.then_some(())
        }
    })
    .await;
}

fn start_pooler_controller(env: &Env) -> tokio::task::JoinHandle<()> {
    env.start_pooler_controller(Settings {
        instance_manager_image: MANAGER_IMAGE.to_string(),
        ..Settings::default()
    })
}
