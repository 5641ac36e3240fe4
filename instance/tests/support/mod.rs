//! A PostgreSQL cluster of `pg-instance` processes for one test: a real kube-apiserver, one Pod
//! object per instance (no kubelet: the test sets `status.podIP = 127.0.0.1`, and the pod's
//! container ports `postgresql` and `status` carry each instance's loopback ports), Secrets, and
//! one `pg-instance` OS process per instance (started as root with `--run-as-user pgtest`, or as
//! the current user when not root). Each instance reaches the API server through its own
//! [`TcpProxy`], so that a test can partition it.

#![allow(dead_code)]

pub mod backup;
pub mod ha;
pub mod pooler;
pub mod writer;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testbed::ApiServer;
use testbed::process::{ChildGuard, die_with_parent, unprivileged_ids};
use testbed::tcp_proxy::TcpProxy;

use api::contract;
use instance::status::InstanceStatus;

/// Password of the superuser in test clusters.
pub const SUPERUSER_PASSWORD: &str = "super'secret";

/// Lease settings of test clusters (the spec's defaults).
pub const LEASE_DURATION_SECONDS: u64 = 4;
/// Renew deadline of test clusters.
pub const RENEW_DEADLINE_SECONDS: u64 = 2;

/// One `pg-instance` and its files.
pub struct Instance {
    pub name: String,
    pub pg_port: u16,
    pub http_port: u16,
    pub dir: PathBuf,
    pub proxy: TcpProxy,
    kubeconfig: PathBuf,
    process: Option<ChildGuard>,
}

impl Instance {
    pub fn pgdata(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("pg-instance.log")
    }

