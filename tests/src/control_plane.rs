//! A whole local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager (the
//! real StatefulSet, Deployment/ReplicaSet, Job, garbage-collector, namespace, EndpointSlice,
//! PVC-protection, ServiceAccount... controllers) and kube-scheduler, on loopback, each component
//! with its own identity and kubeconfig. Pods are run by a node agent (not here).
//!
//! [`ControlPlane::shared`] gives one control plane per test binary, stopped when it exits.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api;
use nix::sys::signal::Signal;

use crate::apiserver::{ApiServer, ApiServerOptions};
use crate::paths;
use crate::process::{ChildGuard, die_with_parent};

/// User the controller-manager authenticates as (bound by the bootstrap RBAC policy).
const CONTROLLER_MANAGER_USER: &str = "system:kube-controller-manager";
/// User the scheduler authenticates as (bound by the bootstrap RBAC policy).
const SCHEDULER_USER: &str = "system:kube-scheduler";

/// The processes, stopped together (controllers first, then the API server and etcd).
struct Processes {
    controller_manager: ChildGuard,
    scheduler: ChildGuard,
    api: ApiServer,
}

/// etcd + kube-apiserver + kube-controller-manager + kube-scheduler owned by a test (binary).
pub struct ControlPlane {
    processes: Mutex<Option<Processes>>,
    url: String,
    port: u16,
    kubeconfig: PathBuf,
    serving_ca: PathBuf,
    dir: PathBuf,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .finish()
    }
}

impl ControlPlane {
    /// Starts the four components and waits until the controllers work (the ServiceAccount
    /// controller has created `default/default`).
    pub async fn start() -> anyhow::Result<Self> {
        for binary in [paths::kube_controller_manager(), paths::kube_scheduler()] {
            if !binary.exists() {
                bail!(
                    "{} not found (run `cargo xtask setup`, or set KUBE_CONTROLLER_MANAGER / KUBE_SCHEDULER)",
                    binary.display()
                );
            }
        }
        let api = ApiServer::start_with(ApiServerOptions {
            users: vec![
                (CONTROLLER_MANAGER_USER.to_string(), Vec::new()),
                (SCHEDULER_USER.to_string(), Vec::new()),
            ],
            service_account_admission: true,
        })
        .await?;
        let controller_manager = spawn_controller_manager(&api)?;
        let scheduler = spawn_scheduler(&api)?;
        let plane = Self {
            url: api.url(),
            port: api.port(),
            kubeconfig: api.kubeconfig_path(),
            serving_ca: api.serving_ca_path(),
            dir: api.dir().to_path_buf(),
            processes: Mutex::new(Some(Processes {
                controller_manager,
                scheduler,
                api,
            })),
        };
        plane.wait_controllers().await?;
        Ok(plane)
    }

