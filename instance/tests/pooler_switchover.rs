//! Switchover and failover under load through a real PgBouncer configured by the Pooler
//! reconciler's pgbouncer.ini: the instance managers PAUSE the cluster's Poolers before the
//! primary stops and RESUME them once the rw Service reaches the new writable primary, so a loop
//! of short transactions sees no error at a switchover; after a kill -9 of the primary the
//! clients' errors are counted and the pooler ends on the new primary.
//!
//! The rw Service is a [`ServiceProxy`] following the pod labelled `role=primary`, as
//! kube-proxy follows the Service's endpoints.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::common::ClusterReference;
use api::contract;
use api::pooler::{PgBouncerSpec, PoolMode, Pooler, PoolerSpec, PoolerType};
use controllers::pooler::builders::{Target, auth_file_line, pgbouncer_ini};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use support::{TestCluster, eventually};
use testbed::ApiServer;
use testbed::pgbouncer::PgBouncer;
use testbed::service_proxy::ServiceProxy;

const CLUSTER: &str = "pw";
const POOLER: &str = "pw-pool";
const AUTH_PASSWORD: &str = "pool'auth\"pw";
/// The application role of test clusters (support/mod.rs creates its Secret).
const APP_USER: &str = "app";
const APP_PASSWORD: &str = "app-pass";
const CLIENTS: usize = 4;

/// What one load client saw.
#[derive(Debug, Default, Clone)]
struct Report {
    committed: u64,
    errors: u64,
    max_wait: Duration,
    first_error: Option<String>,
}

impl Report {
    fn merge(reports: &[Report]) -> Report {
        Report {
            committed: reports.iter().map(|r| r.committed).sum(),
            errors: reports.iter().map(|r| r.errors).sum(),
            max_wait: reports.iter().map(|r| r.max_wait).max().unwrap_or_default(),
            first_error: reports.iter().find_map(|r| r.first_error.clone()),
        }
    }
}

async fn connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(APP_USER)
        .connect_timeout(Duration::from_secs(30))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Short write transactions through the pooler until `stop`; a failed transaction or connection
/// attempt is an error, and the client reconnects.
async fn client_loop(port: u16, id: i32, stop: Arc<AtomicBool>) -> Report {
    let mut report = Report::default();
    let mut client = None;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let outcome = match &client {
            Some(client) => bump(client, id).await,
            None => match connect(port, APP_USER, APP_PASSWORD).await {
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

async fn bump(client: &tokio_postgres::Client, id: i32) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN; UPDATE counter SET n = n + 1 WHERE id = {id}; COMMIT"
        ))
        .await
}

/// A running load of [`CLIENTS`] clients.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Report>>,
}

impl Load {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (1..=CLIENTS as i32)
            .map(|id| tokio::spawn(client_loop(port, id, stop.clone())))
            .collect();
        Self { stop, clients }
    }

    async fn finish(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut reports = Vec::new();
        for client in self.clients {
            reports.push(client.await.expect("load client"));
        }
        Report::merge(&reports)
    }
}

/// The server port a connection through the pooler reaches, and whether it is writable.
async fn pooled_server(port: u16) -> (String, String) {
    let client = connect(port, APP_USER, APP_PASSWORD).await.unwrap();
    let rows = client
        .simple_query("SELECT inet_server_port()::text, (NOT pg_is_in_recovery())::text")
        .await
        .unwrap();
    rows.iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some((
                row.get(0).unwrap().to_string(),
                row.get(1).unwrap().to_string(),
            )),
            _ => None,
        })
        .unwrap()
}

fn logs(cluster: &TestCluster, bouncer: &PgBouncer) -> String {
    format!(
        "{}\n===== pgbouncer =====\n{}",
        cluster.logs(),
        bouncer.log()
    )
}