    /// The file the instance includes as the operator's ConfigMap would be mounted.
    pub fn included_config(&self) -> PathBuf {
        self.dir.join("operator.conf")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Pid of the postmaster, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<i32> {
        fs::read_to_string(self.pgdata().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

/// A test cluster.
pub struct TestCluster {
    pub name: String,
    pub namespace: String,
    pub instances: Vec<Instance>,
    pub client: kube::Client,
    synchronous: u32,
    /// Extra environment of every `pg-instance` (backup repository, recovery source, keys).
    env: Vec<(String, String)>,
    /// Extra `pg-instance` flags of every instance.
    extra_args: Vec<String>,
    /// `bin/` of the PostgreSQL the instances run.
    pg_bin: PathBuf,
    /// CA certificate (PEM) of a cluster with TLS: test connections then use TLS, verified
    /// against it and the `-rw` Service name.
    pub tls_ca: Option<String>,
    // Dropped after the instances (their processes stop first).
    dir: tempfile::TempDir,
    pub api: std::sync::Arc<ApiServer>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for instance in &mut self.instances {
            if let Some(mut process) = instance.process.take() {
                process.stop();
            }
        }
        if std::thread::panicking() {
            for instance in &self.instances {
                eprintln!(
                    "===== log of {} =====\n{}",
                    instance.name,
                    tail(&instance.log(), 120)
                );
            }
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl TestCluster {
    /// API server, Secrets, `count` pods, and one running `pg-instance` per pod.
    pub async fn start(name: &str, count: usize, synchronous: u32) -> anyhow::Result<Self> {
        let api = std::sync::Arc::new(ApiServer::start().await?);
        Self::start_full(api, name, count, synchronous, Vec::new(), &[], None).await
    }

    /// As [`Self::start`], on an API server that may be shared with other test clusters, with
    /// extra environment for every `pg-instance`.
    pub async fn start_with(
        api: std::sync::Arc<ApiServer>,
        name: &str,
        count: usize,
        synchronous: u32,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        Self::start_full(api, name, count, synchronous, env, &[], None).await
    }

    /// As [`TestCluster::start`], with extra `pg-instance` flags for every instance.
    pub async fn start_with_args(
        name: &str,
        count: usize,
        synchronous: u32,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let api = std::sync::Arc::new(ApiServer::start().await?);
        Self::start_full(api, name, count, synchronous, Vec::new(), extra_args, None).await
    }

    /// As [`Self::start`], with TLS: the certificate Secrets as the operator mounts them in
    /// `tls_dir` (`server/`, `replication/`), and connections of the test verified against
    /// `ca_pem`.
    pub async fn start_with_tls(
        name: &str,
        count: usize,
        tls_dir: &std::path::Path,
        ca_pem: &str,
    ) -> anyhow::Result<Self> {
        let api = std::sync::Arc::new(ApiServer::start().await?);
        let env = vec![(
            contract::ENV_TLS_DIR.to_string(),
            tls_dir.display().to_string(),
        )];
        Self::start_full(api, name, count, 0, env, &[], Some(ca_pem)).await
    }

    /// The one way a test cluster starts: extra environment and flags for every `pg-instance`.
    async fn start_full(
        api: std::sync::Arc<ApiServer>,
        name: &str,
        count: usize,
        synchronous: u32,
        env: Vec<(String, String)>,
        extra_args: &[&str],
        tls_ca: Option<&str>,
    ) -> anyhow::Result<Self> {
        let client = api.client().await?;
        let namespace = "default".to_string();
        let dir = tempfile::Builder::new().prefix("pg-instance-").tempdir()?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        unprivileged_ids()?;

        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        for (secret, user, password) in [
            (
                contract::superuser_secret(name),
                "postgres",
                SUPERUSER_PASSWORD,
            ),
            (
                contract::replication_secret(name),
                contract::REPLICATION_USER,
                "repl-pass",
            ),
            (contract::app_secret(name), "app", "app-pass"),
        ] {
            let object: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": secret},
                "stringData": {"username": user, "password": password},
            }))?;
            secrets.create(&PostParams::default(), &object).await?;
        }

        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let mut instances = Vec::new();
        for index in 1..=count {
            let instance_name = format!("{name}-{index}");
            let pg_port = testbed::free_port();
            let http_port = testbed::free_port();
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": instance_name,
                    "labels": {
                        contract::LABEL_CLUSTER: name,
                        contract::LABEL_INSTANCE: instance_name,
                    },
                },
                "spec": {"containers": [{
                    "name": "postgres",
                    "image": "postgres:18",
                    "ports": [
                        {"name": contract::PORT_NAME_POSTGRES, "containerPort": pg_port},
                        {"name": contract::PORT_NAME_STATUS, "containerPort": http_port},
                    ],
                }]},
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
            let status = serde_json::json!({
                "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}
            });
            pods.patch_status(
                &instance_name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;

            let instance_dir = dir.path().join(&instance_name);
            fs::create_dir_all(&instance_dir)?;
            fs::set_permissions(&instance_dir, fs::Permissions::from_mode(0o755))?;
            let kubeconfig = instance_dir.join("kubeconfig");
            let proxy = api.proxied_kubeconfig(&kubeconfig)?;
            instances.push(Instance {
                name: instance_name,
                pg_port,
                http_port,
                dir: instance_dir,
                proxy,
                kubeconfig,
                process: None,
            });
        }
        let mut cluster = Self {
            name: name.to_string(),
            namespace,
            instances,
            client,
            synchronous,
            env,
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            tls_ca: tls_ca.map(str::to_string),
            // PostgreSQL with TLS needs a build with OpenSSL.
            pg_bin: if tls_ca.is_some() {
                testbed::paths::pg_bin_tls()
            } else {
                testbed::paths::pg_bin()
            },
            dir,
            api,
        };
        for index in 0..count {
            cluster.start_instance(index)?;
        }
        Ok(cluster)
    }

    /// Starts (or restarts) the `pg-instance` process of instance `index`.
    pub fn start_instance(&mut self, index: usize) -> anyhow::Result<()> {
        let synchronous = self.synchronous;
        let name = self.name.clone();
        let env = self.env.clone();
        let pg_bin = self.pg_bin.clone();
        let instance = &mut self.instances[index];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(instance.log_path())?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_pg-instance"));
        command
            .arg(format!("--pod-name={}", instance.name))
            .arg("--namespace=default")
            .arg(format!("--cluster={name}"))
            .arg(format!("--pgdata={}", instance.pgdata().display()))
            .arg(format!("--pg-bin={}", pg_bin.display()))
            // Two loopback addresses, so that a test can move a pod to the second one.
            .arg("--listen-address=127.0.0.1,127.0.0.2")
            .arg(format!("--port={}", instance.pg_port))
            .arg(format!("--http-address=127.0.0.1:{}", instance.http_port))
            .arg(format!("--kubeconfig={}", instance.kubeconfig.display()))
            .arg(format!(
                "--run-as-user={}",
                testbed::process::UNPRIVILEGED_USER
            ))
            .arg(format!("--lease-duration-seconds={LEASE_DURATION_SECONDS}"))
            .arg(format!("--renew-deadline-seconds={RENEW_DEADLINE_SECONDS}"))
            .arg(format!("--synchronous-standbys={synchronous}"))
            .arg("--postgres-setting=fsync=off")
            .arg("--postgres-setting=shared_buffers=16MB")
            .arg("--postgres-setting=max_connections=40")
            .arg(format!(
                "--postgres-setting=include_if_exists={}",
                instance.included_config().display()
            ))
            .arg("--log-level=info,instance=debug")
            .args(&self.extra_args)
            .env_remove("PGDATA")
            .env_remove("KUBECONFIG")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command.spawn().context("spawning pg-instance")?;
        instance.process = Some(ChildGuard::new(
            child,
            Signal::SIGTERM,
            Duration::from_secs(20),
        ));
        Ok(())
    }

    /// Stops the `pg-instance` of instance `index` with SIGTERM (a pod deletion) and waits.
    pub fn stop_instance(&mut self, index: usize) {
        if let Some(mut process) = self.instances[index].process.take() {
            process.stop();
        }
    }

    /// How the `pg-instance` of instance `index` exited, once it has.
    pub fn exit_status(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        self.instances[index].process.as_mut()?.try_wait()
    }

    /// Sends `signal` to the `pg-instance` process of instance `index` alone (its PostgreSQL
    /// and its fence process are other processes): SIGSTOP makes a hung instance manager,
    /// SIGCONT ends the hang.
    pub fn signal_manager(&self, index: usize, signal: Signal) {
        if let Some(process) = &self.instances[index].process {
            let _ = kill(Pid::from_raw(process.pid() as i32), signal);
        }
    }

    /// The fence process of instance `index`: the child of its `pg-instance` that runs the
    /// same program (a fork; a re-fork comes from a runtime thread, so every thread's
    /// children are read).
    pub fn fence_pid(&self, index: usize) -> Option<i32> {
        let manager = self.instances[index].process.as_ref()?.pid();
        let exe = std::fs::read_link(format!("/proc/{manager}/exe")).ok()?;
        let tasks = std::fs::read_dir(format!("/proc/{manager}/task")).ok()?;
        tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
            .flat_map(|children| {
                children
                    .split_whitespace()
                    .filter_map(|pid| pid.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .find(|child| {
                // Not by name: a fork from a runtime thread has that thread's name.
                std::fs::read_link(format!("/proc/{child}/exe")).ok() == Some(exe.clone())
            })
    }

    /// `kill -9` of the instance's postmaster and of its `pg-instance`.
    pub fn kill_instance(&mut self, index: usize) {
        let instance = &mut self.instances[index];
        if let Some(pid) = instance.postmaster_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut process) = instance.process.take() {
            process.kill_hard();
        }
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.instances
            .iter()
            .position(|instance| instance.name == name)
            .expect("instance exists")
    }

    /// Lease holder, as the API server says.
    pub async fn lease_holder(&self) -> anyhow::Result<Option<String>> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(leases
            .get_opt(&contract::lease_name(&self.name))
            .await?
            .and_then(|lease| lease.spec)
            .and_then(|spec| spec.holder_identity))
    }

    /// The `/status` of instance `index`.
    pub async fn status(&self, index: usize) -> Option<InstanceStatus> {
        instance::http::peer_status(
            "127.0.0.1",
            self.instances[index].http_port,
            Duration::from_secs(2),
        )
        .await
    }

    /// A raw HTTP GET on instance `index`: (status code, body), an error after 20 s.
    pub async fn http_get(&self, index: usize, path: &str) -> anyhow::Result<(u16, String)> {
        backup::http(self.instances[index].http_port, "GET", path).await
    }

    /// A connection to instance `index` as the superuser (TCP, SCRAM).
    pub async fn connect(&self, index: usize) -> anyhow::Result<tokio_postgres::Client> {
        match &self.tls_ca {
            None => connect_port(self.instances[index].pg_port).await,
            Some(ca) => {
                let name = format!(
                    "{}.{}.svc",
                    contract::rw_service(&self.name),
                    self.namespace
                );
                let tls = testbed::pg_tls::VerifyFull::new(ca, &name)?;
                connect_port_tls(self.instances[index].pg_port, tls).await
            }
        }
    }

    /// Pod labels and annotations of instance `index`.
    pub async fn pod_metadata(
        &self,
        index: usize,
    ) -> anyhow::Result<(BTreeMap<String, String>, BTreeMap<String, String>)> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods.get(&self.instances[index].name).await?;
        Ok((
            pod.metadata.labels.unwrap_or_default(),
            pod.metadata.annotations.unwrap_or_default(),
        ))
    }

    /// Sets (`Some`) or removes (`None`) an annotation on the pod of instance `index`.
    pub async fn annotate_pod(
        &self,
        index: usize,
        key: &str,
        value: Option<&str>,
    ) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        pods.patch(
            &self.instances[index].name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }

    /// Sets `status.podIP` of instance `index` (its pod came back with another IP).
    pub async fn set_pod_ip(&self, index: usize, ip: &str) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let status = serde_json::json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
        pods.patch_status(
            &self.instances[index].name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
        Ok(())
    }

    /// Sets an annotation on the cluster's Lease (as the operator does for a switchover).
    pub async fn annotate_lease(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        leases
            .patch(
                &contract::lease_name(&self.name),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(())
    }

    /// Waits until one instance is primary (holds the Lease and accepts writes) and `replicas`
    /// others stream from it; returns the primary's index.
    pub async fn wait_for_primary_with_replicas(
        &self,
        replicas: usize,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(holder)) = self.lease_holder().await {
                let index = self.index_of(&holder);
                if let Ok(client) = self.connect(index).await
                    && let Ok(row) = client
                        .query_one(
                            "SELECT NOT pg_is_in_recovery(), (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND application_name <> 'pg_basebackup')",
                            &[],
                        )
                        .await
                {
                    let writable: bool = row.get(0);
                    let streaming: i64 = row.get(1);
                    if writable && streaming as usize >= replicas {
                        for other in (0..self.instances.len()).filter(|other| *other != index) {
                            self.wait_for_role(other, contract::role::REPLICA, timeout).await?;
                        }
                        return Ok(index);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no primary with {replicas} streaming replicas after {timeout:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until an instance other than `old` holds the Lease and accepts a write.
    pub async fn wait_for_new_primary(
        &self,
        old: &str,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(holder)) = self.lease_holder().await
                && holder != old
            {
                let index = self.index_of(&holder);
                if let Ok(client) = self.connect(index).await
                    && let Ok(Ok(())) = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.batch_execute(
                            "CREATE TABLE IF NOT EXISTS probe (x int); INSERT INTO probe VALUES (1)",
                        ),
                    )
                    .await
                {
                    return Ok(index);
                }
            }
            if Instant::now() > deadline {
                bail!("no new primary after {timeout:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until instance `index` reports `role` and, for a replica, streams.
    pub async fn wait_for_role(
        &self,
        index: usize,
        role: &str,
        timeout: Duration,
    ) -> anyhow::Result<InstanceStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status(index).await
                && status.role == role
                && (role != contract::role::REPLICA || (status.streaming && status.postgres_ready))
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} is not {role} after {timeout:?}: {:?}\n{}",
                    self.instances[index].name,
                    self.status(index).await,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of every instance's log.
    pub fn logs(&self) -> String {
        self.instances
            .iter()
            .map(|instance| {
                format!(
                    "===== {} =====\n{}\n",
                    instance.name,
                    tail(&instance.log(), 60)
                )
            })
            .collect()
    }
}

/// A connection to 127.0.0.1:`port` as the superuser.
pub async fn connect_port(port: u16) -> anyhow::Result<tokio_postgres::Client> {
    connect_port_database(port, "postgres").await
}

/// A connection to `database` on 127.0.0.1:`port` as the superuser.
pub async fn connect_port_database(
    port: u16,
    database: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(SUPERUSER_PASSWORD)
        .dbname(database)
        .connect_timeout(Duration::from_secs(2));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A TLS connection to 127.0.0.1:`port` as the superuser, verified by `tls`.
pub async fn connect_port_tls(
    port: u16,
    tls: testbed::pg_tls::VerifyFull,
) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(2));
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Polls `check` until it returns true.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not true after {timeout:?}")
}
