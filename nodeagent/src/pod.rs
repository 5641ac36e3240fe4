//! One pod run as local processes: init containers in order, then the containers, each in the
//! pod's network namespace and a mount namespace of its own (the image's files and the pod's
//! volumes bind-mounted at their paths), as the pod's user; probes, restarts and the status the
//! kubelet would report.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::images::ImageTable;
use crate::network::PodNetwork;

/// Where the `kubernetes` Service's ClusterIP leads inside every pod.
pub const KUBERNETES_SERVICE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 1);

/// Restarts wait this long at most (the kubelet's back-off, shortened for tests).
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The current time as the API's `Time` (RFC 3339, seconds, UTC).
pub fn now() -> String {
    format!(
        "{}Z",
        k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S")
    )
}

/// One container's process and what the status reports of it.
#[derive(Default)]
struct ContainerRun {
    child: Option<Child>,
    started_at: Option<String>,
    restart_count: i32,
    last_exit: Option<(i32, String, String)>,
    /// What the last run wrote to its `terminationMessagePath`.
    termination_message: Option<String>,
    started: bool,
    ready: bool,
    startup_failures: i32,
    liveness_failures: i32,
    readiness_failures: i32,
    /// When the next startup or readiness check is due (a period after the last one began).
    next_probe: Option<Instant>,
    /// When the next liveness check is due (liveness has a period of its own).
    next_liveness: Option<Instant>,
    /// The probe checks in flight, with the process they probe. A check runs for up to its
    /// timeout (a pod cut off from the network answers nothing); the agent goes on meanwhile,
    /// with its other pods and its Services, as the kubelet's probe workers run on their own.
    checks: Vec<(ProbeKind, u32, tokio::task::JoinHandle<CheckOutcome>)>,
    /// Why the last check of each kind failed (by `ProbeKind as usize`), while it fails.
    last_failure: [Option<String>; 3],
    restart_at: Option<Instant>,
    completed: bool,
}

/// The agent's own lines about a pod ([`PodRun::note`]) are a log beside the containers' under
/// this name: `crate::pod_log(dir, namespace, pod, AGENT_LOG)` reads them.
pub const AGENT_LOG: &str = "node-agent";

/// A probe check's outcome: passed, or why not.
type CheckOutcome = Result<(), String>;

/// Which of a container's probes a check is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

impl ContainerRun {
    /// Starts one probe check of the process `pid`, in its own task.
    fn start_check(
        &mut self,
        kind: ProbeKind,
        probe: &Probe,
        target: Target,
        container: &Container,
    ) {
        let (probe, container) = (probe.clone(), container.clone());
        let handle = tokio::spawn(async move { check(&probe, &target, &container).await });
        self.checks.push((kind, target.pid, handle));
    }

