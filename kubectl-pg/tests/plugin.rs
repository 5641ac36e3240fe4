//! The `kubectl-pg` binary against a real kube-apiserver (one per test binary): the test creates a
//! PostgresCluster and instance Pods carrying the labels and the status annotation the instance
//! managers write, runs the plugin as a user would, and asserts on the objects and the output.
//! `restart` and `switchover --wait` are answered by the test playing the instance managers;
//! `psql` reaches a real PostgreSQL 18 with the app Secret's credentials.

use std::process::Output;
use std::time::{Duration, Instant};

use api::backup::BackupJob;
use api::contract;
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use testbed::{ApiServer, Postgres, PostgresOptions, manifests, paths};

/// The plugin's binary, run with the test's kubeconfig.
struct Plugin {
    kubeconfig: std::path::PathBuf,
}

impl Plugin {
    fn command(&self, namespace: &str, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-pg"));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["-n", namespace])
            .args(args)
            .kill_on_drop(true);
        command
    }

    async fn run(&self, namespace: &str, args: &[&str]) -> Output {
        self.command(namespace, args).output().await.unwrap()
    }

    /// Runs and expects success; returns stdout.
    async fn ok(&self, namespace: &str, args: &[&str]) -> String {
        let output = self.run(namespace, args).await;
        assert!(
            output.status.success(),
            "kubectl pg {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs and expects a failure whose message contains `message`.
    async fn fails(&self, namespace: &str, args: &[&str], message: &str) {
        let output = self.run(namespace, args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "kubectl pg {args:?} succeeded, expected an error saying {message:?}"
        );
        assert!(
            stderr.contains(message),
            "kubectl pg {args:?}: the error says {stderr:?}, expected {message:?}"
        );
    }
}

async fn apply(client: &Client, namespace: &str, object: Value) {
    manifests::apply(client, &object, namespace)
        .await
        .unwrap_or_else(|error| panic!("applying {object}: {error}"));
}

async fn create_namespace(client: &Client, namespace: &str) {
    apply(
        client,
        namespace,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
    )
    .await;
}

/// A PostgresCluster `name` with `instances`, and the status the operator would report.
async fn create_cluster(client: &Client, namespace: &str, name: &str, extra_spec: Value) {
    let mut spec = json!({"instances": 3, "image": "example.org/pg:18"});
    if let (Some(spec), Value::Object(extra)) = (spec.as_object_mut(), extra_spec) {
        spec.extend(extra);
    }
    apply(
        client,
        namespace,
        json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": name}, "spec": spec
        }),
    )
    .await;
    let status = json!({"status": {
        "phase": "Healthy", "readyInstances": 3, "currentPrimary": format!("{name}-0"),
        "timeline": 2, "image": "example.org/pg:18",
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllInstancesReady",
                        "message": "3 of 3 instances ready", "lastTransitionTime": "2026-12-04T00:00:00Z"}]
    }});
    Api::<PostgresCluster>::namespaced(client.clone(), namespace)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// An instance pod as its instance manager leaves it: role label, status annotation, pod IP and
