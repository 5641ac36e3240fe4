//! A Pooler in front of a test cluster, as the operator and kube-proxy would set it up: the
//! Pooler object and its auth Secret, the cluster's rw Service (a [`ServiceProxy`] following the
//! pod labelled `role=primary`), a real PgBouncer with the reconciler's pgbouncer.ini pointed at
//! it, and its Pod object (the instance managers find it to PAUSE and RESUME). [`Load`] runs
//! clients of short write transactions through it and counts their errors and longest wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use api::common::ClusterReference;
use api::contract;
use api::pooler::{PgBouncerSpec, PoolMode, Pooler, PoolerSpec, PoolerType};
use controllers::pooler::builders::{Target, auth_file_line, pgbouncer_ini};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use testbed::ApiServer;
use testbed::pgbouncer::PgBouncer;
use testbed::service_proxy::ServiceProxy;

use super::TestCluster;

/// Password of the pooler auth role in tests (quotes on purpose).
pub const AUTH_PASSWORD: &str = "pool'auth\"pw";
/// The application role of test clusters (support creates its Secret) and its database.
pub const APP_USER: &str = "app";
/// Its password.
pub const APP_PASSWORD: &str = "app-pass";
/// Clients of a [`Load`].
pub const CLIENTS: usize = 4;

/// The Pooler side of a test cluster.
pub struct PoolerBed {
    /// The Pooler object.
    pub pooler: Pooler,
    /// The cluster's rw Service.
    pub rw: ServiceProxy,
    /// PgBouncer, once [`PoolerBed::start`] ran.
    pub bouncer: Option<PgBouncer>,
}

impl PoolerBed {
    /// Before the cluster starts: CRDs, the auth Secret, the Pooler (transaction pooling,
    /// `pause_timeout_seconds`), and the rw Service. Returns the bed and the environment the
    /// cluster's instance managers need (`TestCluster::start_with`).
    pub async fn prepare(
        api: &ApiServer,
        cluster: &str,
        pause_timeout_seconds: i32,
    ) -> anyhow::Result<(Self, Vec<(String, String)>)> {
        api.install_crds(&api::all_crds()).await?;
        let client = api.client().await?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": contract::pooler_auth_secret(cluster)},
            "stringData": {"username": contract::POOLER_AUTH_USER, "password": AUTH_PASSWORD},
        }))?;
        secrets.create(&PostParams::default(), &secret).await?;
        let pooler = Pooler::new(
            &format!("{cluster}-pool"),
            PoolerSpec {
                cluster: ClusterReference {
                    name: cluster.into(),
                },
                type_: PoolerType::Rw,
                instances: 1,
                pgbouncer: PgBouncerSpec {
                    pool_mode: PoolMode::Transaction,
                    pause_timeout_seconds,
                    ..PgBouncerSpec::default()
                },
                resources: None,
                service: None,
            },
        );
        let poolers: Api<Pooler> = Api::namespaced(client.clone(), "default");
        let pooler = poolers.create(&PostParams::default(), &pooler).await?;
        let rw = ServiceProxy::start(
            client,
            "default",
            &format!(
                "{}={cluster},{}={}",
                contract::LABEL_CLUSTER,
                contract::LABEL_ROLE,
                contract::role::PRIMARY
            ),
            contract::PORT_NAME_POSTGRES,
        )
        .await?;
        let env = vec![
            (
                "RW_SERVICE_ADDRESS".to_string(),
                format!("127.0.0.1:{}", rw.port()),
            ),
            ("DECLARATIVE_RESYNC_SECONDS".to_string(), "1".to_string()),
        ];
        Ok((
            Self {
                pooler,
                rw,
                bouncer: None,
            },
            env,
        ))
    }

    /// Once `primary` is writable: the load table, the auth function (applied by the primary)
    /// awaited, PgBouncer started towards the rw Service and its Pod object created.
    pub async fn start(&mut self, cluster: &TestCluster, primary: usize) -> anyhow::Result<()> {
        let rw = self.rw.port();
        self.start_towards(cluster, primary, rw).await
    }

    /// As [`Self::start`], with PgBouncer's server connections going to `port` on 127.0.0.1
    /// (a benchmark points it at the primary itself: kube-proxy forwards in the kernel, the
    /// test bed's rw Service is a user-space proxy that would be measured too).
    pub async fn start_towards(
        &mut self,
        cluster: &TestCluster,
        primary: usize,
        port: u16,
    ) -> anyhow::Result<()> {
        let admin =
            super::connect_port_database(cluster.instances[primary].pg_port, APP_USER).await?;
        admin
            .batch_execute(&format!(
                "CREATE TABLE pooler_load (id int PRIMARY KEY, n bigint NOT NULL);
                 INSERT INTO pooler_load SELECT g, 0 FROM generate_series(1, {CLIENTS}) g;
                 GRANT ALL ON pooler_load TO {APP_USER};"
            ))
            .await?;
        super::eventually(
            "the pooler auth function exists in the app database",
            Duration::from_secs(30),
            || {
                let admin = &admin;
                async move {
                    admin
                        .query_opt(
                            "SELECT 1 FROM pg_proc WHERE proname = $1 AND prosecdef",
                            &[&contract::POOLER_AUTH_FUNCTION],
                        )
                        .await
                        .is_ok_and(|row| row.is_some())
                }
            },
        )
        .await?;
        let mut bouncer = PgBouncer::prepare()?;
        let target = Target {
            host: "127.0.0.1".into(),
            port,
            listen_addr: "127.0.0.1".into(),
            listen_port: bouncer.port(),
            auth_file: bouncer.auth_file().display().to_string(),
            unix_socket_dir: String::new(),
        };
        bouncer.start(
            &pgbouncer_ini(&self.pooler, &target),
            &auth_file_line(AUTH_PASSWORD),
        )?;
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
        let name = format!(
            "{}-1",
            self.pooler.metadata.name.clone().unwrap_or_default()
        );
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {
                contract::LABEL_POOLER: self.pooler.metadata.name.clone()}},
            "spec": {"containers": [{"name": "pgbouncer", "image": "pgbouncer:1.18",
                "ports": [{"name": contract::PORT_NAME_PGBOUNCER, "containerPort": bouncer.port()}]}]},
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}}),
            ),
        )
        .await?;
        self.bouncer = Some(bouncer);
        Ok(())
    }

    /// PgBouncer's port.
    pub fn port(&self) -> u16 {
        self.bouncer
            .as_ref()
            .map(PgBouncer::port)
            .unwrap_or_default()
    }

    /// PgBouncer's process id, once started.
    pub fn pid(&self) -> Option<u32> {
        self.bouncer.as_ref().and_then(PgBouncer::pid)
    }

    /// PgBouncer's log.
    pub fn log(&self) -> String {
        self.bouncer
            .as_ref()
            .map(PgBouncer::log)
            .unwrap_or_default()
    }
}