    /// Kills the container's process (a failed startup or liveness probe): the pod's restart
    /// policy then restarts it, as after any other exit.
    fn kill(&self) {
        if let Some(child) = self.child.as_ref() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        }
    }

    /// What a finished check means, as the kubelet counts it; what changed, in words, when the
    /// container started, became ready or unready, or was killed.
    fn apply(
        &mut self,
        kind: ProbeKind,
        outcome: CheckOutcome,
        container: &Container,
    ) -> Vec<String> {
        let probe = match kind {
            ProbeKind::Startup => container.startup_probe.as_ref(),
            ProbeKind::Readiness => container.readiness_probe.as_ref(),
            ProbeKind::Liveness => container.liveness_probe.as_ref(),
        };
        let threshold = probe.and_then(|p| p.failure_threshold).unwrap_or(3);
        let name = &container.name;
        let mut notes = Vec::new();
        // Why a check failed, said once per reason (a probe failing the same way every period
        // would fill the log), so that a pod that never gets ready says why.
        let last = &mut self.last_failure[kind as usize];
        match &outcome {
            Err(reason) if last.as_ref() != Some(reason) => {
                notes.push(format!("{name}: {kind:?} probe failed: {reason}"));
                *last = Some(reason.clone());
            }
            Err(_) => {}
            Ok(()) => *last = None,
        }
        let passed = outcome.is_ok();
        match kind {
            ProbeKind::Startup => {
                if passed {
                    // Started: the readiness and liveness probes take over at once.
                    self.started = true;
                    self.startup_failures = 0;
                    self.next_probe = None;
                    notes.push(format!("{name}: started (startup probe passed)"));
                    return notes;
                }
                self.startup_failures += 1;
                if self.startup_failures >= threshold {
                    // The kubelet kills a container that has not started within
                    // failureThreshold x periodSeconds; its restart policy decides the rest.
                    self.startup_failures = 0;
                    self.kill();
                    notes.push(format!(
                        "{name}: startup probe failed {threshold} times: killed"
                    ));
                }
            }
            ProbeKind::Readiness => {
                let was = self.ready;
                if passed {
                    self.ready = true;
                    self.readiness_failures = 0;
                } else {
                    self.readiness_failures += 1;
                    if self.readiness_failures >= threshold || !self.ready {
                        self.ready = false;
                    }
                }
                if was != self.ready {
                    notes.push(format!(
                        "{name}: {}",
                        if self.ready {
                            "ready (readiness probe passed)".to_string()
                        } else {
                            format!(
                                "not ready (readiness probe failed {} times)",
                                self.readiness_failures
                            )
                        }
                    ));
                }
            }
            ProbeKind::Liveness => {
                if passed {
                    self.liveness_failures = 0;
                } else {
                    self.liveness_failures += 1;
                    if self.liveness_failures >= threshold {
                        // The kubelet kills a container that fails its liveness probe.
                        self.liveness_failures = 0;
                        self.kill();
                        notes.push(format!(
                            "{name}: liveness probe failed {threshold} times: killed"
                        ));
                    }
                }
            }
        }
        notes
    }
}

/// A pod the agent runs.
pub struct PodRun {
    /// The pod's uid (a re-created pod of the same name is another `PodRun`).
    pub uid: String,
    pod: Pod,
    network: PodNetwork,
    dir: PathBuf,
    owner: (u32, u32),
    volumes: BTreeMap<String, PathBuf>,
    volumes_ready: bool,
    init: Vec<ContainerRun>,
    containers: Vec<ContainerRun>,
    start_time: String,
    terminating: Option<Instant>,
    forwarder: tokio::task::JoinHandle<()>,
    /// True while the pod is cut off ([`Self::set_partitioned`]); its API server forwarder
    /// reads it.
    partitioned: tokio::sync::watch::Sender<bool>,
    last_status: Value,
    /// The Services' lines of `/etc/hosts` ([`crate::services::ServiceTable::hosts_entries`]).
    service_hosts: String,
}

