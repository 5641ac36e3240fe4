//! End to end on a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler) with the node agent running the pods: the operator installed from our Helm
//! chart with the real helm runs as the chart's Deployment under the chart's RBAC; a 3-instance
//! PostgresCluster the real StatefulSet controller creates becomes Healthy; data written
//! through the `-rw` Service is read through `-ro`; deleting the primary pod fails over with
//! every acknowledged write kept.
//!
//! Needs the workspace's `postgres-operator` and `pg-instance` binaries next to this test's
//! target folder (`cargo build -p controllers -p instance`; `cargo xtask test` builds them).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams};
use nodeagent::{ImageTable, NodeAgent, NodeAgentConfig};
use serde_json::json;
use testbed::{ControlPlane, paths};

const OPERATOR_NAMESPACE: &str = "postgres-operator-system";

/// target/debug of this build (the test runs from target/debug/deps).
fn binaries() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let folder = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("test binary has no target folder"))?;
    for binary in ["postgres-operator", "pg-instance"] {
        anyhow::ensure!(
            folder.join(binary).exists(),
            "{} is missing: run `cargo build -p controllers -p instance` first",
            folder.join(binary).display()
        );
    }
    Ok(folder)
}

fn helm_install(plane: &ControlPlane) -> anyhow::Result<()> {
    let chart = paths::workspace_root()
        .join("charts")
        .join("postgres-operator");
    let output = Command::new(paths::helm())
        .args(["upgrade", "--install", "postgres-operator"])
        .arg(&chart)
        .args(["--namespace", OPERATOR_NAMESPACE, "--create-namespace"])
        .args(["--set", "watchAllNamespaces=true"])
        .arg("--kubeconfig")
        .arg(plane.kubeconfig_path())
        .env("HELM_CACHE_HOME", plane.dir().join("helm-cache"))
        .env("HELM_CONFIG_HOME", plane.dir().join("helm-config"))
        .env("HELM_DATA_HOME", plane.dir().join("helm-data"))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "helm install failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

async fn wait_healthy(
    clusters: &Api<api::PostgresCluster>,
    name: &str,
    not_primary: Option<&str>,
    timeout: Duration,
    agent_dir: &std::path::Path,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(cluster) = clusters.get_opt(name).await? {
            let status = cluster.status.unwrap_or_default();
            let phase = status.phase.clone().unwrap_or_default();
            let primary = status.current_primary.clone().unwrap_or_default();
            last = format!(
                "{phase} ({} ready, primary {primary})",
                status.ready_instances
            );
            if phase == "Healthy"
                && status.ready_instances == cluster.spec.instances
                && !primary.is_empty()
                && not_primary != Some(primary.as_str())
            {
                return Ok(primary);
            }
        }
        if Instant::now() > deadline {
            let namespace = clusters
                .resource_url()
                .split('/')
                .nth(5)
                .unwrap_or_default()
                .to_string();
            let mut logs = String::new();
            for ordinal in 0..3 {
                for container in ["install-instance-manager", "postgres"] {
                    let pod = format!("{name}-{ordinal}");
                    let text = nodeagent::pod_log(agent_dir, &namespace, &pod, container);
                    logs.push_str(&format!("--- {pod}/{container}:\n{}\n", tail(&text)));
                }
            }
            anyhow::bail!("cluster {name} not Healthy after {timeout:?}: {last}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// How the test logs in: the superuser's password, and TLS verified against the cluster's CA
/// Secret and its `-rw` Service name (TLS is on by default; non-TLS clients are refused).
#[derive(Clone)]
struct Login {
    password: String,
    tls: testbed::pg_tls::VerifyFull,
}

async fn login(client: &kube::Client, namespace: &str, cluster: &str) -> anyhow::Result<Login> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let text = |secret: &Secret, key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    let superuser = secrets
        .get(&api::contract::superuser_secret(cluster))
        .await?;
    let ca = secrets.get(&api::contract::tls_ca_secret(cluster)).await?;
    let server_name = format!("{}.{namespace}.svc", api::contract::rw_service(cluster));
    Ok(Login {
        password: text(&superuser, "password"),
        tls: testbed::pg_tls::VerifyFull::new(&text(&ca, "ca.crt"), &server_name)?,
    })
}

async fn connect(port: u16, login: &Login) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(&login.password)
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(3));
    let (client, connection) = config.connect(login.tls.clone()).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The node agent (and its folder) of this test binary, with the operator installed.
struct Stack {
    agent: NodeAgent,
    dir: tempfile::TempDir,
}

static STACK: OnceLock<Result<Mutex<Option<Stack>>, String>> = OnceLock::new();

extern "C" fn stop_stack() {
    if let Some(Ok(stack)) = STACK.get() {
        let taken = stack.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(taken);
    }
}

/// Starts (once per test binary) the node agent on the shared control plane and installs the
/// operator with helm; scenarios run in parallel in their own namespaces.
fn stack() -> anyhow::Result<(&'static ControlPlane, &'static Mutex<Option<Stack>>)> {
    let plane = ControlPlane::shared()?;
    let stack = STACK.get_or_init(|| {
        let start = || -> anyhow::Result<Stack> {
            let binaries = binaries()?;
            let dir = tempfile::Builder::new()
                .prefix("e2e-node-")
                .tempdir_in(nodeagent::work_dir()?)?;
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )?;
            // PostgreSQL built with OpenSSL: clusters have TLS by default.
            let pg_install = paths::pg_bin_tls()
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            let agent = NodeAgent::start(NodeAgentConfig {
                node_name: "e2e-node".to_string(),
                kubeconfig: plane.kubeconfig_path().to_path_buf(),
                api_port: plane.port(),
                ca: plane.serving_ca_path().to_path_buf(),
                dir: dir.path().to_path_buf(),
                images: ImageTable::project(&binaries, &pg_install)?,
            })?;
            helm_install(plane)?;
            Ok(Stack { agent, dir })
        };
        let started = start().map(|stack| Mutex::new(Some(stack)));
        if started.is_ok() {
            // SAFETY: registers a plain `extern "C" fn` with no captured state.
            unsafe { libc::atexit(stop_stack) };
        }
        started.map_err(|error| format!("{error:#}"))
    });
    match stack {
        Ok(stack) => Ok((plane, stack)),
        Err(error) => anyhow::bail!("starting the e2e stack: {error}"),
    }
}

fn agent_dir(stack: &Mutex<Option<Stack>>) -> PathBuf {
    stack
        .lock()
        .expect("lock")
        .as_ref()
        .map(|s| s.dir.path().to_path_buf())
        .unwrap_or_default()
}

fn service_port(
    stack: &Mutex<Option<Stack>>,
    namespace: &str,
    service: &str,
) -> anyhow::Result<u16> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let port = stack.lock().expect("lock").as_ref().and_then(|s| {
            s.agent
                .service_port(namespace, service, api::contract::POSTGRES_PORT)
        });
        if let Some(port) = port {
            return Ok(port);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no local port for Service {namespace}/{service}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Connects once the Service has a ready endpoint (its EndpointSlice follows the pod's Ready
/// condition by a moment).
async fn connect_when_served(
    port: u16,
    password: &Login,
) -> anyhow::Result<tokio_postgres::Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = connect(port, password).await
            && client.simple_query("SELECT 1").await.is_ok()
        {
            return Ok(client);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no PostgreSQL behind local port {port} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_from_helm_installed_operator_fails_over_without_losing_writes()
-> anyhow::Result<()> {
    let started = Instant::now();
    let (plane, stack) = stack()?;
    let client = plane.client().await?;
    let agent_dir = agent_dir(stack);

    let namespace = "e2e-failover";
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "ImageCatalog",
               "metadata": {"name": "postgresql", "namespace": namespace},
               "spec": {"images": [{"major": 18, "image": "ghcr.io/keiailab/pg-instance:18.6"}]}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
        "metadata": {"name": "pg", "namespace": namespace},
        "spec": {
            "instances": 3,
            "postgresVersion": 18,
            "imageCatalogRef": {"kind": "ImageCatalog", "name": "postgresql"},
            "storage": {"size": "1Gi"},
            "postgresql": {"parameters": {"shared_buffers": "32MB"}},
            "replication": {"synchronous": {"method": "any", "number": 1, "dataDurability": "required"}},
        }}),
    ];
    for object in &objects {
        testbed::manifests::apply(&client, object, namespace).await?;
    }
    let clusters: Api<api::PostgresCluster> = Api::namespaced(client.clone(), namespace);
    let primary = wait_healthy(&clusters, "pg", None, Duration::from_secs(120), &agent_dir).await?;
    let ready_after = started.elapsed();

    // Through the Services, as a client would.
    let password = login(&client, namespace, "pg").await?;
    let rw = service_port(stack, namespace, &api::contract::rw_service("pg"))?;
    let ro = service_port(stack, namespace, &api::contract::ro_service("pg"))?;
    let writer = connect_when_served(rw, &password).await?;
    writer
        .batch_execute("CREATE TABLE acks (id bigint PRIMARY KEY); INSERT INTO acks VALUES (0)")
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reader = connect(ro, &password).await;
        if let Ok(reader) = reader
            && let Ok(row) = reader.query_one("SELECT count(*) FROM acks", &[]).await
            && row.get::<_, i64>(0) == 1
            && reader
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await?
                .get::<_, bool>(0)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the row written through -rw is not read through -ro"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A writer counts acknowledged writes while the primary pod is deleted.
    let stop = Arc::new(AtomicBool::new(false));
    let writing = {
        let stop = stop.clone();
        let password = password.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut client: Option<tokio_postgres::Client> = None;
            let mut first_failure: Option<Instant> = None;
            let mut outage = Duration::ZERO;
            let mut next = 1i64;
            while !stop.load(Ordering::SeqCst) {
                if client.is_none() {
                    client = connect(rw, &password).await.ok();
                }
                let result = match &client {
                    Some(c) => c
                        .execute("INSERT INTO acks VALUES ($1)", &[&next])
                        .await
                        .ok(),
                    None => None,
                };
                match result {
                    Some(_) => {
                        acknowledged.push(next);
                        if let Some(at) = first_failure.take() {
                            outage = outage.max(at.elapsed());
                        }
                    }
                    None => {
                        client = None;
                        first_failure.get_or_insert_with(Instant::now);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                next += 1;
            }
            (acknowledged, outage)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.delete(&primary, &DeleteParams::default()).await?;
    let new_primary = wait_healthy(
        &clusters,
        "pg",
        Some(&primary),
        Duration::from_secs(180),
        &agent_dir,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let (acknowledged, outage) = writing.await?;

    let checker = connect(rw, &password).await?;
    let rows: Vec<i64> = checker
        .query("SELECT id FROM acks", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost: Vec<i64> = acknowledged
        .iter()
        .filter(|id| !rows.contains(id))
        .copied()
        .collect();
    println!(
        "e2e: cluster Healthy after {:.0} s; failover {primary} -> {new_primary}: writes unavailable {:.1} s, acknowledged {}, lost {}",
        ready_after.as_secs_f64(),
        outage.as_secs_f64(),
        acknowledged.len(),
        lost.len()
    );
    assert!(!acknowledged.is_empty(), "the writer wrote nothing");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_cluster_garbage_collects_what_it_owned_and_keeps_its_volumes()
-> anyhow::Result<()> {
    let (plane, stack) = stack()?;
    let client = plane.client().await?;
    let agent_dir = agent_dir(stack);
    let namespace = "e2e-delete";
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "ImageCatalog",
               "metadata": {"name": "postgresql", "namespace": namespace},
               "spec": {"images": [{"major": 18, "image": "ghcr.io/keiailab/pg-instance:18.6"}]}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
        "metadata": {"name": "gone", "namespace": namespace},
        "spec": {
            "instances": 1,
            "postgresVersion": 18,
            "imageCatalogRef": {"kind": "ImageCatalog", "name": "postgresql"},
            "storage": {"size": "1Gi"},
            "postgresql": {"parameters": {"shared_buffers": "32MB"}},
        }}),
    ];
    for object in &objects {
        testbed::manifests::apply(&client, object, namespace).await?;
    }
    let clusters: Api<api::PostgresCluster> = Api::namespaced(client.clone(), namespace);
    wait_healthy(
        &clusters,
        "gone",
        None,
        Duration::from_secs(150),
        &agent_dir,
    )
    .await?;

    clusters.delete("gone", &DeleteParams::background()).await?;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left_sets = statefulsets.list(&ListParams::default()).await?.items.len();
        let left_services = services.list(&ListParams::default()).await?.items.len();
        let left_pods = pods.list(&ListParams::default()).await?.items.len();
        if left_sets + left_services + left_pods == 0 && clusters.get_opt("gone").await?.is_none() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not garbage-collected after 90 s: {left_sets} StatefulSets, {left_services} Services, {left_pods} pods"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // deleteVolumesOnDeletion is false by default: the claim (and its data) stays.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    assert_eq!(claims.list(&ListParams::default()).await?.items.len(), 1);
    Ok(())
}

/// Waits until the cluster's current primary is `primary` and it is Healthy.
async fn wait_primary(
    clusters: &Api<api::PostgresCluster>,
    name: &str,
    primary: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = clusters.get(name).await?.status.unwrap_or_default();
        if status.current_primary.as_deref() == Some(primary)
            && status.phase.as_deref() == Some("Healthy")
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "primary of {name} is {:?} ({:?}), not {primary}, after {timeout:?}",
            status.current_primary,
            status.phase
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_switchover_hibernate_and_resume_keep_the_data() -> anyhow::Result<()> {
    let (plane, stack) = stack()?;
    let client = plane.client().await?;
    let agent_dir = agent_dir(stack);
    let namespace = "e2e-scale";
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "ImageCatalog",
               "metadata": {"name": "postgresql", "namespace": namespace},
               "spec": {"images": [{"major": 18, "image": "ghcr.io/keiailab/pg-instance:18.6"}]}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
        "metadata": {"name": "sc", "namespace": namespace},
        "spec": {
            "instances": 1,
            "postgresVersion": 18,
            "imageCatalogRef": {"kind": "ImageCatalog", "name": "postgresql"},
            "storage": {"size": "1Gi"},
            "postgresql": {"parameters": {"shared_buffers": "32MB"}},
        }}),
    ];
    for object in &objects {
        testbed::manifests::apply(&client, object, namespace).await?;
    }
    let clusters: Api<api::PostgresCluster> = Api::namespaced(client.clone(), namespace);
    wait_healthy(&clusters, "sc", None, Duration::from_secs(150), &agent_dir).await?;
    let password = login(&client, namespace, "sc").await?;
    let rw = service_port(stack, namespace, &api::contract::rw_service("sc"))?;
    connect_when_served(rw, &password)
        .await?
        .batch_execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('before')")
        .await?;
    let patch = |spec: serde_json::Value| {
        let clusters = clusters.clone();
        async move {
            clusters
                .patch(
                    "sc",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({ "spec": spec })),
                )
                .await
        }
    };

    // Scale 1 -> 3: the StatefulSet controller adds the replicas, they join and turn Ready.
    patch(json!({"instances": 3})).await?;
    wait_healthy(&clusters, "sc", None, Duration::from_secs(150), &agent_dir).await?;

    // Switchover to the last replica.
    patch(json!({"switchoverTo": "sc-2"})).await?;
    wait_primary(&clusters, "sc", "sc-2", Duration::from_secs(120)).await?;

    // Hibernate: every pod goes away; resume: the cluster comes back with its data.
    patch(json!({"hibernation": true})).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pods.list(&ListParams::default()).await?.items.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "pods still running 120 s after hibernation"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    patch(json!({"hibernation": false})).await?;
    wait_healthy(&clusters, "sc", None, Duration::from_secs(150), &agent_dir).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = connect(rw, &password).await
            && let Ok(row) = client.query_one("SELECT note FROM kept", &[]).await
        {
            assert_eq!(row.get::<_, String>(0), "before");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the row written before hibernation is not readable after resume"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