/// Ready condition.
async fn create_instance(
    client: &Client,
    namespace: &str,
    cluster: &str,
    pod: &str,
    role: &str,
    reported: Value,
    port: u16,
) {
    apply(
        client,
        namespace,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": pod,
                "labels": {contract::LABEL_CLUSTER: cluster, contract::LABEL_INSTANCE: pod,
                           contract::LABEL_ROLE: role},
                "annotations": {contract::ANNOTATION_INSTANCE_STATUS: reported.to_string()}
            },
            "spec": {"containers": [{"name": "postgres", "image": "example.org/pg:18",
                "ports": [{"name": contract::PORT_NAME_POSTGRES, "containerPort": port}]}]}
        }),
    )
    .await;
    let status = json!({"status": {
        "phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}]
    }});
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Cluster `name` with a primary `<name>-0` and replicas `<name>-1` (behind) and `<name>-2`.
async fn three_instances(client: &Client, namespace: &str, name: &str, extra_spec: Value) {
    create_cluster(client, namespace, name, extra_spec).await;
    let p = |i: u32| format!("{name}-{i}");
    // The primary's server certificate was renewed; the first replica still has one that
    // expires in 30 days (and an hour).
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let certificates = |server_days: i64| {
        json!([{"certificate": "server", "notBefore": now, "notAfter": now + server_days * 86400 + 3600},
               {"certificate": "ca", "notBefore": now, "notAfter": now + 3650 * 86400 + 3600}])
    };
    create_instance(
        client,
        namespace,
        name,
        &p(0),
        "primary",
        json!({"role": "primary", "postgresReady": true, "timeline": 2, "currentLsn": "0/9000100",
               "certificates": certificates(90)}),
        5432,
    )
    .await;
    create_instance(
        client,
        namespace,
        name,
        &p(1),
        "replica",
        json!({"role": "replica", "postgresReady": true, "timeline": 2, "receivedLsn": "0/8000000",
               "replayLsn": "0/7F00000", "lagBytes": 1048576, "certificates": certificates(30)}),
        5432,
    )
    .await;
    create_instance(
        client,
        namespace,
        name,
        &p(2),
        "replica",
        json!({"role": "replica", "postgresReady": true, "timeline": 2, "receivedLsn": "0/9000000",
               "replayLsn": "0/9000000", "lagBytes": 0}),
        5432,
    )
    .await;
}

async fn cluster_annotations(
    client: &Client,
    namespace: &str,
    name: &str,
) -> std::collections::BTreeMap<String, String> {
    Api::<PostgresCluster>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .unwrap()
        .annotations()
        .clone()
}