impl Drop for PodRun {
    fn drop(&mut self) {
        self.forwarder.abort();
        for run in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if let Some(mut child) = run.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl PodRun {
    /// Prepares a pod: its network namespace, folder and a forwarder from the `kubernetes`
    /// Service IP (inside the pod) to the API server.
    pub fn new(
        pod: Pod,
        network: PodNetwork,
        dir: PathBuf,
        owner: (u32, u32),
        api_port: u16,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("logs"))?;
        network.add_local_address(KUBERNETES_SERVICE_IP)?;
        let listener = network.listen(SocketAddr::from((KUBERNETES_SERVICE_IP, 443)))?;
        let (partitioned, cut) = tokio::sync::watch::channel(false);
        let forwarder = tokio::spawn(forward(
            listener,
            SocketAddr::from(([127, 0, 0, 1], api_port)),
            cut,
        ));
        let spec = pod.spec.clone().unwrap_or_default();
        let init = spec.init_containers.as_ref().map_or(0, Vec::len);
        let mut runs = Vec::new();
        runs.resize_with(init, ContainerRun::default);
        let mut containers = Vec::new();
        containers.resize_with(spec.containers.len(), ContainerRun::default);
        Ok(Self {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            pod,
            network,
            dir,
            owner,
            volumes: BTreeMap::new(),
            volumes_ready: false,
            init: runs,
            containers,
            start_time: now(),
            terminating: None,
            forwarder,
            partitioned,
            last_status: Value::Null,
            service_hosts: String::new(),
        })
    }

    /// Cuts the pod off from the network (`true`) or reconnects it: its packets are dropped
    /// (peers, Services and the agent's probes reach nothing) and its connections to the API
    /// server hang, as in a partition of the pod's node from the rest of the cluster; the
    /// agent itself, as a kubelet on the other side, still reports the pod's status.
    pub fn set_partitioned(&mut self, partitioned: bool) -> anyhow::Result<()> {
        if *self.partitioned.borrow() == partitioned {
            return Ok(());
        }
        self.network.set_connected(!partitioned)?;
        self.partitioned.send_replace(partitioned);
        Ok(())
    }

    /// The pod's IP.
    pub fn address(&self) -> IpAddr {
        IpAddr::V4(self.network.address())
    }

    fn name(&self) -> String {
        self.pod.metadata.name.clone().unwrap_or_default()
    }

    /// Takes the latest version of the pod object (its status fields feed the downward API).
    pub fn update(&mut self, mut pod: Pod) {
        // The downward API's status.podIP before the first status is posted.
        pod.status.get_or_insert_with(Default::default).pod_ip =
            Some(self.network.address().to_string());
        self.pod = pod;
    }

    /// Writes the pod's volumes (again: ConfigMaps and Secrets change).
    pub async fn refresh_volumes(
        &mut self,
        client: &kube::Client,
        ca: &Path,
    ) -> anyhow::Result<()> {
        self.volumes =
            crate::volumes::materialize(client, &self.pod, &self.dir, self.owner, ca).await?;
        self.volumes_ready = true;
        Ok(())
    }

    /// One step: start, probe, restart, and whether the status changed (then its JSON).
    pub async fn step(
        &mut self,
        client: &kube::Client,
        images: &ImageTable,
    ) -> anyhow::Result<Option<Value>> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".to_string());
        if self.terminating.is_none() && self.volumes_ready {
            // Init containers in order, each to completion.
            let init = spec.init_containers.clone().unwrap_or_default();
            let mut initialized = true;
            for (index, container) in init.iter().enumerate() {
                if self.init[index].completed {
                    continue;
                }
                initialized = false;
                self.reap(true, index, &policy, true);
                let run = &self.init[index];
                if run.child.is_none()
                    && !run.completed
                    && run.restart_at.is_none_or(|at| Instant::now() >= at)
                    && !(policy == "Never" && run.last_exit.is_some())
                {
                    let child = self.spawn(client, images, container).await?;
                    let run = &mut self.init[index];
                    run.child = Some(child);
                    run.started_at = Some(now());
                }
                break;
            }
            if initialized && self.terminating.is_none() {
                for (index, container) in spec.containers.iter().enumerate() {
                    self.reap(false, index, &policy, false);
                    let run = &self.containers[index];
                    if run.child.is_none()
                        && !run.completed
                        && run.restart_at.is_none_or(|at| Instant::now() >= at)
                    {
                        let child = self.spawn(client, images, container).await?;
                        let run = &mut self.containers[index];
                        run.child = Some(child);
                        run.started_at = Some(now());
                        run.started = false;
                        run.startup_failures = 0;
                        run.ready = false;
                        run.next_liveness = container.liveness_probe.as_ref().map(|p| {
                            Instant::now()
                                + Duration::from_secs(p.initial_delay_seconds.unwrap_or(0) as u64)
                        });
                        run.next_probe = Some(
                            Instant::now()
                                + Duration::from_secs(
                                    container
                                        .startup_probe
                                        .as_ref()
                                        .or(container.readiness_probe.as_ref())
                                        .and_then(|p| p.initial_delay_seconds)
                                        .unwrap_or(0) as u64,
                                ),
                        );
                    }
                }
                self.probe(&spec.containers).await;
            }
        }
        let status = self.status(&spec.containers, spec.init_containers.as_deref());
        // Written when it changes, and again when the API server's copy (read this pass) says
        // another phase or readiness: a write lost on the way is not lost for good, as the
        // kubelet's status manager re-syncs a pod whose stored status differs from its own.
        if status != self.last_status || self.stored_status_differs(&status) {
            self.last_status = status.clone();
            return Ok(Some(status));
        }
        Ok(None)
    }