    /// The control plane of this test binary: started on first use (on a thread of its own, so
    /// that its processes outlive the test that started it) and stopped when the binary exits.
    pub fn shared() -> anyhow::Result<&'static ControlPlane> {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        let result = SHARED.get_or_init(|| {
            let (sender, receiver) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("control-plane".to_string())
                .spawn(move || {
                    // The children die with this thread (PR_SET_PDEATHSIG): it lives as long as
                    // the process.
                    let started = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(anyhow::Error::from)
                        .and_then(|runtime| runtime.block_on(ControlPlane::start()));
                    let _ = sender.send(started.map_err(|error| format!("{error:#}")));
                    loop {
                        std::thread::park();
                    }
                });
            if let Err(error) = spawned {
                return Err(format!("spawning the control-plane thread: {error}"));
            }
            let started = receiver
                .recv()
                .unwrap_or_else(|_| Err("the control-plane thread died".to_string()));
            if started.is_ok() {
                // SAFETY: registers a plain `extern "C" fn` with no captured state.
                unsafe { libc::atexit(stop_shared) };
            }
            started
        });
        match result {
            Ok(plane) => Ok(plane),
            Err(error) => bail!("starting the shared control plane: {error}"),
        }
    }

    /// HTTPS URL of the API server.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Port of the API server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Admin kubeconfig (static token, TLS verification off).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's serving certificate chain, what pods see as their `ca.crt`.
    pub fn serving_ca_path(&self) -> &Path {
        &self.serving_ca
    }

    /// Folder of the components' logs and kubeconfigs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new admin client, bound to the calling runtime.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let text = fs::read_to_string(&self.kubeconfig)?;
        let kubeconfig: kube::config::Kubeconfig = serde_yaml::from_str(&text)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Last lines of a component's log: `apiserver`, `controller-manager`, `scheduler` or `etcd`.
    pub fn log_tail(&self, component: &str) -> String {
        crate::apiserver::tail(&self.dir.join(format!("{component}.log")))
    }

    /// Stops every component now (drop does the same).
    pub fn stop(&self) {
        let processes = self
            .processes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(processes);
    }

    async fn wait_controllers(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if accounts.get_opt("default").await?.is_some() {
                return Ok(());
            }
            if let Some(processes) = self.processes.lock().expect("lock").as_mut()
                && let Some(status) = processes.controller_manager.try_wait()
            {
                bail!(
                    "kube-controller-manager exited ({status}); log:\n{}",
                    self.log_tail("controller-manager")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not create the default ServiceAccount in 90 s; log:\n{}",
                    self.log_tail("controller-manager")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

extern "C" fn stop_shared() {
    if let Ok(plane) = ControlPlane::shared() {
        plane.stop();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // The controllers first, so that they do not log the API server's shutdown as errors.
        self.controller_manager.stop();
        self.scheduler.stop();
        self.api.stop_apiserver();
    }
}

fn spawn_controller_manager(api: &ApiServer) -> anyhow::Result<ChildGuard> {
    let dir = api.dir();
    let kubeconfig = api.write_user_kubeconfig(CONTROLLER_MANAGER_USER)?;
    let log = fs::File::create(dir.join("controller-manager.log"))?;
    let mut command = Command::new(paths::kube_controller_manager());
    command
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={}", crate::free_port()))
        .arg(format!(
            "--cert-dir={}",
            dir.join("controller-manager-certs").display()
        ))
        .arg("--leader-elect=false")
        // Each controller with its own ServiceAccount and RBAC role, as in a real cluster.
        .arg("--use-service-account-credentials=true")
        .arg(format!(
            "--service-account-private-key-file={}",
            api.service_account_key_path().display()
        ))
        .arg(format!(
            "--root-ca-file={}",
            api.serving_ca_path().display()
        ))
        .arg("--cluster-name=testbed")
        // Every default controller: statefulset, deployment, replicaset, job, garbagecollector,
        // namespace, endpointslice, pvc-protection, persistentvolume-binder, serviceaccount...
        .arg("--controllers=*")
        .arg("--v=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut command);
    let child = command
        .spawn()
        .context("spawning kube-controller-manager")?;
    Ok(ChildGuard::new(
        child,
        Signal::SIGTERM,
        Duration::from_secs(5),
    ))
}

fn spawn_scheduler(api: &ApiServer) -> anyhow::Result<ChildGuard> {
    let dir = api.dir();
    let kubeconfig = api.write_user_kubeconfig(SCHEDULER_USER)?;
    let log = fs::File::create(dir.join("scheduler.log"))?;
    let mut command = Command::new(paths::kube_scheduler());
    command
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!(
            "--authentication-kubeconfig={}",
            kubeconfig.display()
        ))
        .arg(format!(
            "--authorization-kubeconfig={}",
            kubeconfig.display()
        ))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={}", crate::free_port()))
        .arg(format!(
            "--cert-dir={}",
            dir.join("scheduler-certs").display()
        ))
        .arg("--leader-elect=false")
        .arg("--v=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut command);
    let child = command.spawn().context("spawning kube-scheduler")?;
    Ok(ChildGuard::new(
        child,
        Signal::SIGTERM,
        Duration::from_secs(5),
    ))
}
