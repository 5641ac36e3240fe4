//! A real Kubernetes control plane for one test: etcd + kube-apiserver on loopback ports, a static
//! admin token, a kubeconfig file and `kube::Client`s. No kubelet, no controller-manager (as
//! controller-runtime's envtest).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::paths;
use crate::process::{ChildGuard, die_with_parent};
use crate::tcp_proxy::TcpProxy;

/// Field manager the test bed uses for server-side apply.
pub const FIELD_MANAGER: &str = "testbed";

/// etcd and kube-apiserver owned by a test.
pub struct ApiServer {
    apiserver: ChildGuard,
    etcd: ChildGuard,
    port: u16,
    token: String,
    /// Static tokens of the other users (the control-plane components), by user name.
    user_tokens: Vec<(String, String)>,
    dir: TempDir,
}

/// What differs between the envtest-like API server and the one of a full control plane.
#[derive(Debug, Clone, Default)]
pub struct ApiServerOptions {
    /// More users with a static token each: (user name, groups), for the components.
    pub users: Vec<(String, Vec<String>)>,
    /// Keeps the ServiceAccount admission plugin (pods get their token volume); only when a
    /// controller-manager creates the `default` ServiceAccounts, else pods cannot be created.
    pub service_account_admission: bool,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("port", &self.port)
            .finish()
    }
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until the API server reports ready.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ApiServerOptions::default()).await
    }

    /// Starts etcd and kube-apiserver with `options` and waits until the API server is ready.
    pub async fn start_with(options: ApiServerOptions) -> anyhow::Result<Self> {
        for binary in [paths::etcd(), paths::kube_apiserver()] {
            if !binary.exists() {
                bail!(
                    "{} not found (run `cargo xtask setup`, or set ETCD / KUBE_APISERVER)",
                    binary.display()
                );
            }
        }
        let dir = tempfile::Builder::new().prefix("apiserver-").tempdir()?;
        let etcd_port = crate::free_port();
        let etcd_peer_port = crate::free_port();
        let etcd = spawn_etcd(dir.path(), etcd_port, etcd_peer_port)?;

        let token = random_token();
        let mut tokens = format!("{token},admin,admin,system:masters\n");
        let mut user_tokens = Vec::new();
        for (user, groups) in &options.users {
            let user_token = random_token();
            if groups.is_empty() {
                tokens.push_str(&format!("{user_token},{user},{user}\n"));
            } else {
                tokens.push_str(&format!(
                    "{user_token},{user},{user},\"{}\"\n",
                    groups.join(",")
                ));
            }
            user_tokens.push((user.clone(), user_token));
        }
        fs::write(dir.path().join("tokens.csv"), tokens)?;
        let key = rcgen::KeyPair::generate().context("generating the service-account key")?;
        fs::write(dir.path().join("sa.key"), key.serialize_pem())?;
        fs::write(dir.path().join("sa.pub"), key.public_key_pem())?;

        let port = crate::free_port();
        let apiserver = spawn_apiserver(
            dir.path(),
            port,
            etcd_port,
            options.service_account_admission,
        )?;
        let server = Self {
            apiserver,
            etcd,
            port,
            token,
            user_tokens,
            dir,
        };
        fs::write(server.kubeconfig_path(), server.kubeconfig_yaml())?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// HTTPS URL of the API server.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Port of the API server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path of a kubeconfig file for this API server (admin token, TLS verification off: the
    /// serving certificate is self-signed).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Folder that holds the logs and the kubeconfig.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url(), &self.token)
    }

    /// Starts a [`TcpProxy`] to this API server and writes at `path` a kubeconfig (admin token)
    /// that reaches the server through it, so that a test can partition that one client from
    /// the server (cut it, or black-hole it).
    pub fn proxied_kubeconfig(&self, path: &Path) -> anyhow::Result<TcpProxy> {
        let proxy = TcpProxy::start(([127, 0, 0, 1], self.port).into())?;
        let url = format!("https://127.0.0.1:{}", proxy.port());
        fs::write(path, kubeconfig_yaml(&url, &self.token))?;
        Ok(proxy)
    }

    /// Writes a kubeconfig for `user` (one of [`ApiServerOptions::users`]) into the server's
    /// folder and returns its path.
    pub fn write_user_kubeconfig(&self, user: &str) -> anyhow::Result<PathBuf> {
        let token = self
            .user_tokens
            .iter()
            .find(|(name, _)| name == user)
            .map(|(_, token)| token)
            .with_context(|| format!("no static token for user {user}"))?;
        let path = self
            .dir
            .path()
            .join(format!("{}.kubeconfig", user.replace(':', "-")));
        fs::write(&path, kubeconfig_yaml(&self.url(), token))?;
        Ok(path)
    }

    /// The API server's serving certificate chain (self-signed CA included), for in-cluster
    /// clients' `ca.crt`.
    pub fn serving_ca_path(&self) -> PathBuf {
        self.dir.path().join("certs").join("apiserver.crt")
    }

    /// Path of the service-account signing key (for the controller-manager's token controller).
    pub fn service_account_key_path(&self) -> PathBuf {
        self.dir.path().join("sa.key")
    }

    /// A new client for this API server, bound to the calling runtime.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig: Kubeconfig = serde_yaml::from_str(&self.kubeconfig_yaml())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let request = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(body) = client.request_text(request).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after 60 s; log:\n{}",
                    tail(&self.dir.path().join("apiserver.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Applies `crds` (server-side) and waits until each is Established.
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> anyhow::Result<()> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &params, &Patch::Apply(crd))
                .await
                .with_context(|| format!("applying CRD {name}"))?;
        }
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let current = api.get(&name).await?;
                let established = current
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} not Established after 30 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Last lines of the API server's log (for failure messages).
    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("apiserver.log"))
    }

    /// Stops kube-apiserver now (etcd keeps running), as an outage would.
    pub fn stop_apiserver(&mut self) {
        self.apiserver.stop();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.apiserver.stop();
        self.etcd.stop();
    }
}