async fn set_pod_labels(client: &Client, namespace: &str, pod: &str, role: &str) {
    let patch = json!({"metadata": {"labels": {contract::LABEL_ROLE: role}}});
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn kubectl_pg_acts_through_the_api_as_the_operator_and_instance_managers_expect() {
    let started = Instant::now();
    let server = ApiServer::start().await.expect("control plane starts");
    server
        .install_crds(&api::all_crds())
        .await
        .expect("CRDs install");
    let client = server.client().await.unwrap();
    let plugin = Plugin {
        kubeconfig: server.kubeconfig_path(),
    };
    // Scenarios in their own namespaces, side by side on one control plane.
    futures::join!(
        status_shows_the_cluster_instances_conditions_and_backups(&client, &plugin),
        switchover_picks_the_most_advanced_replica_and_refuses_what_cannot_work(&client, &plugin),
        fence_hibernate_and_backup_write_the_requests_the_operator_reads(&client, &plugin),
        restart_rolls_replicas_first_and_waits_for_each_instance_manager(&client, &plugin),
        psql_connects_with_the_app_secret_and_no_password_on_the_command_line(&client, &plugin),
        the_operator_passes_the_plugins_requests_on_to_the_instance_managers(&client, &plugin),
    );
    eprintln!(
        "kubectl pg scenarios took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn status_shows_the_cluster_instances_conditions_and_backups(
    client: &Client,
    plugin: &Plugin,
) {
    let ns = "status";
    create_namespace(client, ns).await;
    three_instances(client, ns, "db", json!({})).await;
    for (name, cluster) in [("db-nightly", "db"), ("other-nightly", "other")] {
        apply(
            client,
            ns,
            json!({
                "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "BackupJob",
                "metadata": {"name": name}, "spec": {"cluster": {"name": cluster}}
            }),
        )
        .await;
    }
    let patch = json!({"status": {"phase": "Completed", "backupId": "20261204-000000F",
                                  "completedAt": "2026-12-04T00:00:00Z"}});
    Api::<BackupJob>::namespaced(client.clone(), ns)
        .patch_status("db-nightly", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    let text = plugin.ok(ns, &["status", "db"]).await;
    for expected in [
        "Cluster    db (namespace status)",
        "Phase      Healthy",
        "Instances  3/3 ready",
        "Primary    db-0 (timeline 2)",
        "POD   ROLE     STATUS  LSN        LAG      TIMELINE  NODE  IP",
        "db-0  primary  ready   0/9000100  -        2         -     127.0.0.1",
        "db-1  replica  ready   0/8000000  1.0 MiB  2         -     127.0.0.1",
        "Ready  True    AllInstancesReady",
        "db-nightly  Backup  barmanCloud  Completed",
        "20261204-000000F",
        "CERTIFICATE  EXPIRES",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    assert!(
        !text.contains("other-nightly"),
        "only this cluster's backups:\n{text}"
    );
    // Each certificate at its earliest expiry, and which instances have it.
    let line = |certificate: &str| {
        text.lines()
            .find(|line| line.starts_with(&format!("{certificate} ")))
            .map(|line| {
                line.split_whitespace()
                    .skip(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
    };
    assert_eq!(line("server").as_deref(), Some("30d db-1"), "{text}");
    assert_eq!(line("ca").as_deref(), Some("3650d db-0, db-1"), "{text}");

    let json: Value =
        serde_json::from_str(&plugin.ok(ns, &["status", "db", "-o", "json"]).await).unwrap();
    assert_eq!(json["primary"], "db-0");
    assert_eq!(json["instancePods"][2]["pod"], "db-2");
    assert_eq!(json["instancePods"][2]["lsn"], "0/9000000");
    assert_eq!(json["backups"][0]["name"], "db-nightly");
    assert_eq!(json["certificates"][0]["certificate"], "server");
    assert_eq!(json["certificates"][0]["instances"], json!(["db-1"]));

    plugin
        .fails(
            ns,
            &["status", "nope"],
            "PostgresCluster nope not found in namespace status",
        )
        .await;
}

async fn switchover_picks_the_most_advanced_replica_and_refuses_what_cannot_work(
    client: &Client,
    plugin: &Plugin,
) {
    let ns = "switchover";
    create_namespace(client, ns).await;
    three_instances(client, ns, "db", json!({})).await;
    // An earlier request for db-2 was passed on already: asking again must be passed on again.
    let patch =
        json!({"metadata": {"annotations": {contract::ANNOTATION_SWITCHOVER_PASSED_ON: "db-2"}}});
    Api::<PostgresCluster>::namespaced(client.clone(), ns)
        .patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    let out = plugin.ok(ns, &["switchover", "db"]).await;
    assert!(out.contains("db-0 -> db-2"), "{out}");
    let annotations = cluster_annotations(client, ns, "db").await;
    assert_eq!(
        annotations
            .get(contract::ANNOTATION_SWITCHOVER_TO)
            .map(String::as_str),
        Some("db-2")
    );
    assert!(
        !annotations.contains_key(contract::ANNOTATION_SWITCHOVER_PASSED_ON),
        "{annotations:?}"
    );

    plugin
        .fails(
            ns,
            &["switchover", "db", "--to", "db-9"],
            "pod db-9 is not an instance of PostgresCluster db",
        )
        .await;
    plugin
        .fails(
            ns,
            &["promote", "db", "db-0"],
            "db-0 is already the primary of db",
        )
        .await;
    plugin
        .fails(
            ns,
            &["switchover", "nope"],
            "PostgresCluster nope not found",
        )
        .await;

    // --wait returns once the instance managers moved the primary label.
    let mut waiting = plugin
        .command(ns, &["promote", "db", "db-1", "--wait", "--timeout", "60"])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "--wait waits for the new primary"
    );
    set_pod_labels(client, ns, "db-0", "replica").await;
    set_pod_labels(client, ns, "db-1", "primary").await;
    let status = tokio::time::timeout(Duration::from_secs(30), waiting.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        cluster_annotations(client, ns, "db")
            .await
            .get(contract::ANNOTATION_SWITCHOVER_TO)
            .map(String::as_str),
        Some("db-1")
    );

    // A switchover in flight (the Lease annotation the instance managers act on) is not doubled.
    apply(
        client,
        ns,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": contract::lease_name("db"),
                         "annotations": {contract::ANNOTATION_SWITCHOVER_TO: "db-2"}},
            "spec": {"holderIdentity": "db-1"}
        }),
    )
    .await;
    plugin
        .fails(
            ns,
            &["switchover", "db"],
            "a switchover of db to db-2 is in progress",
        )
        .await;

    // A cluster whose only replica is not ready has nobody to switch over to.
    create_cluster(client, ns, "solo", json!({"instances": 2})).await;
    create_instance(
        client,
        ns,
        "solo",
        "solo-0",
        "primary",
        json!({"role": "primary"}),
        5432,
    )
    .await;
    create_instance(
        client,
        ns,
        "solo",
        "solo-1",
        "fenced",
        json!({"role": "fenced", "fenced": true}),
        5432,
    )
    .await;
    plugin
        .fails(
            ns,
            &["switchover", "solo"],
            "no replica of solo can take over",
        )
        .await;
}

async fn fence_hibernate_and_backup_write_the_requests_the_operator_reads(
    client: &Client,
    plugin: &Plugin,
) {
    let ns = "requests";
    create_namespace(client, ns).await;
    three_instances(
        client,
        ns,
        "db",
        json!({"backup": {"s3": {
        "bucket": "backups", "endpoint": "http://127.0.0.1:9000",
        "credentialsSecret": {"name": "s3-credentials"}}}}),
    )
    .await;
    let fenced = || async {
        cluster_annotations(client, ns, "db")
            .await
            .get(contract::ANNOTATION_FENCED)
            .cloned()
    };

    plugin.ok(ns, &["fence", "db", "db-1"]).await;
    assert_eq!(fenced().await.as_deref(), Some("db-1"));
    plugin.ok(ns, &["fence", "db", "db-0"]).await;
    assert_eq!(fenced().await.as_deref(), Some("db-0,db-1"));
    plugin.ok(ns, &["unfence", "db", "db-1"]).await;
    assert_eq!(fenced().await.as_deref(), Some("db-0"));
    plugin.ok(ns, &["fence", "db", "*"]).await;
    assert_eq!(fenced().await.as_deref(), Some("*"));
    plugin.ok(ns, &["unfence", "db", "db-2"]).await;
    assert_eq!(fenced().await.as_deref(), Some("db-0,db-1"));
    plugin.ok(ns, &["unfence", "db", "*"]).await;
    assert_eq!(fenced().await, None);
    plugin
        .fails(
            ns,
            &["fence", "db", "db-7"],
            "pod db-7 is not an instance of PostgresCluster db (instances: db-0, db-1, db-2)",
        )
        .await;

    let hibernation = || async {
        cluster_annotations(client, ns, "db")
            .await
            .get(api::postgres_cluster::HIBERNATION_ANNOTATION)
            .cloned()
    };
    plugin.ok(ns, &["hibernate", "db"]).await;
    assert_eq!(hibernation().await.as_deref(), Some("on"));
    let text = plugin.ok(ns, &["status", "db"]).await;
    assert!(text.contains("Hibernation  on"), "{text}");
    plugin.ok(ns, &["resume", "db"]).await;
    assert_eq!(hibernation().await, None);

    plugin
        .ok(
            ns,
            &[
                "backup",
                "db",
                "--name",
                "db-manual",
                "--method",
                "barmanCloud",
            ],
        )
        .await;
    let job = Api::<BackupJob>::namespaced(client.clone(), ns)
        .get("db-manual")
        .await
        .unwrap();
    assert_eq!(job.spec.cluster.name, "db");
    assert_eq!(job.spec.method, api::backup::BackupMethod::BarmanCloud);
    assert_eq!(
        job.labels()
            .get(contract::LABEL_CLUSTER)
            .map(String::as_str),
        Some("db")
    );
    plugin
        .fails(
            ns,
            &["backup", "db", "--name", "db-manual"],
            "BackupJob db-manual already exists",
        )
        .await;
    let out = plugin.ok(ns, &["backup", "db"]).await;
    assert!(out.contains("BackupJob db-20"), "a generated name: {out}");
    create_cluster(client, ns, "nobackup", json!({})).await;
    plugin
        .fails(ns, &["backup", "nobackup"], "has no backup repository")
        .await;
    // To a volume, a cluster needs no repository.
    plugin
        .ok(
            ns,
            &[
                "backup",
                "nobackup",
                "--name",
                "to-volume",
                "--volume-size",
                "2Gi",
            ],
        )
        .await;
    let volume = Api::<BackupJob>::namespaced(client.clone(), ns)
        .get("to-volume")
        .await
        .unwrap()
        .spec
        .volume;
    assert_eq!(volume.map(|v| v.size).as_deref(), Some("2Gi"));

    // Without a kubelet (the pod has no node) the API server has no lines to give, and the
    // plugin returns rather than hangs; an unknown pod is an error.
    plugin.ok(ns, &["logs", "db", "db-0", "--tail", "5"]).await;
    plugin
        .fails(ns, &["logs", "db", "db-7"], "pod db-7 is not an instance")
        .await;
}

async fn restart_rolls_replicas_first_and_waits_for_each_instance_manager(
    client: &Client,
    plugin: &Plugin,
) {
    let ns = "restart";
    create_namespace(client, ns).await;
    three_instances(client, ns, "db", json!({})).await;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);

    let mut restart = plugin
        .command(ns, &["restart", "db", "--timeout", "60"])
        .spawn()
        .unwrap();
    // Play the instance managers: echo each new token in the status annotation, one pod at a
    // time, and note the order in which the requests came.
    let mut order: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while restart.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "restart did not finish; requests so far: {order:?}"
        );
        let requested: Vec<Pod> = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|pod| pod.annotations().contains_key(contract::ANNOTATION_RESTART))
            .collect();
        assert!(
            requested.len() <= order.len() + 1,
            "one instance at a time: {:?} asked while {order:?} were done",
            requested.iter().map(|p| p.name_any()).collect::<Vec<_>>()
        );
        for pod in requested {
            let name = pod.name_any();
            if order.contains(&name) {
                continue;
            }
            let token = pod.annotations()[contract::ANNOTATION_RESTART].clone();
            let mut reported: Value =
                serde_json::from_str(&pod.annotations()[contract::ANNOTATION_INSTANCE_STATUS])
                    .unwrap();
            reported["restartToken"] = json!(token);
            let patch = json!({"metadata": {"annotations": {contract::ANNOTATION_INSTANCE_STATUS: reported.to_string()}}});
            pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            order.push(name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(restart.wait().await.unwrap().success());
    assert_eq!(
        order,
        ["db-1", "db-2", "db-0"],
        "replicas first, the primary last"
    );

    // One pod without waiting; and a wait that nobody answers times out with an error.
    plugin.ok(ns, &["restart", "db", "db-2", "--no-wait"]).await;
    let annotated =
        pods.get("db-2").await.unwrap().annotations()[contract::ANNOTATION_RESTART].clone();
    assert_ne!(
        Some(&annotated),
        pods.get("db-0")
            .await
            .unwrap()
            .annotations()
            .get(contract::ANNOTATION_RESTART)
    );
    plugin
        .fails(
            ns,
            &["restart", "db", "db-1", "--timeout", "1"],
            "timed out after 1 s waiting for the instance manager of db-1",
        )
        .await;
    plugin
        .fails(ns, &["restart", "db", "--no-wait"], "--no-wait needs a pod")
        .await;
}

async fn psql_connects_with_the_app_secret_and_no_password_on_the_command_line(
    client: &Client,
    plugin: &Plugin,
) {
    let ns = "psql";
    create_namespace(client, ns).await;
    let postgres = Postgres::start_with(PostgresOptions {
        auth_method: "scram-sha-256".into(),
        superuser_password: Some("superuser-secret".into()),
        ..PostgresOptions::default()
    })
    .expect("PostgreSQL 18 starts");
    // A password with the characters pgpass escapes.
    let password = r"app:pass\word";
    let setup = postgres.client().await.unwrap();
    // The password is a constant of this test, quoted as a SQL literal.
    let literal = format!("'{}'", password.replace('\'', "''"));
    setup
        .batch_execute(&format!("CREATE ROLE app LOGIN PASSWORD {literal}"))
        .await
        .unwrap();
    setup
        .batch_execute("CREATE DATABASE shop OWNER app")
        .await
        .unwrap();
    create_cluster(
        client,
        ns,
        "db",
        json!({"instances": 1, "bootstrap": {"initdb": {"database": "shop"}}}),
    )
    .await;
    create_instance(
        client,
        ns,
        "db",
        "db-0",
        "primary",
        json!({"role": "primary"}),
        postgres.port(),
    )
    .await;
    apply(
        client,
        ns,
        json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-app"},
            "stringData": {"username": "app", "password": password}
        }),
    )
    .await;
    // The rw Service, published on loopback as a load balancer would publish it.
    apply(
        client,
        ns,
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": contract::rw_service("db")},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "postgresql", "port": postgres.port()}],
                     "selector": {contract::LABEL_ROLE: "primary"}}
        }),
    )
    .await;
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}});
    Api::<Service>::namespaced(client.clone(), ns)
        .patch_status(
            &contract::rw_service("db"),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();

    let psql = paths::pg_bin().join("psql");
    let psql = psql.to_str().unwrap();
    let query = "SELECT current_user || '@' || current_database()";
    let through_service = plugin
        .ok(
            ns,
            &[
                "psql", "db", "--psql", psql, "--", "-X", "-A", "-t", "-c", query,
            ],
        )
        .await;
    assert_eq!(through_service.trim(), "app@shop");
    let through_pod = plugin
        .ok(
            ns,
            &[
                "psql", "db", "--pod", "db-0", "--psql", psql, "--", "-X", "-A", "-t", "-c", query,
            ],
        )
        .await;
    assert_eq!(through_pod.trim(), "app@shop");

    // psql's exit code comes back; the ro Service does not exist yet: a clear error.
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "SELECT 1/0;\n").unwrap();
    let script = script.path().to_str().unwrap().to_string();
    let failing = plugin
        .run(
            ns,
            &[
                "psql",
                "db",
                "--psql",
                psql,
                "--",
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                &script,
            ],
        )
        .await;
    assert_eq!(
        failing.status.code(),
        Some(3),
        "psql's own exit code on a failed script"
    );
    plugin
        .fails(
            ns,
            &["psql", "db", "--replica", "--psql", psql],
            "Service db-ro not found",
        )
        .await;
    plugin
        .fails(
            ns,
            &["psql", "db", "--pod", "db-5", "--psql", psql],
            "pod db-5 is not an instance",
        )
        .await;
    drop(setup);
}

