//! pg-router in Kubernetes mode, as a real process against a real API server and real
//! PostgreSQL 18 shards (TLS only, each shard cluster with its own CA, verified by the router):
//! the topology comes from the PostgresCluster, its ShardRanges and the shards' primary pods;
//! clients log in with the roles PostgresUser objects declare; moving a range or a primary in the
//! API changes where statements go, without a restart; a shard's CA renewed in its Secret is
//! trusted beside the old one until the shard presents a certificate from it; a router whose
//! API server connections die without a word follows a new primary over new ones.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use api::common::ClusterReference;
use api::contract;
use api::postgres_cluster::{
    LookupVindexSpec, PostgresCluster, PostgresClusterSpec, ShardedTableSpec, TlsMode,
};
use api::postgres_user::PostgresUser;
use api::sharding::{ShardRange, ShardRangeSpec, ShardRangeState, VindexKind};
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use router::vindex::{KeyValue, key_hash};
use serde_json::json;
use testbed::pg_tls::TestCa;
use testbed::{ApiServer, Postgres, PostgresOptions};

use common::cluster::{orders, two_shards};
use common::process::RouterProcess;

const NAMESPACE: &str = "routing";
const BACKEND_PASSWORD: &str = "router-backend-pw";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(NAMESPACE.to_string()),
        ..ObjectMeta::default()
    }
}

/// The primary pod of shard cluster `child` as the instance manager leaves it: labelled
/// `role=primary`, Ready, with its IP and PostgreSQL port (the kubelet's part is played here).
async fn primary_pod(client: &Client, name: &str, child: &str, port: u16) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {
            contract::LABEL_CLUSTER: child, contract::LABEL_ROLE: contract::role::PRIMARY}},
        "spec": {"containers": [{"name": "postgres", "image": "example.org/pg:18",
            "ports": [{"name": contract::PORT_NAME_POSTGRES, "containerPort": port}]}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating a pod");
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

/// Shard cluster `child`'s Lease held by pod `holder`, as its instance manager writes it.
async fn shard_lease(client: &Client, child: &str, holder: &str) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": contract::lease_name(child), "namespace": NAMESPACE},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 10}});
    leases
        .patch(
            &contract::lease_name(child),
            &PatchParams::apply("test").force(),
            &Patch::Apply(lease),
        )
        .await
        .expect("writing a Lease");
}

fn range(name: &str, shard: &str, start: Option<i64>, end: Option<i64>) -> ShardRange {
    let mut range = ShardRange::new(
        name,
        ShardRangeSpec {
            cluster: ClusterReference { name: "db".into() },
            table_group: "customers".into(),
            shard: shard.into(),
            start,
            end,
            state: ShardRangeState::Active,
            vindex: VindexKind::Hash,
            epoch: 0,
        },
    );
    range.metadata.namespace = Some(NAMESPACE.into());
    range
}

/// The shard index the range layout [None, 0) -> 0, [0, None) -> 1 gives `key`.
fn initial_shard(key: i64) -> usize {
    if (key_hash(&KeyValue::Int(key)) as i64) < 0 {
        0
    } else {
        1
    }
}

async fn connect(port: u16, user: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let url = format!("host=127.0.0.1 port={port} user={user} password={password} dbname=postgres");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("{e:?}"))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn count(shard: &Postgres, sql: &str) -> i64 {
    shard
        .client()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create<K>(client: &Client, object: &K)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), object)
        .await
        .expect("creating an object");
}

/// Creates `orders` on one shard directly (as a shard added or promoted has it).
async fn create_orders(shard: &Postgres) {
    shard
        .client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE orders (customer_id bigint, id bigint, PRIMARY KEY (customer_id, id))",
        )
        .await
        .unwrap();
}

/// A fresh API server with the CRDs and the test's namespace, and a client of it.
async fn api_server() -> (ApiServer, Client) {
    let server = ApiServer::start().await.expect("API server");
    server.install_crds(&api::all_crds()).await.expect("CRDs");
    let client = server.client().await.unwrap();
    testbed::apiserver::create_namespace(&client, NAMESPACE)
        .await
        .unwrap();
    (server, client)
}

