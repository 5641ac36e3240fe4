//! What every end-to-end test binary shares: one control plane and one node agent per binary,
//! with the operator installed from our Helm chart by the real helm, and the helpers the
//! scenarios use (apply, wait for Healthy, connect through a Service's local port). Scenarios run
//! in parallel, each in a namespace of its own.
#![allow(dead_code)]

pub mod backup;

// Not every binary uses it through this path.
#[allow(unused_imports)]
pub use backup::calm_failover;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use nodeagent::{ImageTable, NodeAgent, NodeAgentConfig};
use serde_json::{Value, json};
use testbed::{ControlPlane, paths};

/// Namespace of the operator's Deployment.
pub const OPERATOR_NAMESPACE: &str = "postgres-operator-system";

/// The image of every instance (the node agent maps any tag of `pg-instance` to the workspace's
/// build, so a new tag is a rolling update to the same binaries).
pub const INSTANCE_IMAGE: &str = "ghcr.io/keiailab/pg-instance:18.6";

/// target/debug of this build (the test runs from target/debug/deps).
pub fn binaries() -> anyhow::Result<PathBuf> {
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
        // A CA renewal's overlap short enough to watch (e2e_clients renews one).
        .args(["--set", "tls.caOverlapSeconds=20"])
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

/// The node agent (and its folder) of this test binary, with the operator installed.
pub struct Stack {
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

/// The shared control plane and node agent of this test binary.
pub struct E2e {
    /// The control plane.
    pub plane: &'static ControlPlane,
    stack: &'static Mutex<Option<Stack>>,
}

/// Starts (once per test binary) the node agent on the shared control plane and installs the
/// operator with helm.
pub fn stack() -> anyhow::Result<E2e> {
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
            // The Pooler image (PgBouncer) is in the table only once it is installed.
            testbed::pgbouncer::install()?;
            let mut images = ImageTable::project(&binaries, &pg_install)?;
            let barman = testbed::object_store::barman_bin()?;
            images.add_barman_cloud(barman.parent().unwrap_or(&barman))?;
            let agent = NodeAgent::start(NodeAgentConfig {
                node_name: "e2e-node".to_string(),
                kubeconfig: plane.kubeconfig_path().to_path_buf(),
                api_port: plane.port(),
                ca: plane.serving_ca_path().to_path_buf(),
                dir: dir.path().to_path_buf(),
                images,
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
        Ok(stack) => Ok(E2e { plane, stack }),
        Err(error) => anyhow::bail!("starting the e2e stack: {error}"),
    }
}

impl E2e {
    /// An admin client bound to the calling runtime.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.plane.client().await
    }

    /// Cuts pod `namespace/name` off from the network: peers, Services, probes and the API
    /// server reach it no more (the node agent drops its packets) until [`Self::heal`].
    pub fn partition(&self, namespace: &str, name: &str) {
        if let Some(stack) = self.stack.lock().expect("lock").as_ref() {
            stack.agent.partition(namespace, name);
        }
    }

    /// Reconnects pod `namespace/name`.
    pub fn heal(&self, namespace: &str, name: &str) {
        if let Some(stack) = self.stack.lock().expect("lock").as_ref() {
            stack.agent.heal(namespace, name);
        }
    }

    /// The node agent's folder (pods' logs and volumes).
    pub fn agent_dir(&self) -> PathBuf {
        self.stack
            .lock()
            .expect("lock")
            .as_ref()
            .map(|s| s.dir.path().to_path_buf())
            .unwrap_or_default()
    }

    /// The gateway of the pods' bridge: the host's address as the pods see it.
    pub fn host_address(&self) -> Option<std::net::Ipv4Addr> {
        self.stack
            .lock()
            .expect("lock")
            .as_ref()
            .map(|s| s.agent.gateway())
    }

    /// The local port forwarding to `namespace/service:port` (waits up to 10 s for the agent to
    /// see the Service).
    pub fn service_port_of(
        &self,
        namespace: &str,
        service: &str,
        port: u16,
    ) -> anyhow::Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let local = self
                .stack
                .lock()
                .expect("lock")
                .as_ref()
                .and_then(|s| s.agent.service_port(namespace, service, port));
            if let Some(local) = local {
                return Ok(local);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no local port for Service {namespace}/{service}:{port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The local port of a Service's PostgreSQL port.
    pub fn service_port(&self, namespace: &str, service: &str) -> anyhow::Result<u16> {
        self.service_port_of(namespace, service, api::contract::POSTGRES_PORT)
    }

    /// Last lines of the containers of the cluster's pods (for failure messages).
    pub fn cluster_logs(&self, namespace: &str, name: &str, instances: i32) -> String {
        let mut logs = String::new();
        for ordinal in 0..instances.max(1) {
            for container in [
                "install-instance-manager",
                "postgres",
                nodeagent::pod::AGENT_LOG,
            ] {
                let pod = format!("{name}-{ordinal}");
                let text = nodeagent::pod_log(&self.agent_dir(), namespace, &pod, container);
                // Without the readiness probe's refusals while PostgreSQL starts ("the database
                // system is starting up", 57P03), which would fill the tail.
                let told: Vec<&str> = text
                    .lines()
                    .filter(|line| !line.contains("\"state_code\":\"57P03\""))
                    .collect();
                logs.push_str(&format!(
                    "--- {pod}/{container} (latest incarnation last):\n{}\n",
                    tail(&told.join("\n"), 40)
                ));
            }
        }
        logs.push_str(&format!(
            "--- the operator's lines about {namespace}/{name}:\n{}\n",
            tail(&self.operator_lines(namespace, name), 30)
        ));
        logs.push_str(&format!(
            "--- the node agent's own last lines:\n{}\n",
            tail(&nodeagent::agent_log(&self.agent_dir()), 20)
        ));
        logs
    }

    /// Each instance pod of the cluster as the API server has it: phase, readiness, and what
    /// its instance manager last reported (the status annotation: role, lastError, ...).
    pub async fn instance_reports(&self, namespace: &str, name: &str) -> String {
        let listed = match self.client().await {
            Ok(client) => {
                Api::<Pod>::namespaced(client, namespace)
                    .list(
                        &ListParams::default()
                            .labels(&format!("{}={name}", api::contract::LABEL_CLUSTER)),
                    )
                    .await
            }
            Err(error) => return format!("--- pods of {name}: {error}\n"),
        };
        let Ok(listed) = listed else {
            return format!("--- pods of {name}: not listed\n");
        };
        let mut text = format!("--- pods of {name}:\n");
        for pod in listed.items {
            let ready = pod_is_ready(&pod);
            let status = pod.status.clone().unwrap_or_default();
            let reported = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(api::contract::ANNOTATION_INSTANCE_STATUS))
                .map(|text| text.chars().take(800).collect::<String>())
                .unwrap_or_default();
            // Conditions that are not True, with their reasons (an unscheduled pod says why).
            let unmet: Vec<String> = status
                .conditions
                .clone()
                .unwrap_or_default()
                .iter()
                .filter(|c| c.status != "True")
                .map(|c| {
                    format!(
                        "{} {} {}",
                        c.type_,
                        c.reason.clone().unwrap_or_default(),
                        c.message.clone().unwrap_or_default()
                    )
                })
                .collect();
            text.push_str(&format!(
                "{} (uid {}): node {:?}, phase {:?}, ready {ready}, deleting {}, not met {unmet:?}; reports {reported}\n",
                pod.metadata.name.clone().unwrap_or_default(),
                pod.metadata.uid.clone().unwrap_or_default(),
                pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
                status.phase.unwrap_or_default(),
                pod.metadata.deletion_timestamp.is_some(),
            ));
        }
        text
    }

    /// The operator pods' log lines that name the cluster (in its namespace): what a reconcile
    /// that never got as far as a status or a pod said.
    pub fn operator_lines(&self, namespace: &str, name: &str) -> String {
        let Ok(entries) = std::fs::read_dir(self.agent_dir().join("pods")) else {
            return String::new();
        };
        let mut lines = String::new();
        for entry in entries.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{OPERATOR_NAMESPACE}_"))
            {
                continue;
            }
            let Ok(logs) = std::fs::read_dir(entry.path().join("logs")) else {
                continue;
            };
            for log in logs.flatten() {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                for line in text
                    .lines()
                    .filter(|line| line.contains(name) && line.contains(namespace))
                {
                    lines.push_str(line);
                    lines.push('\n');
                }
            }
        }
        lines
    }

    /// Waits until the cluster is Healthy with every instance ready (and its primary is not
    /// `not_primary`); its primary.
    pub async fn wait_healthy(
        &self,
        clusters: &Api<api::PostgresCluster>,
        name: &str,
        not_primary: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let mut instances = 3;
        loop {
            if let Some(cluster) = clusters.get_opt(name).await? {
                instances = cluster.spec.instances;
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
                let namespace = namespace_of(clusters);
                anyhow::bail!(
                    "cluster {name} not Healthy after {timeout:?}: {last}\n{}{}",
                    self.instance_reports(&namespace, name).await,
                    self.cluster_logs(&namespace, name, instances)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Whether the pod's Ready condition is True (as the kubelet, here the node agent, set it).
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|status| status.conditions.iter().flatten())
        .any(|condition| condition.type_ == "Ready" && condition.status == "True")
}

/// The namespace an `Api` is bound to.
pub fn namespace_of(api: &Api<api::PostgresCluster>) -> String {
    api.resource_url()
        .split('/')
        .nth(5)
        .unwrap_or_default()
        .to_string()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Applies a namespace, an ImageCatalog `postgresql` and the cluster `name` with `spec` merged
/// over a small default spec.
pub async fn create_cluster(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    spec: Value,
) -> anyhow::Result<Api<api::PostgresCluster>> {
    let mut full = json!({
        "instances": 1,
        "postgresVersion": 18,
        "imageCatalogRef": {"kind": "ImageCatalog", "name": "postgresql"},
        "storage": {"size": "1Gi"},
        "postgresql": {"parameters": {"shared_buffers": "32MB"}},
    });
    if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        for (key, value) in extra {
            full.insert(key.clone(), value.clone());
        }
    }
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "ImageCatalog",
               "metadata": {"name": "postgresql", "namespace": namespace},
               "spec": {"images": [{"major": 18, "image": INSTANCE_IMAGE}]}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
               "metadata": {"name": name, "namespace": namespace},
               "spec": full}),
    ];
    for object in &objects {
        testbed::manifests::apply(client, object, namespace).await?;
    }
    Ok(Api::namespaced(client.clone(), namespace))
}

/// Merge-patches a cluster's spec.
pub async fn patch_spec(
    clusters: &Api<api::PostgresCluster>,
    name: &str,
    spec: Value,
) -> anyhow::Result<()> {
    clusters
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await?;
    Ok(())
}

/// A key of a Secret, as text.
pub async fn secret_value(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> anyhow::Result<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name} has no key {key}"))
}

/// The certificates a pod's instance reports as installed (`certificates` of its status
/// annotation): (certificate, notAfter in Unix seconds).
pub async fn installed_certificates(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
) -> anyhow::Result<Vec<(String, i64)>> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(pod)
        .await?;
    let status: Value = serde_json::from_str(
        pod.metadata
            .annotations
            .unwrap_or_default()
            .get(api::contract::ANNOTATION_INSTANCE_STATUS)
            .map_or("{}", String::as_str),
    )?;
    Ok(status["certificates"]
        .as_array()
        .map(|installed| {
            installed
                .iter()
                .filter_map(|validity| {
                    Some((
                        validity["certificate"].as_str()?.to_string(),
                        validity["notAfter"].as_i64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A PEM certificate's expiry, Unix seconds.
pub fn not_after(certificate_pem: &str) -> anyhow::Result<i64> {
    Ok(
        controllers::tls::certificates::summary(certificate_pem, "a certificate")?
            .not_after
            .unix_timestamp(),
    )
}

/// How a test logs in to a cluster: a password, and TLS verified as libpq's
/// `sslmode=verify-full` does, against the cluster's CA Secret (`<cluster>-ca`) and its `-rw`
/// Service name (TLS is on by default; PostgreSQL refuses clients without it). The server
/// certificate carries every Service name, so the same check holds through `-ro` and `-r`.
#[derive(Clone)]
pub struct Login {
    /// The password.
    pub password: String,
    /// The connector that verifies the server.
    pub tls: testbed::pg_tls::VerifyFull,
    /// The cluster's CA certificate (PEM), for clients that take a file (psql's `sslrootcert`).
    pub ca_pem: String,
    /// The name the server certificate is checked against (`<cluster>-rw.<namespace>.svc`).
    pub server_name: String,
}

impl Login {
    /// The same TLS check with another password (a declared user's).
    pub fn with_password(&self, password: &str) -> Self {
        Self {
            password: password.to_string(),
            ..self.clone()
        }
    }
}

/// The superuser's login to a cluster: its password and TLS against the cluster's CA.
pub async fn superuser_login(
    client: &kube::Client,
    namespace: &str,
    cluster: &str,
) -> anyhow::Result<Login> {
    let password = secret_value(
        client,
        namespace,
        &api::contract::superuser_secret(cluster),
        "password",
    )
    .await?;
    let ca_pem = secret_value(
        client,
        namespace,
        &api::contract::tls_ca_secret(cluster),
        api::contract::tls_keys::CA,
    )
    .await?;
    let server_name = format!("{}.{namespace}.svc", api::contract::rw_service(cluster));
    Ok(Login {
        password,
        tls: testbed::pg_tls::VerifyFull::new(&ca_pem, &server_name)?,
        ca_pem,
        server_name,
    })
}

/// Connects as `postgres` to 127.0.0.1:`port`.
pub async fn connect(port: u16, login: &Login) -> anyhow::Result<tokio_postgres::Client> {
    connect_as(port, "postgres", login, "postgres").await
}

/// Connects as `user` (with `login`'s password) to `dbname` on 127.0.0.1:`port`, over TLS.
pub async fn connect_as(
    port: u16,
    user: &str,
    login: &Login,
    dbname: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(&login.password)
        .dbname(dbname)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(3));
    // connect_timeout bounds the TCP connect only, which the Service's local port accepts at
    // once: a server out of reach behind it (a partitioned pod) would hang the handshake.
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), config.connect(login.tls.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from 127.0.0.1:{port} within 10 s"))??;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects once the Service has a ready endpoint (its EndpointSlice follows the pod's Ready
/// condition by a moment).
pub async fn connect_when_served(
    port: u16,
    login: &Login,
) -> anyhow::Result<tokio_postgres::Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = connect(port, login).await
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

/// Connects through the rw Service once it reaches a writable primary: after a switchover the
/// cluster's status names the new primary a moment before the Service's endpoints follow.
pub async fn connect_writable(port: u16, login: &Login) -> anyhow::Result<tokio_postgres::Client> {
    eventually(
        "the rw Service to reach a writable primary",
        Duration::from_secs(60),
        || async {
            let client = connect_when_served(port, login).await?;
            let row = client
                .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
                .await?;
            Ok(if row.get::<_, bool>(0) {
                Err("in recovery".to_string())
            } else {
                Ok(client)
            })
        },
    )
    .await
}

/// Waits up to 90 s until the Ready condition of `name` (its conditions read by `conditions`)
/// has a message that contains `wanted`; returns the message.
pub async fn ready_message_containing<K>(
    api: &Api<K>,
    name: &str,
    wanted: &str,
    conditions: impl Fn(K) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
) -> anyhow::Result<String>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(
        &format!("{wanted:?} in the Ready condition of {name}"),
        Duration::from_secs(90),
        || async {
            let ready = api::common::find_condition(&conditions(api.get(name).await?), "Ready")
                .map(|condition| condition.message.clone())
                .unwrap_or_default();
            Ok(if ready.contains(wanted) {
                Ok(ready)
            } else {
                Err(ready)
            })
        },
    )
    .await
}

/// Polls `check` every 500 ms until it returns `Some`, or fails after `timeout` with `what` and
/// the last state it saw.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Result<T, String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(state)) => state,
            Err(error) => format!("{error:#}"),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not after {timeout:?} (last seen: {last})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The file of a test-bed tool in target/debug (kubectl-pg, ...).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = binaries()?.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build -p {name}` first",
        path.display()
    );
    Ok(path)
}

/// The operator's figure `postgres_operator_backup_last_success_timestamp_seconds` for
/// `namespace/cluster`, read from its metrics Service (`None` while it has none).
pub async fn operator_backup_figure(
    e2e: &E2e,
    namespace: &str,
    cluster: &str,
) -> anyhow::Result<Option<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = e2e.service_port_of(OPERATOR_NAMESPACE, "postgres-operator-metrics", 8080)?;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let series = format!(
        "postgres_operator_backup_last_success_timestamp_seconds{{namespace=\"{namespace}\",cluster=\"{cluster}\"}} "
    );
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok()))
}

/// A client that inserts increasing ids into `table` through a Service's local port as fast as
/// it can, reconnecting after failures, and remembers which inserts were acknowledged.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<i64>, Duration)>,
}

impl Writer {
    /// Starts writing into `table` (an existing table with a bigint primary key `id`).
    pub fn start(port: u16, login: &Login, table: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let login = login.clone();
        let statement = format!("INSERT INTO {table} (id) VALUES ($1)");
        let task = tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut client: Option<tokio_postgres::Client> = None;
            let mut first_failure: Option<Instant> = None;
            let mut outage = Duration::ZERO;
            let mut next = 1_000_000i64;
            // A primary out of reach (partitioned) answers nothing: give up on a connection
            // or a write after a while, as an application's timeouts would. A write given up on
            // is not acknowledged.
            let patience = Duration::from_secs(5);
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                if client.is_none() {
                    client = tokio::time::timeout(patience, connect(port, &login))
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                let result = match &client {
                    Some(c) => tokio::time::timeout(patience, c.execute(&statement, &[&next]))
                        .await
                        .ok()
                        .and_then(Result::ok),
                    None => None,
                };
                match result {
                    Some(_) => {
                        acknowledged.push(next);
                        if let Some(at) = first_failure.take() {
                            outage = outage.max(at.elapsed());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
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
        });
        Self { stop, task }
    }

    /// Stops writing; the acknowledged ids and the longest write outage.
    pub async fn stop(self) -> anyhow::Result<(Vec<i64>, Duration)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(self.task.await?)
    }
}

/// The acknowledged ids missing from `table`, read through a Service's local port.
pub async fn lost_writes(
    port: u16,
    login: &Login,
    table: &str,
    acknowledged: &[i64],
) -> anyhow::Result<Vec<i64>> {
    let client = connect_when_served(port, login).await?;
    let rows: std::collections::BTreeSet<i64> = client
        .query(&format!("SELECT id FROM {table}"), &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(acknowledged
        .iter()
        .filter(|id| !rows.contains(id))
        .copied()
        .collect())
}

/// Kills the operator's process at once (its pod deleted with no grace period, as
/// `kubectl delete pod --force --grace-period=0`); the Deployment starts another.
pub async fn kill_operator(client: &kube::Client) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let running = pods.list(&ListParams::default()).await?;
    let pod = running
        .items
        .iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .and_then(|p| p.metadata.name.clone())
        .ok_or_else(|| anyhow::anyhow!("no operator pod runs"))?;
    pods.delete(
        &pod,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await?;
    Ok(pod)
}
