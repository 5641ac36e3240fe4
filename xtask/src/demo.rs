//! `cargo xtask demo`: the product on one machine, through the real Kubernetes controllers. A
//! local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), the node
//! agent that runs the scheduled pods as local processes, the operator installed from our Helm
//! chart with helm (it runs as the chart's Deployment under the chart's RBAC), and the samples of
//! examples/: a real three-instance PostgreSQL 18 cluster, created by the StatefulSet controller,
//! with synchronous replication and failover, reachable through its Services, a Pooler in front of
//! it, and a sharded cluster (two shards behind pg-router).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use nodeagent::{ImageTable, NodeAgent, NodeAgentConfig};
use testbed::{ControlPlane, manifests, paths};

const NAMESPACE: &str = "default";
const OPERATOR_NAMESPACE: &str = "postgres-operator-system";
/// The sharded example cluster (examples/sharded-postgrescluster.yaml).
const SHARDED: &str = "sharded";

/// Runs the demo; with `once` it exits after the cluster is up and shown, else it serves until Ctrl-C.
pub fn run(once: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    crate::setup::install_servers()?;
    crate::cargo(&[
        "build",
        "--package",
        "controllers",
        "--package",
        "instance",
        "--package",
        "router",
    ])?;
    let binaries = target_dir().join("debug");
    tokio::runtime::Runtime::new()?.block_on(async move {
        crate::step("starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback");
        let plane = ControlPlane::start().await?;
        let client = plane.client().await?;
        let agent_dir = tempfile::Builder::new()
            .prefix("demo-node-")
            .tempdir_in(nodeagent::work_dir()?)?;
        std::fs::set_permissions(
            agent_dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        // PostgreSQL built with OpenSSL: the demo cluster has TLS (the default).
        let pg_install = paths::pg_bin_tls().parent().map(PathBuf::from).unwrap_or_default();
        crate::step("starting the node agent (runs the scheduled pods as local processes)");
        let mut agent = NodeAgent::start(NodeAgentConfig {
            node_name: "demo-node".to_string(),
            kubeconfig: plane.kubeconfig_path().to_path_buf(),
            api_port: plane.port(),
            ca: plane.serving_ca_path().to_path_buf(),
            dir: agent_dir.path().to_path_buf(),
            images: ImageTable::project(&binaries, &pg_install)?,
        })?;

        crate::step("installing the operator from charts/postgres-operator with helm");
        let chart = paths::workspace_root().join("charts").join("postgres-operator");
        let helm = Command::new(paths::helm())
            .args(["upgrade", "--install", "postgres-operator"])
            .arg(&chart)
            .args(["--namespace", OPERATOR_NAMESPACE, "--create-namespace"])
            .args(["--set", &format!("watchNamespace={NAMESPACE}")])
            .arg("--kubeconfig")
            .arg(plane.kubeconfig_path())
            .env("HELM_CACHE_HOME", plane.dir().join("helm-cache"))
            .env("HELM_CONFIG_HOME", plane.dir().join("helm-config"))
            .env("HELM_DATA_HOME", plane.dir().join("helm-data"))
            .output()?;
        anyhow::ensure!(
            helm.status.success(),
            "helm install failed: {}",
            String::from_utf8_lossy(&helm.stderr)
        );

        // ShardRanges are the operator's to write (the example shows one of them), and a
        // ShardSplitJob needs rows to move: both stay out of the demo's first apply.
        let examples: Vec<_> = manifests::read_folder(&paths::workspace_root().join("examples"))?
            .into_iter()
            .filter(|(_, object)| !matches!(object["kind"].as_str(), Some("ShardRange" | "ShardSplitJob")))
            .collect();
        crate::step(&format!("applying {} objects from examples/", examples.len()));
        manifests::apply_all(&client, &examples, NAMESPACE).await?;

        let clusters: Api<api::PostgresCluster> = Api::namespaced(client.clone(), NAMESPACE);
        let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last_phase = String::new();
        loop {
            let demo = clusters.get("demo").await?;
            let status = demo.status.clone().unwrap_or_default();
            let phase = status.phase.clone().unwrap_or_default();
            let running = pods
                .list(&ListParams::default().labels(&format!("{}=demo", api::contract::LABEL_CLUSTER)))
                .await?
                .items
                .len();
            let summary = format!(
                "{phase} ({running} pods, {} of {} ready, primary {})",
                status.ready_instances,
                demo.spec.instances,
                status.current_primary.as_deref().unwrap_or("-")
            );
            if summary != last_phase {
                crate::step(&format!("PostgresCluster demo: {summary}"));
                last_phase = summary;
            }
            if phase == "Healthy" {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the demo cluster is not Healthy after 5 minutes ({last_phase}); logs in {} and {}",
                    plane.dir().display(),
                    agent_dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        wait_healthy(&clusters, SHARDED, Duration::from_secs(300)).await?;
        crate::step(&format!(
            "ready {:.0} s after `cargo xtask demo` started",
            started.elapsed().as_secs_f64()
        ));

        print_objects(&client, &api::all_crds()).await?;
        let passfile = write_pgpass(&client, &plane.dir().join("pgpass")).await?;
        // psql with OpenSSL: the cluster refuses clients without TLS.
        let psql = paths::pg_bin_tls().join("psql");
        println!("\nServices (a local port each, forwarding to ready endpoints as kube-proxy would):");
        for ((namespace, service, port), local) in agent.service_ports() {
            if namespace != NAMESPACE || port != api::contract::POSTGRES_PORT {
                continue;
            }
            println!(
                "  {service:<14} PGPASSFILE={} {} \"host=127.0.0.1 port={local} user=postgres dbname=app\"",
                passfile.display(),
                psql.display()
            );
        }
        // TLS as an application does it: verify-full against the cluster's CA Secret and the
        // -rw Service name (the local port stands in for the Service's address).
        let ca_file = plane.dir().join("demo-ca.crt");
        std::fs::write(&ca_file, secret_text(&client, &api::contract::tls_ca_secret("demo"), api::contract::tls_keys::CA).await?)?;
        let rw_name = format!("{}.{NAMESPACE}.svc", api::contract::rw_service("demo"));
        if let Some(port) = agent.service_port(NAMESPACE, &api::contract::rw_service("demo"), api::contract::POSTGRES_PORT) {
            let version = Command::new(&psql)
                .args(["-X", "-A", "-t", "-c", "SELECT version() || ', ' || (SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid())"])
                .arg(format!(
                    "host={rw_name} hostaddr=127.0.0.1 port={port} user=postgres dbname=app sslmode=verify-full sslrootcert={}",
                    ca_file.display()
                ))
                .env("PGPASSFILE", &passfile)
                .output()?;
            println!(
                "\nThe -rw Service answers (verify-full): {}{}",
                String::from_utf8_lossy(&version.stdout).trim(),
                String::from_utf8_lossy(&version.stderr).trim()
            );
        }
        pooler_answers(&client, &agent, &psql, &ca_file).await?;
        router_answers(&client, &agent, &psql, plane.dir()).await?;
        println!("kubeconfig: {}   (KUBECONFIG=... kubectl get postgres,pods,svc)", plane.kubeconfig_path().display());
        println!("logs: {} (control plane), {} (pods)", plane.dir().display(), agent_dir.path().display());
        if once {
            agent.stop();
            return Ok(());
        }
        println!("\nServing until Ctrl-C. Try `kubectl delete pod <primary>`: a replica takes over.");
        tokio::signal::ctrl_c().await?;
        crate::step("stopping the pods, the node agent and the control plane");
        agent.stop();
        Ok(())
    })
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::workspace_root().join("target"))
}

/// Lists every object of our kinds as stored, and the pods with their roles.
async fn print_objects(
    client: &kube::Client,
    crds: &[k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition],
) -> anyhow::Result<()> {
    println!();
    for crd in crds {
        let gvk = GroupVersionKind::gvk(
            &crd.spec.group,
            &crd.spec.versions[0].name,
            &crd.spec.names.kind,
        );
        let resource = ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        for object in api.list(&ListParams::default()).await? {
            println!(
                "{:<22} {:<10} {:<22} generation={}",
                crd.spec.names.kind,
                object.metadata.namespace.as_deref().unwrap_or("-"),
                object.metadata.name.as_deref().unwrap_or("-"),
                object.metadata.generation.unwrap_or_default()
            );
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    println!();
    for pod in pods
        .list(&ListParams::default().labels(api::contract::LABEL_CLUSTER))
        .await?
    {
        let role = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(api::contract::LABEL_ROLE))
            .cloned()
            .unwrap_or_default();
        println!(
            "Pod {:<12} role={role}",
            pod.metadata.name.unwrap_or_default()
        );
    }
    Ok(())
}

/// Waits (up to 2 minutes) until a query as the application user through the example Pooler's
/// Service succeeds, over TLS verified as an application does (`verify-full` against the
/// cluster's CA and the Pooler's Service name): its PgBouncer pods logged in to PostgreSQL over
/// TLS too (`verify-full` to the `-rw` Service name) with the pooler auth role.
async fn pooler_answers(
    client: &kube::Client,
    agent: &NodeAgent,
    psql: &std::path::Path,
    ca_file: &std::path::Path,
) -> anyhow::Result<()> {
    const POOLER: &str = "demo-pooler-rw";
    let password = secret_text(client, &api::contract::app_secret("demo"), "password").await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(port) = agent.service_port(NAMESPACE, POOLER, api::contract::POSTGRES_PORT) {
            let output = Command::new(psql)
                .args(["-X", "-A", "-t", "-c", "SELECT current_user || ' via PgBouncer, server TLS ' || ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"])
                .arg(format!(
                    "host={POOLER}.{NAMESPACE}.svc hostaddr=127.0.0.1 port={port} user=app dbname=app sslmode=verify-full sslrootcert={} connect_timeout=10",
                    ca_file.display()
                ))
                .env("PGPASSWORD", &password)
                .output()?;
            if output.status.success() {
                println!(
                    "The Pooler {POOLER} answers (verify-full): {}",
                    String::from_utf8_lossy(&output.stdout).trim()
                );
                return Ok(());
            }
            last = String::from_utf8_lossy(&output.stderr).trim().to_string();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    anyhow::bail!("the Pooler {POOLER} did not answer in 2 minutes: {last}")
}

/// Waits until PostgresCluster `name` is Healthy, printing each change of its phase.
async fn wait_healthy(
    clusters: &Api<api::PostgresCluster>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let cluster = clusters.get(name).await?;
        let status = cluster.status.unwrap_or_default();
        let phase = status.phase.unwrap_or_default();
        // The reason when it is not there yet (a Degraded or not-Ready condition's message).
        let reason = status
            .conditions
            .iter()
            .find(|c| {
                (c.type_ == "Degraded" && c.status == "True")
                    || (c.type_ == "Ready" && c.status != "True")
            })
            .map(|c| format!(": {}", c.message))
            .unwrap_or_default();
        let summary = format!("{phase} ({} ready){reason}", status.ready_instances);
        if summary != last {
            crate::step(&format!("PostgresCluster {name}: {summary}"));
            last = summary;
        }
        if phase == "Healthy" {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "PostgresCluster {name} is not Healthy after {} s: {last}",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Through the sharded example's router Service, over TLS (`verify-full` against the cluster's
/// CA and the router's Service name): creates a sharded and a reference table, writes 200
/// orders, and reads them back across the shards.
async fn router_answers(
    client: &kube::Client,
    agent: &NodeAgent,
    psql: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let router = api::contract::router_service(SHARDED);
    let password = secret_text(
        client,
        &api::contract::superuser_secret(SHARDED),
        "password",
    )
    .await?;
    let ca_file = dir.join("sharded-ca.crt");
    std::fs::write(
        &ca_file,
        secret_text(
            client,
            &api::contract::tls_ca_secret(SHARDED),
            api::contract::tls_keys::CA,
        )
        .await?,
    )?;
    let values: Vec<String> = (1..=200)
        .map(|id| format!("({}, {id}, {}.50)", id % 50 + 1, id % 7))
        .collect();
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS orders (customer_id bigint, id bigint, total numeric(10,2), PRIMARY KEY (customer_id, id));
         CREATE TABLE IF NOT EXISTS countries (code text PRIMARY KEY, name text);
         INSERT INTO countries (code, name) VALUES ('fr', 'France'), ('jp', 'Japan') ON CONFLICT DO NOTHING;
         INSERT INTO orders (customer_id, id, total) VALUES {} ON CONFLICT DO NOTHING;
         SELECT count(*) || ' orders of ' || count(DISTINCT customer_id) || ' customers, sum ' || sum(total) FROM orders;",
        values.join(", ")
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(port) = agent.service_port(NAMESPACE, &router, api::contract::POSTGRES_PORT) {
            let output = Command::new(psql)
                .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", &sql])
                .arg(format!(
                    "host={router}.{NAMESPACE}.svc hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} connect_timeout=10",
                    ca_file.display()
                ))
                .env("PGPASSWORD", &password)
                .output()?;
            if output.status.success() {
                println!(
                    "pg-router {router} answers (verify-full): {}",
                    String::from_utf8_lossy(&output.stdout).trim()
                );
                println!(
                    "  PGPASSWORD=... {} \"host={router}.{NAMESPACE}.svc hostaddr=127.0.0.1 port={port} user=postgres sslmode=verify-full sslrootcert={}\"",
                    psql.display(),
                    ca_file.display()
                );
                return Ok(());
            }
            last = String::from_utf8_lossy(&output.stderr).trim().to_string();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    anyhow::bail!("the router {router} did not answer in 2 minutes: {last}")
}

/// A key of a Secret of the demo namespace, as text.
async fn secret_text(client: &kube::Client, name: &str, key: &str) -> anyhow::Result<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(name)
        .await?;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).to_string())
        .ok_or_else(|| anyhow::anyhow!("Secret {NAMESPACE}/{name} has no key {key}"))
}

/// Writes a 0600 password file for the superuser (the password itself is never printed).
async fn write_pgpass(client: &kube::Client, path: &std::path::Path) -> anyhow::Result<PathBuf> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let secret = secrets
        .get(&api::contract::superuser_secret("demo"))
        .await?;
    let password = secret
        .data
        .as_ref()
        .and_then(|d| d.get("password"))
        .map(|b| String::from_utf8_lossy(&b.0).to_string())
        .unwrap_or_default();
    let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
    // Any host: the verify-full example names the -rw Service (`host=`), not 127.0.0.1.
    std::fs::write(path, format!("*:*:*:postgres:{escaped}\n"))?;
    let mut permissions = std::fs::metadata(path)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
    std::fs::set_permissions(path, permissions)?;
    Ok(path.to_path_buf())
}