/// What load clients saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Transactions committed.
    pub committed: u64,
    /// Failed transactions and connection attempts.
    pub errors: u64,
    /// Longest time one transaction (or connection attempt) took.
    pub max_wait: Duration,
    /// The first error's message.
    pub first_error: Option<String>,
}

/// A connection through the pooler as the application role.
pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_USER)
        .connect_timeout(Duration::from_secs(30))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One short write transaction, in the simple protocol (PgBouncer 1.18 keeps no prepared
/// statement across transactions).
async fn bump(client: &tokio_postgres::Client, id: usize) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN; UPDATE pooler_load SET n = n + 1 WHERE id = {id}; COMMIT"
        ))
        .await
}

async fn client_loop(port: u16, id: usize, stop: Arc<AtomicBool>) -> Report {
    let mut report = Report::default();
    let mut client = None;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let outcome = match &client {
            Some(client) => bump(client, id).await,
            None => match connect(port).await {
                Ok(connected) => {
                    let outcome = bump(&connected, id).await;
                    client = Some(connected);
                    outcome
                }
                Err(error) => Err(error),
            },
        };
        report.max_wait = report.max_wait.max(started.elapsed());
        match outcome {
            Ok(()) => report.committed += 1,
            Err(error) => {
                report.errors += 1;
                report.first_error.get_or_insert_with(|| {
                    error
                        .as_db_error()
                        .map(|db| db.message().to_string())
                        .unwrap_or_else(|| error.to_string())
                });
                client = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report
}

/// [`CLIENTS`] clients looping on short transactions through the pooler.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Report>>,
}

impl Load {
    /// Starts the clients.
    pub fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (1..=CLIENTS)
            .map(|id| tokio::spawn(client_loop(port, id, stop.clone())))
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients and adds up what they saw.
    pub async fn finish(self) -> anyhow::Result<Report> {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Report::default();
        for client in self.clients {
            let report = client.await.context("load client")?;
            total.committed += report.committed;
            total.errors += report.errors;
            total.max_wait = total.max_wait.max(report.max_wait);
            if total.first_error.is_none() {
                total.first_error = report.first_error;
            }
        }
        Ok(total)
    }
}

/// The server port a connection through the pooler reaches, and whether it accepts writes.
pub async fn pooled_server(port: u16) -> anyhow::Result<(u16, bool)> {
    let client = connect(port).await?;
    let rows = client
        .simple_query("SELECT inet_server_port()::text, (NOT pg_is_in_recovery())::text")
        .await?;
    rows.iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                Some((row.get(0)?.parse().ok()?, row.get(1)? == "true"))
            }
            _ => None,
        })
        .context("a row")
}

/// Sets the pod phase of instance `index`, as the kubelet reports a dead (`Failed`) or
/// restarted (`Running`) container: the rw Service only routes to running pods.
pub async fn set_phase(cluster: &TestCluster, index: usize, phase: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    pods.patch_status(
        &cluster.instances[index].name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": phase}})),
    )
    .await?;
    Ok(())
}