/// What the operator writes for a sharded cluster `db`: the cluster and its two ShardRanges
/// (negative hashes on shard-0, the rest on shard-1).
async fn create_cluster(client: &Client, spec: PostgresClusterSpec) {
    let mut cluster = PostgresCluster::new("db", spec);
    cluster.metadata.namespace = Some(NAMESPACE.into());
    create(client, &cluster).await;
    create(client, &range("db-customers-0", "shard-0", None, Some(0))).await;
    create(client, &range("db-customers-1", "shard-1", Some(0), None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_routes_by_shard_ranges_and_follows_their_changes_live() {
    let (server, client) = api_server().await;
    // The shards speak TLS only, as the operator's clusters do: each shard cluster has its own
    // CA, and its primary a certificate for the cluster's -rw Service (shards[2] becomes
    // db-shard-1's primary later, so it has db-shard-1's).
    let cas: Vec<TestCa> = (0..2)
        .map(|i| TestCa::new(&format!("db-shard-{i} CA")).expect("a CA"))
        .collect();
    let shards: Vec<Postgres> = tokio::task::block_in_place(|| {
        [0, 1, 1]
            .into_iter()
            .map(|child: usize| {
                let name = format!("db-shard-{child}-rw.{NAMESPACE}.svc");
                let options = PostgresOptions {
                    tls: Some(cas[child].issue(&[&name]).expect("a certificate")),
                    ..PostgresOptions::default()
                        .setting("max_prepared_transactions", 10)
                        .setting("log_statement", "all")
                };
                Postgres::start_with(options).expect("a shard")
            })
            .collect()
    });
    for (child, ca) in cas.iter().enumerate() {
        let mut secret = Secret {
            metadata: meta(&contract::tls_ca_secret(&format!("db-shard-{child}"))),
            ..Secret::default()
        };
        secret.data = Some(BTreeMap::from([(
            contract::tls_keys::CA.to_string(),
            ByteString(ca.pem().as_bytes().to_vec()),
        )]));
        create(&client, &secret).await;
    }

    // What the operator writes for a 2-shard cluster (no operator runs here: the router is
    // under test), and the shards' primary pods as their instance managers label them.
    let spec = two_shards(
        TlsMode::OperatorCA,
        vec![
            orders(),
            // Found by email through a lookup vindex.
            ShardedTableSpec {
                name: "customers".into(),
                table_group: "customers".into(),
                shard_key: "id".into(),
                lookups: vec![LookupVindexSpec {
                    column: "email".into(),
                    table: "customers_email_lookup".into(),
                }],
            },
        ],
        vec!["countries".into()],
    );
    create_cluster(&client, spec).await;
    primary_pod(&client, "db-shard-0-0", "db-shard-0", shards[0].port()).await;
    primary_pod(&client, "db-shard-1-0", "db-shard-1", shards[1].port()).await;
    shard_lease(&client, "db-shard-1", "db-shard-1-0").await;
    // A login declared by a PostgresUser, with its password Secret.
    let mut secret = Secret {
        metadata: meta("app-password"),
        ..Secret::default()
    };
    secret.data = Some(BTreeMap::from([
        ("username".to_string(), ByteString(b"app".to_vec())),
        ("password".to_string(), ByteString(b"app-pw".to_vec())),
    ]));
    create(&client, &secret).await;
    let user: PostgresUser = serde_json::from_value(json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresUser",
        "metadata": {"name": "app", "namespace": NAMESPACE},
        "spec": {"cluster": {"name": "db"}, "roleName": "app",
                 "password": {"secretName": "app-password"}}
    }))
    .unwrap();
    create(&client, &user).await;

    // The router's certificate for its clients, as the operator issues it: from the cluster's
    // CA, naming the -router Service.
    let db_ca = TestCa::new("db CA").expect("a CA");
    let router_name = format!("{}.{NAMESPACE}.svc", contract::router_service("db"));
    let router_tls = db_ca.issue(&[&router_name]).expect("a certificate");
    let (cert_file, key_file) = (
        server.dir().join("router.crt"),
        server.dir().join("router.key"),
    );
    std::fs::write(&cert_file, &router_tls.certificate_pem).unwrap();
    std::fs::write(&key_file, &router_tls.key_pem).unwrap();

    // The real pg-router binary in Kubernetes mode.
    let log = server.dir().join("router.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pg-router"));
    command
        .args(["--kubernetes-cluster", "db", "--namespace", NAMESPACE])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--tls-cert-file")
        .arg(&cert_file)
        .arg("--tls-key-file")
        .arg(&key_file)
        .env("KUBECONFIG", server.kubeconfig_path())
        .env("PG_ROUTER_BACKEND_PASSWORD", BACKEND_PASSWORD)
        .env("LOG_LEVEL", "info");
    let router = RouterProcess::start(command, &log).await;
    let port = router.port;
    let app = eventually("the router accepts the app login", || async {
        connect(port, "app", "app-pw").await.ok()
    })
    .await;
    let refused = connect(port, "app", "wrong").await.unwrap_err();
    assert!(refused.contains("password"), "{refused}");
    assert!(connect(port, "postgres", BACKEND_PASSWORD).await.is_ok());

    // DDL reaches every shard; rows go where the ranges say.
    app.batch_execute(
        "CREATE TABLE orders (customer_id bigint, id bigint, PRIMARY KEY (customer_id, id));
         CREATE TABLE countries (code text PRIMARY KEY)",
    )
    .await
    .expect("DDL through the router");
    for key in 1..=100i64 {
        app.execute(
            "INSERT INTO orders (customer_id, id) VALUES ($1, 1)",
            &[&key],
        )
        .await
        .expect("insert through the router");
    }
    let expected_0 = (1..=100).filter(|k| initial_shard(*k) == 0).count() as i64;
    assert!(expected_0 > 20 && expected_0 < 80, "{expected_0}");
    assert_eq!(
        count(&shards[0], "SELECT count(*) FROM orders").await,
        expected_0
    );
    assert_eq!(
        count(&shards[1], "SELECT count(*) FROM orders").await,
        100 - expected_0
    );
    let total: i64 = app
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 100);

    // A lookup vindex declared in the cluster's spec: the router keeps the lookup table (on the
    // first shard) with every INSERT and reads a row by email from its one shard.
    app.batch_execute(
        "CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL);
         CREATE TABLE customers_email_lookup (value text PRIMARY KEY, key bigint NOT NULL)",
    )
    .await
    .expect("DDL through the router");
    for key in 1..=20i64 {
        app.execute(
            "INSERT INTO customers (id, email) VALUES ($1, $2)",
            &[&key, &format!("c{key}@example.com")],
        )
        .await
        .expect("insert through the router");
    }
    assert_eq!(
        count(&shards[0], "SELECT count(*) FROM customers_email_lookup").await,
        20,
        "the lookup table on the first shard maps every email"
    );
    for key in [3i64, 14] {
        let marker = format!("marker_email_{key}");
        let rows = app
            .query(
                &format!("SELECT /* {marker} */ id FROM customers WHERE email = $1"),
                &[&format!("c{key}@example.com")],
            )
            .await
            .expect("a read by email");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i64>(0), key);
        // Only the owner ran it: without the lookup vindex both shards would have.
        let owner = initial_shard(key);
        for (index, shard) in shards.iter().take(2).enumerate() {
            let log = std::fs::read_to_string(shard.log_path()).unwrap();
            let executed = log
                .lines()
                .any(|line| line.contains("execute") && line.contains(&marker));
            assert_eq!(executed, index == owner, "read of {key} on shard {index}");
        }
    }
    // Clients speak TLS to the router, verified against the cluster's CA and the router's name.
    let verify = testbed::pg_tls::VerifyFull::new(db_ca.pem(), &router_name).unwrap();
    let (secure, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user=app password=app-pw dbname=postgres sslmode=require"
        ),
        verify,
    )
    .await
    .expect("a TLS connection to the router, verify-full");
    tokio::spawn(connection);
    let total: i64 = secure
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 100);
    // The router reached both shards over TLS, verified against each shard's own CA (the
    // test's own connections use the Unix socket: only the router comes over TCP).
    for shard in &shards[..2] {
        let encrypted = "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.backend_type = 'client backend' AND a.client_addr IS NOT NULL";
        let row = shard
            .client()
            .await
            .unwrap()
            .query_one(encrypted, &[])
            .await
            .unwrap();
        let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
        assert!(
            tls > 0 && plain == 0,
            "router connections: {tls} TLS, {plain} plain"
        );
    }

    // Move shard-0's range to shard-1 in the API: routing follows without a restart.
    let moved_key = (1..=100).find(|k| initial_shard(*k) == 0).unwrap();
    let ranges: Api<ShardRange> = Api::namespaced(client.clone(), NAMESPACE);
    ranges
        .patch(
            "db-customers-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"shard": "shard-1"}})),
        )
        .await
        .unwrap();
    eventually("reads of the moved key go to shard-1", || async {
        let found: i64 = app
            .query_one(
                "SELECT count(*) FROM orders WHERE customer_id = $1",
                &[&moved_key],
            )
            .await
            .ok()?
            .get(0);
        (found == 0).then_some(())
    })
    .await;
    app.execute(
        "INSERT INTO orders (customer_id, id) VALUES ($1, 2)",
        &[&moved_key],
    )
    .await
    .unwrap();
    assert_eq!(
        count(
            &shards[1],
            &format!("SELECT count(*) FROM orders WHERE customer_id = {moved_key}")
        )
        .await,
        1
    );

    // An incomplete layout (a gap) is not applied: the router keeps the last complete one.
    ranges
        .patch(
            "db-customers-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"start": 10}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still: i64 = app
        .query_one(
            "SELECT count(*) FROM orders WHERE customer_id = $1",
            &[&moved_key],
        )
        .await
        .expect("routing by the last complete topology")
        .get(0);
    assert_eq!(still, 1);
    ranges
        .patch(
            "db-customers-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"start": 0}})),
        )
        .await
        .unwrap();

    // The primary of shard-1 moves (a failover): another pod labels itself primary while the
    // old one, cut off from the API server, keeps its label and stays ready. The shard's Lease
    // decides: writes stay on its holder, then follow it to the new pod.
    primary_pod(&client, "db-shard-1-1", "db-shard-1", shards[2].port()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..5 {
        let found: Option<i64> = app
            .query_one(
                "SELECT count(*) FROM orders WHERE customer_id = $1",
                &[&moved_key],
            )
            .await
            .ok()
            .map(|row| row.get(0));
        // db-shard-1-1 has no `orders` table yet: a statement sent there fails.
        assert_eq!(
            found,
            Some(1),
            "the Lease holder db-shard-1-0 is still the primary"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shard_lease(&client, "db-shard-1", "db-shard-1-1").await;
    create_orders(&shards[2]).await;
    eventually("writes go to the new primary", || async {
        let found: i64 = app
            .query_one(
                "SELECT count(*) FROM orders WHERE customer_id = $1",
                &[&moved_key],
            )
            .await
            .ok()?
            .get(0);
        (found == 0).then_some(())
    })
    .await;
    app.execute(
        "INSERT INTO orders (customer_id, id) VALUES ($1, 3)",
        &[&moved_key],
    )
    .await
    .unwrap();
    assert_eq!(count(&shards[2], "SELECT count(*) FROM orders").await, 1);
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .patch(
            "db-shard-1-0",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {contract::LABEL_ROLE: contract::role::REPLICA}}}),
            ),
        )
        .await
        .unwrap();
    // 2PC: a router killed (-9) between PREPARE and COMMIT PREPARED leaves prepared branches;
    // another router replica resolves them, so no lock stays held.
    ranges
        .patch(
            "db-customers-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"shard": "shard-0"}})),
        )
        .await
        .unwrap();
    eventually("shard-0's range routes to shard-0 again", || async {
        let found: i64 = app
            .query_one(
                "SELECT count(*) FROM orders WHERE customer_id = $1",
                &[&moved_key],
            )
            .await
            .ok()?
            .get(0);
        (found == 1).then_some(())
    })
    .await;
    let key_0 = (1000..).find(|k| initial_shard(*k) == 0).unwrap();
    let key_1 = (1000..).find(|k| initial_shard(*k) == 1).unwrap();
    let stalled_log = server.dir().join("router-stalled.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pg-router"));
    command
        .args(["--kubernetes-cluster", "db", "--namespace", NAMESPACE])
        .args(["--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", server.kubeconfig_path())
        .env("PG_ROUTER_BACKEND_PASSWORD", BACKEND_PASSWORD)
        .env("PG_ROUTER_FAULT", "stall_after_prepare");
    let mut stalled = RouterProcess::start(command, &stalled_log).await;
    let stalled_port = stalled.port;
    let doomed = eventually("the second router accepts logins", || async {
        connect(stalled_port, "app", "app-pw").await.ok()
    })
    .await;
    let transaction = tokio::spawn(async move {
        doomed
            .batch_execute(&format!(
                "BEGIN; INSERT INTO orders (customer_id, id) VALUES ({key_0}, 9);
                 INSERT INTO orders (customer_id, id) VALUES ({key_1}, 9); COMMIT"
            ))
            .await
    });
    let prepared = "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'pgr_%'";
    let mut on_shards = 0;
    for _ in 0..100 {
        on_shards = count(&shards[0], prepared).await + count(&shards[2], prepared).await;
        if on_shards > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        on_shards, 1,
        "one branch prepared, the coordinator's still open"
    );
    stalled.child.kill().expect("kill -9 the router");
    let _ = stalled.child.wait();
    assert!(
        transaction.await.unwrap().is_err(),
        "the client saw its router die"
    );
    eventually("the other router resolved the prepared branch", || async {
        let left = count(&shards[0], prepared).await + count(&shards[2], prepared).await;
        (left == 0).then_some(())
    })
    .await;
    // No decision was recorded: the transaction rolled back everywhere, and nothing is locked.
    app.batch_execute("SET lock_timeout = '2s'").await.unwrap();
    for key in [key_0, key_1] {
        app.execute(
            "INSERT INTO orders (customer_id, id) VALUES ($1, 9)",
            &[&key],
        )
        .await
        .expect("the keys are free: no lock left behind");
    }
    // The operator renews shard-0's CA: its Secret changes at once, the shard's certificate only
    // once its instance manager reloads. New router connections are made at each step (the
    // shard's client backends are ended): the old certificate stays trusted beside the new CA,
    // and the new one is trusted without any other change to the topology.
    let applied = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("topology from Kubernetes applied")
            .count()
    };
    let before = applied();
    let renewed = TestCa::new("db-shard-0 CA, renewed").expect("a CA");
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .patch(
            &contract::tls_ca_secret("db-shard-0"),
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {contract::tls_keys::CA: ByteString(renewed.pem().as_bytes().to_vec())}})),
        )
        .await
        .unwrap();
    eventually("the router read the renewed CA", || async {
        (applied() > before).then_some(())
    })
    .await;
    let shard_0_key = (1..=100).find(|k| initial_shard(*k) == 0).unwrap();
    let through_new_connections = |step: &'static str| {
        let app = &app;
        let shard = &shards[0];
        async move {
            eventually(step, || async {
                shard
                    .client()
                    .await
                    .ok()?
                    .batch_execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' AND client_addr IS NOT NULL",
                    )
                    .await
                    .ok()?;
                app.query_one(
                    "SELECT count(*) FROM orders WHERE customer_id = $1",
                    &[&shard_0_key],
                )
                .await
                .ok()
                .map(|_| ())
            })
            .await
        }
    };
    through_new_connections("shard-0's old certificate, still trusted during the rotation").await;
    let name = format!("db-shard-0-rw.{NAMESPACE}.svc");
    shards[0]
        .replace_tls(&renewed.issue(&[&name]).expect("a certificate"))
        .await
        .unwrap();
    through_new_connections("shard-0's certificate from the renewed CA").await;

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains(BACKEND_PASSWORD) && !log_text.contains("app-pw"),
        "no password in the router log"
    );
    drop(router);
}

