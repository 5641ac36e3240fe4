//! End to end, what users and their applications touch, under the real controllers and the
//! node agent with the operator installed by helm (see `common`): a declarative database and
//! user applied by the primary's instance manager, whose generated Secret works with the real
//! psql through the `-rw` Service, and a Pooler of that cluster whose PgBouncer pod serves
//! PgBouncer's metrics from its second container; and the `kubectl pg` plugin (status,
//! switchover) against the same stack, with clients writing through a Pooler (over TLS,
//! `verify-full` to the Pooler's name) during the switchover: no client error, only a short
//! wait, and every acknowledged row there afterwards. Scenarios run in parallel in their own
//! namespaces.
//!
//! Needs the workspace's `postgres-operator`, `pg-instance` and `kubectl-pg` binaries next to
//! this test's target folder (`cargo build -p controllers -p instance -p kubectl-pg`; `cargo
//! xtask test` builds them).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{calm_failover, create_cluster, eventually, secret_value, stack, workspace_binary};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use testbed::paths;

#[tokio::test(flavor = "multi_thread")]
async fn declarative_database_and_user_serve_psql_through_the_rw_service() -> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-declarative";
    let clusters = create_cluster(
        &client,
        namespace,
        "app",
        json!({"instances": 1, "failover": calm_failover()}),
    )
    .await?;
    let objects = [
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresUser",
               "metadata": {"name": "inventory", "namespace": namespace},
               "spec": {"cluster": {"name": "app"}, "roleName": "inventory",
                        "attributes": {"login": true},
                        "password": {"secretName": "inventory-credentials", "generate": true,
                                     "database": "inventory"}}}),
        json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresDatabase",
               "metadata": {"name": "inventory", "namespace": namespace},
               "spec": {"cluster": {"name": "app"}, "name": "inventory", "owner": "inventory",
                        "schemas": [{"name": "stock"}]}}),
    ];
    for object in &objects {
        testbed::manifests::apply(&client, object, namespace).await?;
    }
    e2e.wait_healthy(&clusters, "app", None, Duration::from_secs(180))
        .await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("app"))?;

    // The generated Secret, used as an application would: user, password and database from it,
    // the -rw Service's local port standing in for its host's address; TLS verify-full against
    // the cluster's CA Secret and the Secret's host name (libpq built with OpenSSL).
    let psql = paths::pg_bin_tls().join("psql");
    let ca_dir = tempfile::tempdir()?;
    let ca_file = ca_dir.path().join("ca.crt");
    let ca_pem = secret_value(
        &client,
        namespace,
        &api::contract::tls_ca_secret("app"),
        api::contract::tls_keys::CA,
    )
    .await?;
    std::fs::write(&ca_file, ca_pem)?;
    let output = eventually(
        "psql with the generated Secret through -rw",
        Duration::from_secs(120),
        || async {
            let username = secret_value(&client, namespace, "inventory-credentials", "username").await?;
            let password = secret_value(&client, namespace, "inventory-credentials", "password").await?;
            let dbname = secret_value(&client, namespace, "inventory-credentials", "dbname").await?;
            let host = secret_value(&client, namespace, "inventory-credentials", "host").await?;
            let output = Command::new(&psql)
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg(concat!(
                    "CREATE TABLE stock.items (id int PRIMARY KEY); INSERT INTO stock.items VALUES (1); ",
                    "SELECT current_user, current_database(), ",
                    "(SELECT tableowner FROM pg_tables WHERE tablename = 'items'), ",
                    "(SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database())"
                ))
                .arg(format!(
                    "host={host} hostaddr=127.0.0.1 port={rw} user={username} dbname={dbname} \
                     connect_timeout=5 sslmode=verify-full sslrootcert={}",
                    ca_file.display()
                ))
                .env("PGPASSWORD", password)
                .output()?;
            let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            Ok(if output.status.success() {
                Ok((stdout, host))
            } else {
                Err(stderr)
            })
        },
    )
    .await?;
    let (stdout, host) = output;
    assert_eq!(
        stdout.lines().last(),
        Some("inventory|inventory|inventory|inventory"),
        "psql ran as the declared user in the declared database it owns: {stdout}"
    );
    assert_eq!(
        host,
        format!("{}.{namespace}.svc", api::contract::rw_service("app"))
    );

    // A Pooler of the cluster: its PgBouncer pod runs the metrics exporter (the instance
    // manager's image) beside PgBouncer, both ready, and the exporter reads PgBouncer's admin
    // console on the pod's `metrics` port, as the Pooler's PodMonitor would scrape it.
    let pooler = json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "Pooler",
                        "metadata": {"name": "app-pool", "namespace": namespace},
                        "spec": {"cluster": {"name": "app"}, "type": "rw", "instances": 1}});
    testbed::manifests::apply(&client, &pooler, namespace).await?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let selector = format!("{}=app-pool", api::contract::LABEL_POOLER);
    let metrics = eventually(
        "the Pooler pod's exporter serves pgbouncer_up 1",
        Duration::from_secs(120),
        || async {
            let list = pods
                .list(&kube::api::ListParams::default().labels(&selector))
                .await?;
            let Some(pod) = list.items.first() else {
                return Ok(Err("no Pooler pod yet".to_string()));
            };
            let status = pod.status.clone().unwrap_or_default();
            let ready: Vec<String> = status
                .container_statuses
                .unwrap_or_default()
                .iter()
                .filter(|container| container.ready)
                .map(|container| container.name.clone())
                .collect();
            if ready.len() < 2 {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let log = nodeagent::pod_log(&e2e.agent_dir(), namespace, &name, "pgbouncer");
                return Ok(Err(format!(
                    "ready containers: {ready:?}; pgbouncer's log:\n{}",
                    common::tail(&log, 20)
                )));
            }
            let Some(ip) = status.pod_ip.and_then(|ip| ip.parse().ok()) else {
                return Ok(Err("no pod IP yet".to_string()));
            };
            let address = std::net::SocketAddr::new(ip, api::contract::POOLER_METRICS_PORT);
            let (code, body) = testbed::pooler_exporter::get_at(address, "/metrics")?;
            Ok(
                match testbed::pooler_exporter::sample(&body, "pgbouncer_up", &[]) {
                    Some(up) if code == 200 && up == 1.0 => Ok(body),
                    _ => Err(format!("/metrics answered {code}: {body}")),
                },
            )
        },
    )
    .await?;
    assert!(
        testbed::pooler_exporter::sample(&metrics, "pgbouncer_config_max_client_connections", &[])
            .is_some_and(|value| value > 0.0),
        "{metrics}"
    );
    // The exporter reports the certificate PgBouncer presented to it (the Pooler's, from the
    // operator's CA) and the CA it trusts: the PostgresCertificateExpiresSoon alert reads them.
    let pooler_certificate = secret_value(
        &client,
        namespace,
        &controllers::tls::pooler::certificate_secret("app-pool"),
        api::contract::tls_keys::CERTIFICATE,
    )
    .await?;
    let cluster_ca = std::fs::read_to_string(&ca_file)?;
    for (certificate, pem) in [("server", &pooler_certificate), ("ca", &cluster_ca)] {
        assert_eq!(
            testbed::pooler_exporter::sample(
                &metrics,
                "pg_pooler_certificate_not_after_timestamp_seconds",
                &[("certificate", certificate)]
            ),
            Some(common::not_after(pem)? as f64),
            "{certificate}: {metrics}"
        );
    }

    // The declared user's queries through the Pooler's Service show in the exporter's figures
    // for its database and pool.
    let pooled = e2e.service_port_of(namespace, "app-pool", api::contract::POSTGRES_PORT)?;
    let username = secret_value(&client, namespace, "inventory-credentials", "username").await?;
    let password = secret_value(&client, namespace, "inventory-credentials", "password").await?;
    eventually(
        "psql through the Pooler",
        Duration::from_secs(60),
        || async {
            let output = Command::new(&psql)
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg("SELECT count(*) FROM stock.items")
                // TLS to PgBouncer as an application does it: verify-full against the
                // cluster's CA and the Pooler's Service name (its own certificate).
                .arg(format!(
                    "host=app-pool.{namespace}.svc hostaddr=127.0.0.1 port={pooled} user={username} dbname=inventory connect_timeout=5 sslmode=verify-full sslrootcert={}",
                    ca_file.display()
                ))
                .env("PGPASSWORD", &password)
                .output()?;
            Ok(if output.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
            })
        },
    )
    .await?;
    let address = std::net::SocketAddr::new(
        pods.list(&kube::api::ListParams::default().labels(&selector))
            .await?
            .items
            .first()
            .and_then(|pod| pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("the Pooler pod has no IP"))?,
        api::contract::POOLER_METRICS_PORT,
    );
    let (_, metrics) = testbed::pooler_exporter::get_at(address, "/metrics")?;
    let inventory = [("database", "inventory")];
    assert!(
        testbed::pooler_exporter::sample(
            &metrics,
            "pgbouncer_stats_queries_pooled_total",
            &inventory
        )
        .is_some_and(|value| value >= 1.0),
        "{metrics}"
    );
    assert!(
        testbed::pooler_exporter::sample(
            &metrics,
            "pgbouncer_pools_server_idle_connections",
            &[("database", "inventory"), ("user", "inventory")]
        )
        .is_some(),
        "{metrics}"
    );

    // A Pooler whose pod the scheduler cannot place says why in its Ready condition.
    let big = json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "Pooler",
                     "metadata": {"name": "big-pool", "namespace": namespace},
                     "spec": {"cluster": {"name": "app"}, "type": "rw", "instances": 1,
                              "resources": {"requests": {"cpu": "64"}}}});
    testbed::manifests::apply(&client, &big, namespace).await?;
    let poolers: kube::Api<api::Pooler> = kube::Api::namespaced(client.clone(), namespace);
    let message =
        common::ready_message_containing(&poolers, "big-pool", "Insufficient cpu", |pooler| {
            pooler.status.unwrap_or_default().conditions
        })
        .await?;
    assert!(
        message.starts_with("0 of 1 PgBouncer pods ready; big-pool-")
            && message.contains(": not scheduled: "),
        "{message}"
    );
    Ok(())
}

