//! `cargo xtask bench operator`: the operator binary reconciles N PostgresClusters (1000 by
//! default, `BENCH_CLUSTERS` to change) on a real etcd + kube-apiserver.
//!
//! Prints `reconcile_all_seconds=<x>`: from the first create until every cluster has its
//! StatefulSet, its three Services and a status with `observedGeneration`; and
//! `operator_peak_rss_mib=<x>`: the operator process's VmHWM from /proc.
//!
//! The control plane is started here rather than with `testbed::ApiServer` because 1000
//! clusters need 3000 ClusterIP Services, more than the test bed's /24 service range holds.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use api::PostgresCluster;
use api::postgres_cluster::PostgresClusterSpec;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use testbed::paths;
use testbed::process::die_with_parent;

const NAMESPACE: &str = "bench";

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct ControlPlane {
    _apiserver: Guard,
    _etcd: Guard,
    kubeconfig: String,
    dir: tempfile::TempDir,
}

fn spawn(mut command: Command, log: &Path) -> anyhow::Result<Guard> {
    let log = fs::File::create(log)?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut command);
    Ok(Guard(
        command
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?,
    ))
}

fn random_token() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

impl ControlPlane {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bench-apiserver-")
            .tempdir()?;
        let path = dir.path();
        let (etcd_port, peer_port, port) = (
            testbed::free_port(),
            testbed::free_port(),
            testbed::free_port(),
        );
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(paths::etcd());
        etcd.arg("--name=bench")
            .arg(format!("--data-dir={}", path.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=bench={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--quota-backend-bytes=4294967296")
            .arg("--log-level=warn");
        let etcd = spawn(etcd, &path.join("etcd.log"))?;

        let token = random_token();
        fs::write(
            path.join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )?;
        let key = rcgen::KeyPair::generate()?;
        fs::write(path.join("sa.key"), key.serialize_pem())?;
        fs::write(path.join("sa.pub"), key.public_key_pem())?;
        let mut apiserver = Command::new(paths::kube_apiserver());
        apiserver
            .arg(format!("--etcd-servers={client_url}"))
            .arg(format!("--secure-port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", path.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                path.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg(format!(
                "--service-account-key-file={}",
                path.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                path.join("sa.key").display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--v=0");
        let apiserver = spawn(apiserver, &path.join("apiserver.log"))?;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n    user: admin\n    namespace: default\ncurrent-context: bench\n"
        );
        fs::write(path.join("kubeconfig"), &kubeconfig)?;
        Ok(Self {
            _apiserver: apiserver,
            _etcd: etcd,
            kubeconfig,
            dir,
        })
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig: Kubeconfig = serde_yaml::from_str(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    async fn wait_ready(&self) -> anyhow::Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(client) = self.client().await
                && let Ok(request) = http_get("/readyz")
                && client
                    .request_text(request)
                    .await
                    .is_ok_and(|b| b.trim() == "ok")
            {
                return Ok(client);
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready; see {}",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn http_get(path: &str) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

async fn install_crds(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in api::all_crds() {
        crds.create(&PostParams::default(), &crd).await?;
    }
    // Established: the first list of the new kinds succeeds.
    let clusters: Api<PostgresCluster> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while clusters
        .list(&ListParams::default().limit(1))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("CRDs not established");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Peak and current resident set size of `pid`, in MiB (VmHWM, VmRSS).
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Clusters whose status has an observedGeneration equal to their generation.
async fn count_observed(client: &Client) -> anyhow::Result<usize> {
    let clusters: Api<PostgresCluster> = Api::namespaced(client.clone(), NAMESPACE);
    Ok(clusters
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|cluster| {
            cluster.metadata.generation.is_some()
                && cluster.status.as_ref().and_then(|s| s.observed_generation)
                    == cluster.metadata.generation
        })
        .count())
}

/// StatefulSets and Services in the namespace.
async fn count_objects(client: &Client) -> anyhow::Result<(usize, usize)> {
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), NAMESPACE)
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    let services = Api::<Service>::namespaced(client.clone(), NAMESPACE)
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    Ok((statefulsets, services))
}

/// The operator's `postgres_operator_reconciles_total` (all results), from its /metrics.
async fn reconciles(port: u16) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(
        text.lines()
            .filter(|line| line.starts_with("postgres_operator_reconciles_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total: usize = std::env::var("BENCH_CLUSTERS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1000);
    let plane = ControlPlane::start()?;
    let client = plane.wait_ready().await?;
    install_crds(&client).await?;
    testbed::apiserver::create_namespace(&client, NAMESPACE).await?;

    let http_port = testbed::free_port();
    let mut operator = Command::new(env!("CARGO_BIN_EXE_postgres-operator"));
    operator
        .env("KUBECONFIG", plane.dir.path().join("kubeconfig"))
        .env("LOG_LEVEL", "warn")
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .args(["--lease-namespace", "default"]);
    let operator = spawn(operator, &plane.dir.path().join("operator.log"))?;
    let pid = operator.0.id();

    let started = Instant::now();
    let clusters: Api<PostgresCluster> = Api::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(0..total)
        .map(|index| {
            let clusters = clusters.clone();
            async move {
                let cluster = PostgresCluster::new(
                    &format!("pg-{index:04}"),
                    PostgresClusterSpec::with_image(3, "postgres:18.1"),
                );
                clusters.create(&PostParams::default(), &cluster).await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let created = started.elapsed();

    // Light polling (one list per second) so that the measurement does not load the API
    // server much.
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last = 0;
    loop {
        let observed = count_observed(&client).await?;
        if observed != last {
            eprintln!(
                "after {:.1}s: {observed} clusters observed",
                started.elapsed().as_secs_f64()
            );
            last = observed;
        }
        if observed >= total {
            let (statefulsets, services) = count_objects(&client).await?;
            if statefulsets >= total && services >= 3 * total {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("not every cluster was reconciled: {observed} of {total}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let elapsed = started.elapsed();
    let (peak, current) = memory_mib(pid)?;
    println!("clusters={total}");
    println!("create_all_seconds={:.2}", created.as_secs_f64());
    println!("reconcile_all_seconds={:.2}", elapsed.as_secs_f64());
    println!("operator_peak_rss_mib={peak:.1}");
    println!("operator_rss_after_mib={current:.1}");
    if let Some(count) = reconciles(http_port).await {
        println!("operator_reconciles={count}");
    }
    drop(operator);
    Ok(())
}