/// The router's connections to the API server die without a word (a load balancer or NAT that
/// forgot them; every packet on them is dropped while new connections go through), and then a
/// shard's primary moves. The router's watches and reads on those connections fail after its
/// API timeout and it follows the move over new ones, instead of routing to the old primary
/// until kube's watch idle limit (295 s), or for ever for a read on a pooled connection (kube's
/// client has no read timeout and no HTTP/2 health ping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_api_connections_die_silently_follows_a_new_primary_over_new_ones() {
    let (server, client) = api_server().await;
    // shards[2] becomes shard-1's primary after the connections died.
    let shards: Vec<Postgres> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|_| Postgres::start().expect("a shard"))
            .collect()
    });
    create_cluster(
        &client,
        two_shards(TlsMode::Disabled, vec![orders()], Vec::new()),
    )
    .await;
    primary_pod(&client, "db-shard-0-0", "db-shard-0", shards[0].port()).await;
    primary_pod(&client, "db-shard-1-0", "db-shard-1", shards[1].port()).await;
    shard_lease(&client, "db-shard-1", "db-shard-1-0").await;
    for shard in &shards {
        create_orders(shard).await;
    }

    // The router reaches the API server through a proxy that can strand its connections.
    let kubeconfig = server.dir().join("router-proxied.kubeconfig");
    let proxy = server.proxied_kubeconfig(&kubeconfig).expect("a proxy");
    let log = server.dir().join("router-stranded.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pg-router"));
    command
        .args(["--kubernetes-cluster", "db", "--namespace", NAMESPACE])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--api-timeout-seconds", "15"])
        .env("KUBECONFIG", &kubeconfig)
        .env("PG_ROUTER_BACKEND_PASSWORD", BACKEND_PASSWORD)
        .env("LOG_LEVEL", "info");
    let router = RouterProcess::start(command, &log).await;
    let app = eventually("the router accepts the backend login", || async {
        connect(router.port, "postgres", BACKEND_PASSWORD)
            .await
            .ok()
    })
    .await;
    let key = (1..1000i64)
        .find(|k| initial_shard(*k) == 1)
        .expect("a key of shard-1");
    app.execute(
        "INSERT INTO orders (customer_id, id) VALUES ($1, 1)",
        &[&key],
    )
    .await
    .expect("a write through the router");
    assert_eq!(count(&shards[1], "SELECT count(*) FROM orders").await, 1);
    // Let the watches settle on their connections (and a read leave one idle in the pool).
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.strand();
    let stranded = tokio::time::Instant::now();
    primary_pod(&client, "db-shard-1-1", "db-shard-1", shards[2].port()).await;
    shard_lease(&client, "db-shard-1", "db-shard-1-1").await;
    let mut id = 1i64;
    let deadline = stranded + Duration::from_secs(60);
    loop {
        id += 1;
        app.execute(
            "INSERT INTO orders (customer_id, id) VALUES ($1, $2)",
            &[&key, &id],
        )
        .await
        .expect("a write through the router");
        if count(&shards[2], "SELECT count(*) FROM orders").await > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the router still writes to the old primary 60 s after its API connections died:\n{}",
            common::process::log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "followed_new_primary_after_stranding_ms={}",
        stranded.elapsed().as_millis()
    );
    drop(proxy);
}