    /// Whether the pod as last read from the API server has another phase or Ready condition
    /// than `status`.
    fn stored_status_differs(&self, status: &Value) -> bool {
        let stored = self.pod.status.as_ref();
        let stored_phase = stored.and_then(|s| s.phase.as_deref()).unwrap_or_default();
        let stored_ready = stored
            .and_then(|s| s.conditions.as_ref())
            .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
            .map_or("", |c| c.status.as_str());
        let ready = ready_condition(status).unwrap_or_default();
        status["phase"].as_str().unwrap_or_default() != stored_phase || ready != stored_ready
    }

    /// Collects an exited container and schedules its restart per the pod's policy.
    fn reap(&mut self, init: bool, index: usize, policy: &str, run_to_completion: bool) {
        let run = if init {
            &mut self.init[index]
        } else {
            &mut self.containers[index]
        };
        let Some(child) = run.child.as_mut() else {
            return;
        };
        let Ok(Some(status)) = child.try_wait() else {
            return;
        };
        run.child = None;
        let code = status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(9)
        });
        run.last_exit = Some((code, run.started_at.clone().unwrap_or_default(), now()));
        let spec = self.pod.spec.as_ref();
        let name = if init {
            spec.and_then(|spec| spec.init_containers.as_ref())
                .and_then(|containers| containers.get(index))
                .map(|container| container.name.clone())
        } else {
            spec.and_then(|spec| spec.containers.get(index))
                .map(|container| container.name.clone())
        };
        // As the kubelet: at most 4096 bytes of the file, into the terminated state.
        run.termination_message = name
            .and_then(|name| std::fs::read(self.dir.join("termination").join(name)).ok())
            .filter(|bytes| !bytes.is_empty())
            .map(|bytes| String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned());
        run.ready = false;
        run.started = false;
        let restart = match policy {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => !(run_to_completion && code == 0),
        };
        if run_to_completion && code == 0 {
            run.completed = true;
            return;
        }
        if restart {
            run.restart_count += 1;
            let backoff = Duration::from_secs(1 << run.restart_count.clamp(0, 4) as u32);
            run.restart_at = Some(Instant::now() + backoff.min(MAX_BACKOFF));
        } else {
            run.completed = true;
        }
    }

    async fn spawn(
        &self,
        client: &kube::Client,
        images: &ImageTable,
        container: &Container,
    ) -> anyhow::Result<Child> {
        let image_name = container.image.clone().unwrap_or_default();
        let image = images.resolve(&image_name).with_context(|| {
            format!(
                "image {image_name} of pod {} is not in the node agent's image table",
                self.name()
            )
        })?;
        let mut argv: Vec<String> = match &container.command {
            Some(command) if !command.is_empty() => command.clone(),
            _ => image.entrypoint.clone(),
        };
        argv.extend(container.args.clone().unwrap_or_default());
        if argv.is_empty() {
            bail!(
                "container {} has no command and its image no entrypoint",
                container.name
            );
        }
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOME".to_string(), "/tmp".to_string()),
            ("HOSTNAME".to_string(), self.name()),
            (
                "KUBERNETES_SERVICE_HOST".to_string(),
                KUBERNETES_SERVICE_IP.to_string(),
            ),
            ("KUBERNETES_SERVICE_PORT".to_string(), "443".to_string()),
        ];
        env.extend(crate::volumes::environment(client, &self.pod, container).await?);

        // The mount namespace: image files, then the volumes, then /etc/hosts.
        let mut mounts: Vec<(PathBuf, String, bool)> = Vec::new();
        let image_dir = self.dir.join("image").join(&container.name);
        let mut linked_dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (source, target) in &image.files {
            {
                // A folder of links replaces the target's parent (no empty file on the host, and
                // binaries keep their real path for $ORIGIN and relocatable installs).
                let parent = Path::new(target)
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "/".to_string());
                let folder = linked_dirs
                    .entry(parent.clone())
                    .or_insert_with(|| image_dir.join(parent.trim_start_matches('/')))
                    .clone();
                std::fs::create_dir_all(&folder)?;
                let link = folder.join(Path::new(target).file_name().unwrap_or_default());
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(source, &link)?;
            }
        }
        for (parent, folder) in linked_dirs {
            mounts.insert(0, (folder, parent, true));
        }
        for mount in container.volume_mounts.clone().unwrap_or_default() {
            let Some(folder) = self.volumes.get(&mount.name) else {
                bail!("volume {} of {} is not ready", mount.name, container.name);
            };
            let source = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => folder.join(sub),
                _ => folder.clone(),
            };
            mounts.push((
                source,
                mount.mount_path.clone(),
                mount.read_only == Some(true),
            ));
        }
        let hosts = self.write_hosts()?;
        mounts.push((hosts, "/etc/hosts".to_string(), true));
        // The termination message file, empty at each start (the kubelet's terminationMessagePath).
        if let Some(path) = container
            .termination_message_path
            .as_deref()
            .filter(|path| !path.is_empty())
        {
            let folder = self.dir.join("termination");
            std::fs::create_dir_all(&folder)?;
            let file = folder.join(&container.name);
            std::fs::write(&file, b"")?;
            crate::volumes::chown(&file, self.owner)?;
            mounts.push((file, path.to_string(), false));
        }

        // Parents before children; the pod's files must not live under a mount target (/tmp).
        mounts.sort_by_key(|(_, target, _)| Path::new(target).components().count());
        let mut script = String::from("set -e\n");
        for (source, target, read_only) in &mounts {
            let is_dir = source.is_dir();
            let (source, target) = (
                shell_quote(&source.display().to_string()),
                shell_quote(target),
            );
            let make = if is_dir {
                format!("mkdir -p {target}")
            } else {
                format!("[ -e {target} ] || {{ mkdir -p \"$(dirname {target})\"; : > {target}; }}")
            };
            script.push_str(&format!("{make}\nmount --bind {source} {target}\n"));
            if *read_only {
                script.push_str(&format!("mount -o remount,bind,ro {target}\n"));
            }
        }
        let (uid, gid) = self.owner;
        let working_dir = container
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".to_string());
        script.push_str(&format!(
            "cd {}\nexec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all -- \"$@\"\n",
            shell_quote(&working_dir)
        ));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(
            self.dir
                .join("logs")
                .join(format!("{}.log", container.name)),
        )?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.network.namespace()])
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .arg("sh")
            .args(&argv)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        testbed::process::die_with_parent(&mut command);
        command
            .spawn()
            .with_context(|| format!("starting container {} of {}", container.name, self.name()))
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> String {
        self.pod.metadata.namespace.clone().unwrap_or_default()
    }

    /// Writes the pod's `/etc/hosts`: itself, and the Services' names (cluster DNS's part).
    fn write_hosts(&self) -> anyhow::Result<PathBuf> {
        let hosts = self.dir.join("hosts");
        // In place (same inode): the file is bind-mounted into running containers.
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1\tlocalhost\n{}\t{}\n{}",
                self.network.address(),
                self.name(),
                self.service_hosts
            ),
        )?;
        Ok(hosts)
    }

    /// Sets the Services' `/etc/hosts` lines; rewrites the file when they changed.
    pub fn set_service_hosts(&mut self, entries: String) -> anyhow::Result<()> {
        if entries == self.service_hosts {
            return Ok(());
        }
        self.service_hosts = entries;
        if self.dir.join("hosts").exists() {
            self.write_hosts()?;
        }
        Ok(())
    }

    /// Collects the probe checks that have finished and starts those due: the startup probe
    /// until it passes, then readiness and liveness, each every period of its own (or when its
    /// last check ends, if that ran longer), as the kubelet's probe workers do.
    async fn probe(&mut self, containers: &[Container]) {
        let address = self.address();
        let owner = self.owner;
        let mut notes = Vec::new();
        for (index, container) in containers.iter().enumerate() {
            let run = &mut self.containers[index];
            let Some(pid) = run.child.as_ref().map(Child::id) else {
                continue;
            };
            let mut running = Vec::new();
            for (kind, probed, handle) in std::mem::take(&mut run.checks) {
                if probed != pid {
                    // A check of a process that has been restarted since counts no more.
                    handle.abort();
                } else if handle.is_finished() {
                    let outcome = handle
                        .await
                        .unwrap_or_else(|error| Err(format!("the check's task failed: {error}")));
                    notes.extend(run.apply(kind, outcome, container));
                } else {
                    running.push((kind, probed, handle));
                }
            }
            run.checks = running;
            let target = Target {
                address,
                pid,
                owner,
            };
            let now = Instant::now();
            let due = |run: &ContainerRun, kind: ProbeKind, at: Option<Instant>| {
                at.is_none_or(|at| now >= at) && !run.checks.iter().any(|(k, ..)| *k == kind)
            };
            if !run.started {
                match &container.startup_probe {
                    None => run.started = true,
                    Some(probe) => {
                        if due(run, ProbeKind::Startup, run.next_probe) {
                            run.start_check(ProbeKind::Startup, probe, target, container);
                            run.next_probe = Some(now + period(probe));
                        }
                        continue;
                    }
                }
            }
            match &container.readiness_probe {
                None => run.ready = true,
                Some(probe) => {
                    if due(run, ProbeKind::Readiness, run.next_probe) {
                        run.start_check(ProbeKind::Readiness, probe, target, container);
                        run.next_probe = Some(now + period(probe));
                    }
                }
            }
            if let Some(probe) = &container.liveness_probe
                && due(run, ProbeKind::Liveness, run.next_liveness)
            {
                run.start_check(ProbeKind::Liveness, probe, target, container);
                run.next_liveness = Some(now + period(probe));
            }
        }
        for note in notes {
            self.note(&note);
        }
    }

    /// Appends a line to the agent's own log of this pod ([`AGENT_LOG`], read by
    /// [`crate::pod_log`] as if it were a container's): what the agent
    /// saw and did (probe outcomes that changed something, statuses written or not), which a
    /// test's failure message shows beside the containers' logs.
    pub fn note(&self, text: &str) {
        append_line(
            &self.dir.join("logs").join(format!("{AGENT_LOG}.log")),
            text,
        );
    }

    /// Forgets the last status written, so that the next pass writes it again (the write failed).
    pub fn forget_status(&mut self) {
        self.last_status = Value::Null;
    }

    /// Starts the graceful stop (SIGTERM now, SIGKILL after the grace period); whether every
    /// process has exited.
    pub fn terminate(&mut self) -> bool {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .clamp(0, 60) as u64;
        let first = self.terminating.is_none();
        let deadline = *self
            .terminating
            .get_or_insert_with(|| Instant::now() + Duration::from_secs(grace));
        let mut alive = false;
        for run in self.init.iter_mut().chain(self.containers.iter_mut()) {
            let Some(child) = run.child.as_mut() else {
                continue;
            };
            if child.try_wait().ok().flatten().is_some() {
                run.child = None;
                continue;
            }
            alive = true;
            let pid = Pid::from_raw(child.id() as i32);
            if first {
                let _ = kill(pid, Signal::SIGTERM);
            } else if Instant::now() >= deadline {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        !alive
    }

    fn status(&self, containers: &[Container], init: Option<&[Container]>) -> Value {
        let statuses = |specs: &[Container], runs: &[ContainerRun]| -> Vec<Value> {
            specs
                .iter()
                .zip(runs)
                .map(|(container, run)| {
                    let state = match (&run.child, &run.last_exit) {
                        (Some(_), _) => {
                            json!({"running": {"startedAt": run.started_at}})
                        }
                        (None, Some((code, started, finished))) if run.completed || run.restart_at.is_none() => {
                            let mut terminated = json!({"exitCode": code, "reason": if *code == 0 {"Completed"} else {"Error"}, "startedAt": started, "finishedAt": finished});
                            if let Some(message) = &run.termination_message {
                                terminated["message"] = json!(message);
                            }
                            json!({ "terminated": terminated })
                        }
                        (None, Some(_)) => json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                        (None, None) => json!({"waiting": {"reason": "PodInitializing"}}),
                    };
                    let last = match &run.last_exit {
                        Some((code, started, finished)) if run.child.is_some() || run.restart_at.is_some() => {
                            json!({"terminated": {"exitCode": code, "reason": if *code == 0 {"Completed"} else {"Error"}, "startedAt": started, "finishedAt": finished}})
                        }
                        _ => json!({}),
                    };
                    json!({
                        "name": container.name,
                        "image": container.image,
                        "imageID": "",
                        "ready": run.ready && run.child.is_some(),
                        "started": run.child.is_some() && run.started,
                        "restartCount": run.restart_count,
                        "state": state,
                        "lastState": last,
                    })
                })
                .collect()
        };
        let init = init.unwrap_or_default();
        let initialized = self.init.iter().all(|run| run.completed);
        let ready = initialized
            && self.terminating.is_none()
            && self
                .containers
                .iter()
                .all(|run| run.ready && run.child.is_some());
        let all_done = !self.containers.is_empty()
            && self
                .containers
                .iter()
                .all(|run| run.completed && run.child.is_none());
        let phase = if all_done {
            if self.containers.iter().all(|run| {
                run.last_exit
                    .as_ref()
                    .is_some_and(|(code, _, _)| *code == 0)
            }) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if initialized && self.containers.iter().any(|run| run.child.is_some()) {
            "Running"
        } else {
            "Pending"
        };
        let condition = |kind: &str, value: bool| json!({"type": kind, "status": if value {"True"} else {"False"}, "lastTransitionTime": null});
        json!({
            "phase": phase,
            "podIP": self.network.address().to_string(),
            "podIPs": [{"ip": self.network.address().to_string()}],
            "startTime": self.start_time,
            "conditions": [
                condition("PodScheduled", true),
                condition("Initialized", initialized),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "initContainerStatuses": statuses(init, &self.init),
            "containerStatuses": statuses(containers, &self.containers),
        })
    }
}

/// The status of the Ready condition in a pod status the agent wrote (JSON), if it has one.
pub(crate) fn ready_condition(status: &Value) -> Option<&str> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|condition| condition["type"] == "Ready")?["status"]
        .as_str()
}

/// Appends `text` as a timestamped line to the log at `path` (the agent's own logs: losing a
/// line is better than stopping a pod over it).
pub(crate) fn append_line(path: &Path, text: &str) {
    use std::io::Write;
    let line = format!("{} {text}\n", now());
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
}

fn period(probe: &Probe) -> Duration {
    Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64)
}

