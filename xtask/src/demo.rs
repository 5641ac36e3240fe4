//! `cargo xtask demo`: the product on one machine. A local control plane (etcd + kube-apiserver),
//! the CRDs, the operator (`postgres-operator`), the samples of examples/, and a stand-in kubelet
//! that runs each instance pod's `pg-instance` as a local process: a real three-instance
//! PostgreSQL 18 cluster with synchronous replication and failover that you can psql into.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use nix::sys::signal::Signal;
use testbed::process::{ChildGuard, die_with_parent};
use testbed::{ApiServer, manifests, paths};

use crate::local_kubelet::LocalKubelet;

const NAMESPACE: &str = "default";

/// Runs the demo; with `once` it exits after the cluster is up and shown, else it serves until Ctrl-C.
pub fn run(once: bool) -> anyhow::Result<()> {
    crate::setup::install_servers()?;
    crate::cargo(&["build", "--package", "controllers", "--package", "instance"])?;
    let binaries = target_dir().join("debug");
    tokio::runtime::Runtime::new()?.block_on(async move {
        crate::step("starting etcd and kube-apiserver on loopback");
        let server = ApiServer::start().await?;
        let client = server.client().await?;
        let crds = api::all_crds();
        crate::step(&format!("installing {} CRDs", crds.len()));
        server.install_crds(&crds).await?;

        crate::step("starting the operator (postgres-operator)");
        let operator_log = server.dir().join("operator.log");
        let mut operator = Command::new(binaries.join("postgres-operator"));
        operator
            .env("KUBECONFIG", server.kubeconfig_path())
            .env("WATCH_NAMESPACE", NAMESPACE)
            .env("POD_NAMESPACE", NAMESPACE)
            .env("LEADER_ELECT", "true")
            .env("HTTP_ADDR", format!("127.0.0.1:{}", testbed::free_port()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&operator_log)?)
            .stderr(std::fs::File::create(server.dir().join("operator.err"))?);
        die_with_parent(&mut operator);
        let _operator = ChildGuard::new(operator.spawn()?, Signal::SIGTERM, Duration::from_secs(10));

        let examples = manifests::read_folder(&paths::workspace_root().join("examples"))?;
        crate::step(&format!("applying {} objects from examples/", examples.len()));
        manifests::apply_all(&client, &examples, NAMESPACE).await?;

        crate::step("running the instance pods (local kubelet: pg-instance processes on loopback)");
        let pods_dir = server.dir().join("pods");
        let mut kubelet = LocalKubelet::new(
            client.clone(),
            NAMESPACE,
            &pods_dir,
            &server.kubeconfig_path(),
            &binaries.join("pg-instance"),
        );
        let clusters: Api<api::PostgresCluster> = Api::namespaced(client.clone(), NAMESPACE);
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last_phase = String::new();
        loop {
            if let Err(error) = kubelet.sync().await {
                eprintln!("    kubelet: {error:#}");
            }
            let demo = clusters.get("demo").await?;
            let status = demo.status.clone().unwrap_or_default();
            let phase = status.phase.clone().unwrap_or_default();
            let summary = format!(
                "{phase} ({} of {} ready, primary {})",
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
                    "the demo cluster is not Healthy after 5 minutes ({last_phase}); logs in {}",
                    server.dir().display()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        print_objects(&client, &crds).await?;
        let primary = clusters
            .get("demo")
            .await?
            .status
            .and_then(|s| s.current_primary)
            .unwrap_or_default();
        let port = kubelet.postgres_port(&primary).unwrap_or_default();
        let passfile = write_pgpass(&client, &server.dir().join("pgpass"), port).await?;
        let psql = paths::pg_bin().join("psql");
        let version = Command::new(&psql)
            .args(["-X", "-A", "-t", "-c", "SELECT version()"])
            .arg(format!("host=127.0.0.1 port={port} user=postgres dbname=app"))
            .env("PGPASSFILE", &passfile)
            .output()?;
        println!("\nThe primary {primary} answers: {}", String::from_utf8_lossy(&version.stdout).trim());
        println!("\nConnect to the primary:\n  PGPASSFILE={} {} \"host=127.0.0.1 port={port} user=postgres dbname=app\"", passfile.display(), psql.display());
        println!("kubeconfig: {}   (KUBECONFIG=... kubectl get postgres,pods)", server.kubeconfig_path().display());
        println!("logs: {}", server.dir().display());
        if once {
            kubelet.stop_all();
            return Ok(());
        }
        println!("\nServing until Ctrl-C. Try killing the primary's postgres: a replica takes over.");
        let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            tokio::select! {
                _ = &mut interrupted => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if let Err(error) = kubelet.sync().await {
                        eprintln!("    kubelet: {error:#}");
                    }
                }
            }
        }
        kubelet.stop_all();
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

/// Writes a 0600 password file for the superuser (the password itself is never printed).
async fn write_pgpass(
    client: &kube::Client,
    path: &std::path::Path,
    port: u16,
) -> anyhow::Result<PathBuf> {
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
    std::fs::write(path, format!("127.0.0.1:{port}:*:postgres:{escaped}\n"))?;
    let mut permissions = std::fs::metadata(path)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
    std::fs::set_permissions(path, permissions)?;
    Ok(path.to_path_buf())
}