/// Runs `kubectl-pg` against the test's control plane; (exit success, stdout, stderr).
fn kubectl_pg(
    e2e: &common::E2e,
    namespace: &str,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    let output = Command::new(workspace_binary("kubectl-pg")?)
        .arg("--kubeconfig")
        .arg(e2e.plane.kubeconfig_path())
        .args(["-n", namespace])
        .args(args)
        .output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// What writers through the Pooler saw: the acknowledged ids, the errors (with the last
/// message), and the longest time one INSERT took (a paused pooler holds it).
struct PooledWrites {
    acknowledged: Vec<i64>,
    errors: u64,
    last_error: Option<String>,
    max_wait: Duration,
}

/// `writers` clients inserting increasing ids into `pooled_acks` through the Pooler's local
/// port, each on one connection (reconnecting after an error, which is counted), until `stop`.
fn start_pooled_writers(
    writers: i64,
    port: u16,
    login: &common::Login,
    user: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<PooledWrites>> {
    (0..writers)
        .map(|writer| {
            let (login, user, stop) = (login.clone(), user.to_string(), stop.clone());
            tokio::spawn(async move {
                let mut seen = PooledWrites {
                    acknowledged: Vec::new(),
                    errors: 0,
                    last_error: None,
                    max_wait: Duration::ZERO,
                };
                let mut client = None;
                let mut next = (writer + 1) * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if client.is_none() {
                        match common::connect_as(port, &user, &login, "app").await {
                            Ok(connected) => client = Some(connected),
                            Err(error) => {
                                seen.errors += 1;
                                seen.last_error = Some(format!("connect: {error:#}"));
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        }
                    }
                    let started = std::time::Instant::now();
                    let result = client
                        .as_ref()
                        .expect("connected")
                        // Unnamed statements, one round trip each: a named prepared statement
                        // does not survive transaction pooling (PgBouncer 1.18 cannot pool
                        // them), whatever the switchover does.
                        .query_typed(
                            "INSERT INTO pooled_acks (id) VALUES ($1)",
                            &[(&next, tokio_postgres::types::Type::INT8)],
                        )
                        .await;
                    match result {
                        Ok(_) => {
                            seen.acknowledged.push(next);
                            seen.max_wait = seen.max_wait.max(started.elapsed());
                        }
                        Err(error) => {
                            seen.errors += 1;
                            seen.last_error = Some(
                                error
                                    .as_db_error()
                                    .map(|db| format!("{}: {}", db.code().code(), db.message()))
                                    .unwrap_or_else(|| error.to_string()),
                            );
                            client = None;
                        }
                    }
                    next += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_pg_shows_status_and_switches_over() -> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-kubectl-pg";
    let clusters = create_cluster(
        &client,
        namespace,
        "kp",
        json!({"instances": 2, "failover": calm_failover()}),
    )
    .await?;
    let primary = e2e
        .wait_healthy(&clusters, "kp", None, Duration::from_secs(180))
        .await?;
    let replica = if primary == "kp-0" { "kp-1" } else { "kp-0" };

    // Status: both instances with their roles, the primary named.
    let (ok, text, errors) = kubectl_pg(&e2e, namespace, &["status", "kp"])?;
    assert!(ok, "kubectl pg status failed: {errors}");
    println!("{text}");
    for pod in ["kp-0", "kp-1"] {
        assert!(text.contains(pod), "status lists {pod}: {text}");
    }
    let status = eventually(
        "kubectl pg status -o json to show both roles",
        Duration::from_secs(60),
        || async {
            let (ok, json_text, errors) =
                kubectl_pg(&e2e, namespace, &["status", "kp", "-o", "json"])?;
            if !ok {
                return Ok(Err(errors));
            }
            let value: serde_json::Value = serde_json::from_str(&json_text)?;
            let text = value.to_string();
            Ok(
                if text.contains("\"primary\"") && text.contains("\"replica\"") {
                    Ok(value)
                } else {
                    Err(text)
                },
            )
        },
    )
    .await?;
    assert!(status.to_string().contains(&primary), "{status}");

    // A Pooler in front of the cluster, and clients writing through it as the application
    // user, over TLS verified against the cluster's CA and the Pooler's Service name.
    let pooler = json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "Pooler",
                        "metadata": {"name": "kp-pool", "namespace": namespace},
                        "spec": {"cluster": {"name": "kp"}, "type": "rw", "instances": 1}});
    testbed::manifests::apply(&client, &pooler, namespace).await?;
    let app_secret = api::contract::app_secret("kp");
    let app_user = secret_value(&client, namespace, &app_secret, "username").await?;
    let ca_pem = secret_value(
        &client,
        namespace,
        &api::contract::tls_ca_secret("kp"),
        api::contract::tls_keys::CA,
    )
    .await?;
    let pool_name = format!("kp-pool.{namespace}.svc");
    let pool_login = common::Login {
        password: secret_value(&client, namespace, &app_secret, "password").await?,
        tls: testbed::pg_tls::VerifyFull::new(&ca_pem, &pool_name)?,
        ca_pem,
        server_name: pool_name,
    };
    let pooled = eventually(
        "the Pooler to serve the application user",
        Duration::from_secs(180),
        || async {
            let port = e2e.service_port(namespace, "kp-pool")?;
            let connection = common::connect_as(port, &app_user, &pool_login, "app").await?;
            connection
                .batch_execute("CREATE TABLE IF NOT EXISTS pooled_acks (id bigint PRIMARY KEY)")
                .await?;
            Ok(Ok(port))
        },
    )
    .await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = start_pooled_writers(2, pooled, &pool_login, &app_user, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Switchover through the plugin, waiting for the new primary.
    let (ok, text, errors) = kubectl_pg(
        &e2e,
        namespace,
        &[
            "switchover",
            "kp",
            "--to",
            replica,
            "--wait",
            "--timeout",
            "120",
        ],
    )?;
    assert!(ok, "kubectl pg switchover failed: {errors}\n{text}");
    let now = e2e
        .wait_healthy(&clusters, "kp", Some(&primary), Duration::from_secs(120))
        .await?;
    assert_eq!(now, replica);

    // The writers went on through the switchover: no error, a short wait at most, and every
    // acknowledged row is on the new primary.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut acknowledged, mut client_errors, mut max_wait, mut last_error) =
        (Vec::new(), 0, Duration::ZERO, None);
    for writer in writers {
        let seen = writer.await?;
        acknowledged.extend(seen.acknowledged);
        client_errors += seen.errors;
        max_wait = max_wait.max(seen.max_wait);
        last_error = last_error.or(seen.last_error);
    }
    println!(
        "e2e_pooler_switchover_client_errors={client_errors} e2e_pooler_switchover_client_max_wait_ms={} e2e_pooler_switchover_acknowledged={}",
        max_wait.as_millis(),
        acknowledged.len()
    );
    let pooler_lines = || {
        ["kp-0", "kp-1"]
            .iter()
            .flat_map(|pod| {
                nodeagent::pod_log(&e2e.agent_dir(), namespace, pod, "postgres")
                    .lines()
                    .filter(|line| line.contains("pooler") || line.contains("PAUSE"))
                    .map(|line| format!("{pod}: {line}"))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        client_errors,
        0,
        "clients through the Pooler saw errors at the switchover (last: {last_error:?})\n{}",
        pooler_lines()
    );
    assert!(
        max_wait < Duration::from_secs(10),
        "an INSERT through the Pooler waited {max_wait:?}"
    );
    let reader = common::connect_as(pooled, &app_user, &pool_login, "app").await?;
    let stored: std::collections::BTreeSet<i64> = reader
        .query_typed("SELECT id FROM pooled_acks", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost: Vec<i64> = acknowledged
        .iter()
        .filter(|id| !stored.contains(id))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged rows lost: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
    assert!(
        acknowledged.len() > 50,
        "the writers wrote: {}",
        acknowledged.len()
    );
    let primary_now = reader
        .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
        .await?;
    assert!(
        !primary_now.get::<_, bool>(0),
        "the Pooler reads from the new primary"
    );
    let (ok, text, errors) = kubectl_pg(&e2e, namespace, &["status", "kp"])?;
    assert!(ok, "{errors}");
    let line = text
        .lines()
        .find(|l| l.contains(replica) && l.contains("primary"))
        .unwrap_or_default()
        .to_string();
    assert!(
        !line.is_empty(),
        "status shows {replica} as primary: {text}"
    );

    // Refused: a switchover to a pod that does not exist, with a non-zero exit.
    let (ok, _, errors) = kubectl_pg(&e2e, namespace, &["switchover", "kp", "--to", "kp-9"])?;
    assert!(!ok, "a switchover to an unknown pod must fail");
    assert!(errors.contains("kp-9"), "the error names the pod: {errors}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_outside_verify_the_server_by_the_extra_dns_names_and_a_new_one_is_served() {
    let e2e = stack().unwrap();
    let client = e2e.client().await.unwrap();
    let namespace = "e2e-altnames";
    let clusters = create_cluster(
        &client,
        namespace,
        "an",
        json!({"tls": {"serverAltDnsNames": ["db.example.com"]}}),
    )
    .await
    .unwrap();
    e2e.wait_healthy(&clusters, "an", None, Duration::from_secs(180))
        .await
        .unwrap();
    let ca_pem = secret_value(
        &client,
        namespace,
        &api::contract::tls_ca_secret("an"),
        api::contract::tls_keys::CA,
    )
    .await
    .unwrap();
    let rw = e2e
        .service_port(namespace, &api::contract::rw_service("an"))
        .unwrap();
    // What PostgreSQL presents verifies under the extra name, as a client outside the
    // Kubernetes cluster checks it (sslmode=verify-full to the load balancer's name).
    let verified = |name: &'static str| {
        let ca_pem = ca_pem.clone();
        async move {
            Ok::<_, anyhow::Error>(
                match testbed::pg_tls::server_certificate("127.0.0.1", rw, &ca_pem, name).await {
                    Ok(_) => Ok(()),
                    Err(error) => Err(format!("{error:#}")),
                },
            )
        }
    };
    eventually(
        "the certificate to verify as db.example.com",
        Duration::from_secs(30),
        || verified("db.example.com"),
    )
    .await
    .unwrap();
    assert!(
        verified("pg.example.org").await.unwrap().is_err(),
        "a name not asked for does not verify"
    );
    // A new name: the certificate is issued again and PostgreSQL serves it without a restart.
    let pod_uid = |pod: Pod| pod.metadata.uid;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let before = pod_uid(pods.get("an-0").await.unwrap());
    common::patch_spec(
        &clusters,
        "an",
        json!({"tls": {"serverAltDnsNames": ["db.example.com", "pg.example.org"]}}),
    )
    .await
    .unwrap();
    eventually(
        "the certificate to verify as pg.example.org",
        Duration::from_secs(90),
        || verified("pg.example.org"),
    )
    .await
    .unwrap();
    assert_eq!(pod_uid(pods.get("an-0").await.unwrap()), before);
}

/// The certificates of a PEM bundle, each as its own PEM text.
fn split_bundle(bundle: &str) -> Vec<String> {
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|pem| pem.starts_with("-----BEGIN CERTIFICATE-----"))
        .map(|pem| format!("{pem}\n"))
        .collect()
}

/// A CA renewal under a streaming cluster: the renewed CA is published beside the old one in
/// every `ca.crt` while the old one still signs, so an application that has not read the
/// Secret again still verifies the server; it signs once both instances loaded the bundle;
/// an application that follows `<cluster>-ca` never fails a connection, and replication
/// reconnects across CAs.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_ca_is_trusted_everywhere_before_it_signs_so_no_connection_fails() {
    use controllers::tls::certificates;
    let e2e = stack().unwrap();
    let client = e2e.client().await.unwrap();
    let namespace = "e2e-carenew";
    let name = "cr";
    // The cluster's own CA, placed before the cluster and due for renewal 200 s from now under
    // the chart's 30-day threshold, as a CA made ten years ago would be.
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        namespace,
    )
    .await
    .unwrap();
    let lifetime = Duration::from_secs(30 * 86400 + 200);
    let old =
        certificates::new_ca(name, namespace, time::OffsetDateTime::now_utc(), lifetime).unwrap();
    testbed::manifests::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": api::contract::tls_ca_private_secret(name), "namespace": namespace},
                "stringData": {"ca.crt": old.certificate_pem, "ca.key": old.key_pem}}),
        namespace,
    )
    .await
    .unwrap();
    let clusters = create_cluster(
        &client,
        namespace,
        name,
        json!({"instances": 2, "failover": calm_failover()}),
    )
    .await
    .unwrap();
    e2e.wait_healthy(&clusters, name, None, Duration::from_secs(180))
        .await
        .unwrap();
    let public_ca = {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move {
                secret_value(
                    &client,
                    namespace,
                    &api::contract::tls_ca_secret(name),
                    api::contract::tls_keys::CA,
                )
                .await
            }
        }
    };
    assert_eq!(
        public_ca().await.unwrap().trim_end(),
        old.certificate_pem.trim_end(),
        "the cluster became healthy after its CA was due: the scenario needs a larger margin"
    );
    let login = common::superuser_login(&client, namespace, name)
        .await
        .unwrap();
    let server_name = login.server_name.clone();
    // The superuser's login verified against a given ca.crt.
    let trusting = {
        let login = login.clone();
        move |ca_pem: String| -> anyhow::Result<common::Login> {
            Ok(common::Login {
                tls: testbed::pg_tls::VerifyFull::new(&ca_pem, &login.server_name)?,
                ca_pem,
                ..login.clone()
            })
        }
    };
    let rw = e2e
        .service_port(namespace, &api::contract::rw_service(name))
        .unwrap();
    let ro = e2e
        .service_port(namespace, &api::contract::ro_service(name))
        .unwrap();
    common::connect_when_served(rw, &login)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE renewal (id bigint PRIMARY KEY)")
        .await
        .unwrap();

    // An application that follows `<cluster>-ca` (as a mounted Secret is followed): a new
    // connection every 300 ms, verified against the ca.crt of the moment.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = tokio::spawn({
        let stop = stop.clone();
        let public_ca = public_ca.clone();
        let trusting = trusting.clone();
        async move {
            // A refused certificate is what this is about; a connection that timed out on a
            // loaded machine is counted apart (and printed), not failed on.
            let (mut attempts, mut failures, mut other) = (0u32, Vec::new(), Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(ca_pem) = public_ca().await {
                    attempts += 1;
                    let result = async {
                        let client = common::connect(rw, &trusting(ca_pem)?).await?;
                        client.simple_query("SELECT 1").await?;
                        anyhow::Ok(())
                    };
                    if let Err(error) = result.await {
                        let text = format!("{error:#}");
                        if text.contains("certificate") || text.contains("UnknownIssuer") {
                            failures.push(text);
                        } else {
                            other.push(text);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (attempts, failures, other)
        }
    });

    // Staged: both CAs published; the old one still signs, so a client that kept the old
    // ca.crt still verifies the server.
    let bundle = eventually(
        "the renewed CA to be published",
        Duration::from_secs(300),
        || async {
            let ca = public_ca().await?;
            Ok(if split_bundle(&ca).len() == 2 {
                Ok(ca)
            } else {
                Err(format!("{} certificates", split_bundle(&ca).len()))
            })
        },
    )
    .await
    .unwrap();
    let next = split_bundle(&bundle)[1].clone();
    testbed::pg_tls::server_certificate("127.0.0.1", rw, &old.certificate_pem, &server_name)
        .await
        .expect("the old CA still signs while the renewed one is published");

    // Promoted after the overlap (20 s in the e2e chart values) once both instances loaded the
    // bundle: PostgreSQL serves a certificate of the renewed CA (reloaded, not restarted).
    eventually(
        "the renewed CA to sign the server certificate",
        Duration::from_secs(120),
        || async {
            Ok(
                match testbed::pg_tls::server_certificate("127.0.0.1", rw, &next, &server_name)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(error) => Err(format!("{error:#}")),
                },
            )
        },
    )
    .await
    .unwrap();
    let instances = clusters.get(name).await.unwrap().status.unwrap().instances;
    assert!(
        instances
            .iter()
            .all(|instance| instance.last_join.as_deref() != Some("reclone")),
        "nobody was cloned again: {instances:?}"
    );

    // Replication reconnects across the change: its connection dropped, the replica logs in
    // again with its client certificate, whichever CA signed the one it has loaded.
    let primary = common::connect_when_served(rw, &trusting(public_ca().await.unwrap()).unwrap())
        .await
        .unwrap();
    primary
        .batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        .await
        .unwrap();
    eventually(
        "the replica to stream again",
        Duration::from_secs(60),
        || async {
            let row = primary
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .await?;
            let streaming: i64 = row.get(0);
            Ok(if streaming == 1 {
                Ok(())
            } else {
                Err(format!("{streaming} streaming"))
            })
        },
    )
    .await
    .unwrap();
    primary
        .batch_execute("INSERT INTO renewal VALUES (1)")
        .await
        .unwrap();
    let replica_login = trusting(public_ca().await.unwrap()).unwrap();
    eventually(
        "the replica to replay the new row",
        Duration::from_secs(30),
        || async {
            let replica = common::connect(ro, &replica_login).await?;
            let rows = replica.query("SELECT id FROM renewal", &[]).await?;
            Ok(if rows.len() == 1 {
                Ok(())
            } else {
                Err(format!("{} rows", rows.len()))
            })
        },
    )
    .await
    .unwrap();

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (attempts, failures, other) = follower.await.unwrap();
    println!(
        "ca_renewal_follower_connections={attempts} ca_renewal_follower_failures={} ca_renewal_follower_other_errors={} {other:?}",
        failures.len(),
        other.len()
    );
    assert!(
        attempts as usize - other.len() > 20,
        "{attempts} connections, {} not made: {other:?}",
        other.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {attempts} failed: {failures:?}",
        failures.len()
    );
    // A client that never read the Secret again fails now: what the overlap was for.
    assert!(
        testbed::pg_tls::server_certificate("127.0.0.1", rw, &old.certificate_pem, &server_name)
            .await
            .is_err()
    );

    // Each instance reports what it installed (`certificates` in its status; the same figures
    // feed the metrics the PostgresCertificateExpiresSoon alert reads): the bundle's CA that
    // expires last is the renewed one.
    let renewed_expiry = common::not_after(&next).unwrap();
    eventually(
        "both instances to report the renewed CA's expiry",
        Duration::from_secs(60),
        || async {
            let mut seen = Vec::new();
            for ordinal in 0..2 {
                let installed = common::installed_certificates(
                    &client,
                    namespace,
                    &format!("{name}-{ordinal}"),
                )
                .await?;
                seen.push(
                    installed
                        .into_iter()
                        .find(|(certificate, _)| certificate == "ca")
                        .map(|(_, not_after)| not_after),
                );
            }
            Ok(if seen.iter().all(|ca| *ca == Some(renewed_expiry)) {
                Ok(())
            } else {
                Err(format!("{seen:?}, renewed CA until {renewed_expiry}"))
            })
        },
    )
    .await
    .unwrap();
}