fn port_of(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(number) => u16::try_from(*number).ok(),
        IntOrString::String(name) => container
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// What a probe runs against: the pod's address (httpGet, tcpSocket) and the container's process
/// (exec: the command runs in its network and mount namespaces, with its environment, as its
/// user, as `kubectl exec` would).
#[derive(Clone, Copy)]
struct Target {
    address: IpAddr,
    pid: u32,
    owner: (u32, u32),
}

/// Runs one probe (httpGet: 2xx/3xx; tcpSocket: connects; exec: exits 0, all within the probe's
/// timeout); why it failed otherwise.
async fn check(probe: &Probe, target: &Target, container: &Container) -> CheckOutcome {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let address = target.address;
    let late = || format!("no answer within {} s", timeout.as_secs());
    if let Some(exec) = &probe.exec {
        return run_exec(exec.command.as_deref().unwrap_or_default(), target, timeout).await;
    }
    if let Some(get) = &probe.http_get {
        let port = port_of(&get.port, container)
            .ok_or_else(|| format!("no port {:?} in the container", get.port))?;
        let path = get.path.clone().unwrap_or_else(|| "/".to_string());
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect((address, port))
                .await
                .map_err(|error| format!("connecting to {address}:{port}: {error}"))?;
            stream
                .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
                .await
                .map_err(|error| format!("sending GET {path}: {error}"))?;
            let mut head = [0u8; 12];
            stream
                .read_exact(&mut head)
                .await
                .map_err(|error| format!("reading the answer to GET {path}: {error}"))?;
            if head.starts_with(b"HTTP/1.") && matches!(head[9], b'2' | b'3') {
                Ok(())
            } else {
                Err(format!(
                    "GET {path} answered {:?}",
                    String::from_utf8_lossy(&head)
                ))
            }
        };
        return tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(late()));
    }
    if let Some(socket) = &probe.tcp_socket {
        let port = port_of(&socket.port, container)
            .ok_or_else(|| format!("no port {:?} in the container", socket.port))?;
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((address, port)))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("connecting to {address}:{port}: {error}")),
            Err(_) => Err(late()),
        };
    }
    // A probe with no handler is refused by the API server; nothing to run.
    Ok(())
}