async fn set_phase(client: &kube::Client, pod: &str, phase: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.patch_status(
        pod,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": phase}})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_through_the_pooler_has_no_client_errors_and_failover_ends_on_the_new_primary() {
    let api = Arc::new(ApiServer::start().await.unwrap());
    api.install_crds(&api::all_crds()).await.unwrap();
    let client = api.client().await.unwrap();
    // What the operator would have made for a Pooler of the cluster: its auth Secret and the
    // Pooler object (the instance managers read its pause timeout).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": contract::pooler_auth_secret(CLUSTER)},
        "stringData": {"username": contract::POOLER_AUTH_USER, "password": AUTH_PASSWORD},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let mut pooler = Pooler::new(
        POOLER,
        PoolerSpec {
            cluster: ClusterReference {
                name: CLUSTER.into(),
            },
            type_: PoolerType::Rw,
            instances: 1,
            pgbouncer: PgBouncerSpec {
                pool_mode: PoolMode::Transaction,
                pause_timeout_seconds: 15,
                ..PgBouncerSpec::default()
            },
            resources: None,
        },
    );
    let poolers: Api<Pooler> = Api::namespaced(client.clone(), "default");
    pooler = poolers
        .create(&PostParams::default(), &pooler)
        .await
        .unwrap();

    let rw = ServiceProxy::start(
        client.clone(),
        "default",
        &format!(
            "{}={CLUSTER},{}={}",
            contract::LABEL_CLUSTER,
            contract::LABEL_ROLE,
            contract::role::PRIMARY
        ),
        contract::PORT_NAME_POSTGRES,
    )
    .await
    .unwrap();
    let mut cluster = TestCluster::start_with(
        api.clone(),
        CLUSTER,
        2,
        0,
        vec![
            (
                "RW_SERVICE_ADDRESS".into(),
                format!("127.0.0.1:{}", rw.port()),
            ),
            ("DECLARATIVE_RESYNC_SECONDS".into(), "1".into()),
        ],
    )
    .await
    .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, Duration::from_secs(90))
        .await
        .unwrap();
    let admin = support::connect_port_database(cluster.instances[primary].pg_port, APP_USER)
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO counter SELECT g, 0 FROM generate_series(1, {CLIENTS}) g;
             GRANT ALL ON counter TO {APP_USER};"
        ))
        .await
        .unwrap();
    // The primary applies the auth role and its function in every database, app's included.
    eventually(
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
    .await
    .unwrap();

    // PgBouncer with the reconciler's configuration, pointed at the rw Service, and its pod.
    let mut bouncer = PgBouncer::prepare().unwrap();
    let target = Target {
        host: "127.0.0.1".into(),
        port: rw.port(),
        listen_addr: "127.0.0.1".into(),
        listen_port: bouncer.port(),
        auth_file: bouncer.auth_file().display().to_string(),
        unix_socket_dir: String::new(),
    };
    bouncer
        .start(
            &pgbouncer_ini(&pooler, &target),
            &auth_file_line(AUTH_PASSWORD),
        )
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{POOLER}-1"), "labels": {contract::LABEL_POOLER: POOLER}},
        "spec": {"containers": [{"name": "pgbouncer", "image": "pgbouncer:1.18",
            "ports": [{"name": contract::PORT_NAME_PGBOUNCER, "containerPort": bouncer.port()}]}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        &format!("{POOLER}-1"),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}})),
    )
    .await
    .unwrap();

    // Switchover under load.
    let load = Load::start(bouncer.port());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = cluster.instances[primary].name.clone();
    let replica = 1 - primary;
    cluster
        .annotate_lease(
            contract::ANNOTATION_SWITCHOVER_TO,
            &cluster.instances[replica].name,
        )
        .await
        .unwrap();
    let new_primary = cluster
        .wait_for_new_primary(&old, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(new_primary, replica);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let switchover = load.finish().await;
    println!(
        "switchover_client_errors={} switchover_client_max_wait_ms={} committed={}",
        switchover.errors,
        switchover.max_wait.as_millis(),
        switchover.committed
    );
    assert_eq!(
        switchover.errors,
        0,
        "first error: {:?}\n{}",
        switchover.first_error,
        logs(&cluster, &bouncer)
    );
    assert!(
        cluster.instances[primary].log().contains("pooler paused"),
        "{}",
        logs(&cluster, &bouncer)
    );
    let (port, writable) = pooled_server(bouncer.port()).await;
    assert_eq!(
        (port, writable.as_str()),
        (cluster.instances[new_primary].pg_port.to_string(), "true")
    );
    cluster
        .wait_for_role(primary, contract::role::REPLICA, Duration::from_secs(60))
        .await
        .unwrap();

    // Failover: kill -9 of the primary (PostgreSQL and its instance manager); the kubelet would
    // mark the pod not ready, which takes it out of the rw Service.
    let load = Load::start(bouncer.port());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = cluster.instances[new_primary].name.clone();
    let killed_at = Instant::now();
    cluster.kill_instance(new_primary);
    set_phase(&client, &killed, "Failed").await;
    let survivor = cluster
        .wait_for_new_primary(&killed, Duration::from_secs(60))
        .await
        .unwrap();
    let promoted_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failover = load.finish().await;
    println!(
        "failover_client_errors={} failover_client_max_wait_ms={} failover_promoted_after_ms={} first_error={:?}",
        failover.errors,
        failover.max_wait.as_millis(),
        promoted_after.as_millis(),
        failover.first_error
    );
    let (port, writable) = pooled_server(bouncer.port()).await;
    assert_eq!(
        (port, writable.as_str()),
        (cluster.instances[survivor].pg_port.to_string(), "true"),
        "{}",
        logs(&cluster, &bouncer)
    );
    assert!(failover.committed > 0);
    // No password in any log.
    let all = logs(&cluster, &bouncer);
    for secret in [AUTH_PASSWORD, APP_PASSWORD, support::SUPERUSER_PASSWORD] {
        assert!(!all.contains(secret), "a password reached a log");
    }
}