/// Runs the operator's PostgresCluster controller on `namespace` until the returned guard drops.
fn start_operator(client: &Client, namespace: &str) -> AbortOnDrop {
    use controllers::postgres_cluster::{self, Context, Settings};
    use kube::runtime::events::{Recorder, Reporter};
    let ctx = std::sync::Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "postgres-operator".into(),
                instance: Some("kubectl-pg-test".into()),
            },
        ),
        metrics: std::sync::Arc::new(controllers::metrics::Metrics::new()),
        settings: Settings {
            instance_manager_image: "example.org/pg-instance:test".to_string(),
            ..Settings::default()
        },
    });
    let namespace = namespace.to_string();
    AbortOnDrop(tokio::spawn(async move {
        postgres_cluster::run(ctx, Some(namespace), 4, std::future::pending()).await
    }))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls `check` until it gives a value (30 s at most).
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn the_operator_passes_the_plugins_requests_on_to_the_instance_managers(
    client: &Client,
    plugin: &Plugin,
) {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::coordination::v1::Lease;
    let ns = "operator";
    create_namespace(client, ns).await;
    let _operator = start_operator(client, ns);
    create_cluster(client, ns, "db", json!({})).await;
    let sets = Api::<StatefulSet>::namespaced(client.clone(), ns);
    let set = eventually("the StatefulSet", || async {
        sets.get_opt("db").await.ok().flatten()
    })
    .await;
    // Play the StatefulSet controller and the instance managers: pods from the template (so
    // that their spec hash is current), with roles, positions and the Lease.
    let set_spec = set.spec.unwrap();
    let mut pod_spec = set_spec.template.spec.clone().unwrap_or_default();
    // The claim templates' volumes, as the StatefulSet controller adds them (empty here).
    for claim in set_spec.volume_claim_templates.unwrap_or_default() {
        pod_spec
            .volumes
            .get_or_insert_default()
            .push(k8s_openapi::api::core::v1::Volume {
                name: claim.metadata.name.unwrap_or_default(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            });
    }
    let template = set_spec.template;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    for (ordinal, role, lsn) in [
        (0, "primary", "0/9000100"),
        (1, "replica", "0/8000000"),
        (2, "replica", "0/9000000"),
    ] {
        let name = format!("db-{ordinal}");
        let mut metadata = template.metadata.clone().unwrap_or_default();
        metadata.name = Some(name.clone());
        metadata
            .labels
            .get_or_insert_default()
            .insert(contract::LABEL_ROLE.into(), role.into());
        let lsn_key = if role == "primary" {
            "currentLsn"
        } else {
            "receivedLsn"
        };
        metadata.annotations.get_or_insert_default().insert(
            contract::ANNOTATION_INSTANCE_STATUS.into(),
            json!({"role": role, "postgresReady": true, "timeline": 1, lsn_key: lsn}).to_string(),
        );
        let pod = Pod {
            metadata,
            spec: Some(pod_spec.clone()),
            status: None,
        };
        pods.create(&Default::default(), &pod).await.unwrap();
        let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }
    apply(
        client,
        ns,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": contract::lease_name("db")},
            "spec": {"holderIdentity": "db-0", "leaseDurationSeconds": 4}
        }),
    )
    .await;

    let out = plugin.ok(ns, &["switchover", "db"]).await;
    assert!(out.contains("db-0 -> db-2"), "{out}");
    let leases = Api::<Lease>::namespaced(client.clone(), ns);
    eventually(
        "the operator to put the switchover on the Lease",
        || async {
            let lease = leases.get("db-primary").await.ok()?;
            (lease
                .annotations()
                .get(contract::ANNOTATION_SWITCHOVER_TO)?
                == "db-2")
                .then_some(())
        },
    )
    .await;

    plugin.ok(ns, &["fence", "db", "db-1"]).await;
    eventually("the operator to fence pod db-1", || async {
        let pod = pods.get("db-1").await.ok()?;
        (pod.annotations().get(contract::ANNOTATION_FENCED)? == "true").then_some(())
    })
    .await;

    plugin.ok(ns, &["hibernate", "db"]).await;
    eventually("the operator to scale the StatefulSet to zero", || async {
        let set = sets.get("db").await.ok()?;
        (set.spec?.replicas == Some(0)).then_some(())
    })
    .await;
}