/// An exec probe: `command` inside the container (its namespaces, environment and user); passes
/// when it exits 0 before `timeout` (then it is killed and counts as a failure, as the kubelet
/// does).
async fn run_exec(command: &[String], target: &Target, timeout: Duration) -> CheckOutcome {
    if command.is_empty() {
        return Err("an exec probe without a command".into());
    }
    // The container's own environment (what `kubectl exec` gives a command).
    let environment = std::fs::read(format!("/proc/{}/environ", target.pid)).unwrap_or_default();
    let (uid, gid) = target.owner;
    let mut process = tokio::process::Command::new("nsenter");
    process
        .arg(format!("--target={}", target.pid))
        .args(["--mount", "--net", "--wd=/", "--"])
        .args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .args(command)
        .env_clear()
        .envs(environment.split(|b| *b == 0).filter_map(|entry| {
            let text = std::str::from_utf8(entry).ok()?;
            text.split_once('=')
        }))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = process
        .spawn()
        .map_err(|error| format!("starting {command:?}: {error}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{command:?} ended with {status}")),
        Ok(Err(error)) => Err(format!("waiting for {command:?}: {error}")),
        Err(_) => Err(format!(
            "{command:?} did not end within {} s",
            timeout.as_secs()
        )),
    }
}

/// Forwards connections accepted on `listener` (inside a pod) to `target` (on the host).
async fn forward(
    listener: std::net::TcpListener,
    target: SocketAddr,
    partitioned: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    while let Ok((inbound, _)) = listener.accept().await {
        tokio::spawn(forward_one(inbound, target, partitioned.clone()));
    }
}

/// One connection from the pod to the API server. While the pod is partitioned it is a black
/// hole: nothing passes either way and the pod's side stays open, so a client waits on its own
/// timeouts as it would for dropped packets (a refused connection would tell it at once). It is
/// closed when the partition heals, as TCP gives up on a connection that long silent.
async fn forward_one(
    mut inbound: tokio::net::TcpStream,
    target: SocketAddr,
    mut partitioned: tokio::sync::watch::Receiver<bool>,
) {
    if !*partitioned.borrow_and_update() {
        let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
            _ = partitioned.wait_for(|cut| *cut) => {}
        }
    }
    let _ = partitioned.wait_for(|cut| !*cut).await;
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