fn spawn_etcd(dir: &Path, port: u16, peer_port: u16) -> anyhow::Result<ChildGuard> {
    let log = fs::File::create(dir.join("etcd.log"))?;
    let client_url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new(paths::etcd());
    command
        .arg("--name=testbed")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=testbed={peer_url}"))
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut command);
    let child = command.spawn().context("spawning etcd")?;
    Ok(ChildGuard::new(
        child,
        Signal::SIGTERM,
        Duration::from_secs(5),
    ))
}

fn kubeconfig_yaml(url: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: testbed\n  context:\n    cluster: testbed\n    user: admin\n    namespace: default\ncurrent-context: testbed\n"
    )
}

fn spawn_apiserver(
    dir: &Path,
    port: u16,
    etcd_port: u16,
    service_account_admission: bool,
) -> anyhow::Result<ChildGuard> {
    let log = fs::File::create(dir.join("apiserver.log"))?;
    let key = dir.join("sa.key");
    let mut command = Command::new(paths::kube_apiserver());
    command
        .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .arg(format!("--secure-port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--cert-dir={}", dir.join("certs").display()))
        .arg(format!(
            "--token-auth-file={}",
            dir.join("tokens.csv").display()
        ))
        .arg("--authorization-mode=RBAC")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg(format!(
            "--service-account-key-file={}",
            dir.join("sa.pub").display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            key.display()
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg("--v=1");
    if !service_account_admission {
        // No controller-manager creates the `default` ServiceAccount, so pods could not be created.
        command.arg("--disable-admission-plugins=ServiceAccount");
    }
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut command);
    let child = command.spawn().context("spawning kube-apiserver")?;
    Ok(ChildGuard::new(
        child,
        Signal::SIGTERM,
        Duration::from_secs(10),
    ))
}

fn random_token() -> String {
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Creates namespace `name` (a bare one: no labels).
pub async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let namespace = k8s_openapi::api::core::v1::Namespace {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::all(client.clone())
        .create(&kube::api::PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}
