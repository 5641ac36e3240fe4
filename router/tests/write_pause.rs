//! The router's part of a split's cut-over, with real pg-router processes in Kubernetes mode, a
//! real API server and real PostgreSQL 18 shards; the operator's part (copy, catch-up, fence,
//! flip) is played by the test. While a ShardRange is WritePaused, writes to its rows wait and
//! reads go on; after the flip (new shard, Active, epoch + 1) the held writes run on the new
//! shard; a hold past its bound fails with 40001 and the connection stays usable; a router that
//! has not seen the flip hits the source's fence, re-reads its topology and lands on the new
//! shard.

mod common;

use std::process::Command;
use std::time::Duration;

use api::common::ClusterReference;
use api::contract;
use api::postgres_cluster::{PostgresCluster, TlsMode};
use api::sharding::{ShardRange, ShardRangeSpec, ShardRangeState, VindexKind};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use router::vindex::{KeyValue, key_hash};
use serde_json::json;
use testbed::{ApiServer, Postgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::cluster::{orders, two_shards};
use common::process::RouterProcess;

const NAMESPACE: &str = "cutover";
const BACKEND_PASSWORD: &str = "router-backend-pw";
/// Where the moving range begins: shard-1's half of the space is split here.
const SPLIT_AT: i64 = 1 << 62;
const MOVING: &str = "db-customers-1b";
const TABLE: &str = "CREATE TABLE orders (customer_id bigint, id bigint, note text, \
                     PRIMARY KEY (customer_id, id))";

/// Starts the real pg-router `name` for cluster `db`, with a hold bound and an optional fault;
/// returns once it listens (its log is `router-<name>.log` beside the API server's).
async fn start_router(
    server: &ApiServer,
    name: &str,
    hold_ms: u64,
    fault: Option<&str>,
) -> RouterProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pg-router"));
    command
        .args(["--kubernetes-cluster", "db", "--namespace", NAMESPACE])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--write-pause-hold-ms", &hold_ms.to_string()])
        .env("KUBECONFIG", server.kubeconfig_path())
        .env("PG_ROUTER_BACKEND_PASSWORD", BACKEND_PASSWORD)
        .env("LOG_LEVEL", "info");
    if let Some(fault) = fault {
        command.env("PG_ROUTER_FAULT", fault);
    }
    let log = server.dir().join(format!("router-{name}.log"));
    let router = RouterProcess::start(command, &log).await;
    assert!(
        router.metrics_port.is_some(),
        "the router reports its metrics address"
    );
    router
}

async fn scrape(router: &RouterProcess) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", router.metrics_port?))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// The value of metric `name` (first sample) on `router`.
async fn metric(router: &RouterProcess, name: &str) -> Option<f64> {
    let text = scrape(router).await?;
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The primary pod of shard cluster `child` as its instance manager labels it.
async fn primary_pod(client: &Client, name: &str, child: &str, port: u16) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {
            contract::LABEL_CLUSTER: child, contract::LABEL_ROLE: contract::role::PRIMARY}},
        "spec": {"containers": [{"name": "postgres", "image": "example.org/pg:18",
            "ports": [{"name": contract::PORT_NAME_POSTGRES, "containerPort": port}]}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
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

/// The first key from 1 up whose position (its partition hash, signed) satisfies `keep`.
fn key_where(keep: impl Fn(i64) -> bool) -> i64 {
    (1..)
        .find(|k| keep(key_hash(&KeyValue::Int(*k)) as i64))
        .unwrap()
}

async fn connect(router: &RouterProcess) -> Option<tokio_postgres::Client> {
    let url = format!(
        "host=127.0.0.1 port={} user=postgres password={BACKEND_PASSWORD} dbname=postgres",
        router.port
    );
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(client)
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rows(shard: &Postgres, key: i64) -> Vec<(i64, Option<String>)> {
    shard
        .client()
        .await
        .unwrap()
        .query(
            "SELECT id, note FROM orders WHERE customer_id = $1 ORDER BY id",
            &[&key],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn patch_range(client: &Client, name: &str, spec: serde_json::Value) {
    Api::<ShardRange>::namespaced(client.clone(), NAMESPACE)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

/// What the operator installs on the source before the flip: writes to the moved range's rows
/// (here: its keys) fail with 40001, naming the range.
fn fence_sql(keys: &[i64]) -> String {
    let keys: Vec<String> = keys.iter().map(i64::to_string).collect();
    format!(
        "CREATE FUNCTION fence() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF (CASE WHEN TG_OP = 'DELETE' THEN OLD.customer_id ELSE NEW.customer_id END)
              = ANY ('{{{}}}'::bigint[]) THEN
             RAISE EXCEPTION 'range {MOVING} moved to shard-2 (epoch 1); retry'
               USING ERRCODE = '40001';
           END IF;
           RETURN COALESCE(NEW, OLD);
         END $$;
         CREATE TRIGGER fence BEFORE INSERT OR UPDATE OR DELETE ON orders
           FOR EACH ROW EXECUTE FUNCTION fence()",
        keys.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_paused_range_wait_for_the_flip_and_stale_routers_hit_the_fence() {
    let server = ApiServer::start().await.expect("API server");
    server.install_crds(&api::all_crds()).await.expect("CRDs");
    let client = server.client().await.unwrap();
    testbed::apiserver::create_namespace(&client, NAMESPACE)
        .await
        .unwrap();
    let shards: Vec<Postgres> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|_| Postgres::start().expect("a shard"))
            .collect()
    });
    for shard in &shards {
        shard
            .client()
            .await
            .unwrap()
            .batch_execute(TABLE)
            .await
            .unwrap();
    }

    // Two shards; the operator has split shard-1's range in two (same shard) before moving the
    // upper one to shard-2, whose primary is up.
    // Plain TCP to the shards: TLS to them is router/tests/kubernetes.rs's subject.
    let spec = two_shards(TlsMode::Disabled, vec![orders()], Vec::new());
    let mut cluster = PostgresCluster::new("db", spec);
    cluster.metadata.namespace = Some(NAMESPACE.into());
    let ranges = [
        range("db-customers-0", "shard-0", None, Some(0)),
        range("db-customers-1a", "shard-1", Some(0), Some(SPLIT_AT)),
        range(MOVING, "shard-1", Some(SPLIT_AT), None),
    ];
    Api::<PostgresCluster>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &cluster)
        .await
        .unwrap();
    for range in &ranges {
        Api::<ShardRange>::namespaced(client.clone(), NAMESPACE)
            .create(&PostParams::default(), range)
            .await
            .unwrap();
    }
    for (i, shard) in shards.iter().enumerate() {
        primary_pod(
            &client,
            &format!("db-shard-{i}-0"),
            &format!("db-shard-{i}"),
            shard.port(),
        )
        .await;
    }
    let moving = key_where(|p| p >= SPLIT_AT);
    let staying = key_where(|p| (0..SPLIT_AT).contains(&p));
    let other = key_where(|p| p < 0);

    // Router A follows the API (long hold bound); router B too, with a short bound; routers
    // S1 and S2 model routers whose watch lags: they keep their first topology until a
    // shard's fence makes them read the objects again.
    let router_a = start_router(&server, "a", 30_000, None).await;
    let router_b = start_router(&server, "b", 700, None).await;
    let router_s1 = start_router(&server, "s1", 5_000, Some("ignore_topology_watch")).await;
    let router_s2 = start_router(&server, "s2", 5_000, Some("ignore_topology_watch")).await;
    let a = eventually("router A accepts logins", || connect(&router_a)).await;
    let b = eventually("router B accepts logins", || connect(&router_b)).await;
    let s1 = eventually("router S1 accepts logins", || connect(&router_s1)).await;
    let s2 = eventually("router S2 accepts logins", || connect(&router_s2)).await;
    for key in [moving, staying, other] {
        a.execute(
            "INSERT INTO orders (customer_id, id, note) VALUES ($1, 1, 'before')",
            &[&key],
        )
        .await
        .unwrap();
    }
    assert_eq!(
        rows(&shards[1], moving).await.len(),
        1,
        "moving key on shard-1"
    );

    // (a) The operator pauses the moving range.
    patch_range(&client, MOVING, json!({"state": "WritePaused"})).await;
    for router in [&router_a, &router_b] {
        eventually("the routers see the pause", || async {
            (metric(router, "pg_router_write_paused_ranges").await? == 1.0).then_some(())
        })
        .await;
    }
    // Writes to it wait: an extended-protocol INSERT, and a simple-protocol UPDATE whose
    // literal key was routed at plan time, each from its own connection.
    let insert_client = connect(&router_a).await.unwrap();
    let held_insert = tokio::spawn(async move {
        insert_client
            .execute(
                "INSERT INTO orders (customer_id, id, note) VALUES ($1, 2, 'held')",
                &[&moving],
            )
            .await
    });
    let update_client = connect(&router_a).await.unwrap();
    let held_update = tokio::spawn(async move {
        update_client
            .batch_execute(&format!(
                "UPDATE orders SET note = 'updated while held' WHERE customer_id = {moving} AND id = 1"
            ))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !held_insert.is_finished() && !held_update.is_finished(),
        "writes to a paused range are held"
    );
    // Reads of it are answered, from the source.
    let read: i64 = a
        .query_one(
            "SELECT count(*) FROM orders WHERE customer_id = $1",
            &[&moving],
        )
        .await
        .expect("reads of a paused range go on")
        .get(0);
    assert_eq!(read, 1);
    // A held write can be cancelled, as a running one can.
    let cancelled_client = connect(&router_a).await.unwrap();
    let cancel = cancelled_client.cancel_token();
    let cancelled = tokio::spawn(async move {
        cancelled_client
            .execute("DELETE FROM orders WHERE customer_id = $1", &[&moving])
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!cancelled.is_finished(), "the DELETE is held");
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), cancelled)
        .await
        .expect("a cancel request ends the hold")
        .unwrap()
        .expect_err("the held DELETE is cancelled");
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error:?}");
    // Writes to other ranges, on the same shard and on another, are never held.
    for key in [staying, other] {
        tokio::time::timeout(
            Duration::from_secs(2),
            a.execute(
                "INSERT INTO orders (customer_id, id, note) VALUES ($1, 2, 'not held')",
                &[&key],
            ),
        )
        .await
        .expect("a write to an active range is not held")
        .unwrap();
    }

    // (b) Past the bound (router B: 700 ms) the client gets 40001 naming the range, and the
    // same connection goes on.
    let started = std::time::Instant::now();
    let error = b
        .execute(
            "INSERT INTO orders (customer_id, id, note) VALUES ($1, 9, 'too late')",
            &[&moving],
        )
        .await
        .expect_err("a hold past its bound fails");
    let waited = started.elapsed();
    let db = error.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "40001", "{db:?}");
    assert!(
        db.message().contains(MOVING) && db.message().contains("paused for a split; retry"),
        "{}",
        db.message()
    );
    assert!(
        waited >= Duration::from_millis(600),
        "held for the bound: {waited:?}"
    );
    let one: i32 = b.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // A transaction that holds a row lock on the source and then writes to the paused range
    // is not left waiting for a flip that its lock could delay: the bound ends it.
    b.batch_execute("BEGIN").await.unwrap();
    b.execute(
        "UPDATE orders SET note = 'locked' WHERE customer_id = $1",
        &[&staying],
    )
    .await
    .unwrap();
    let error = b
        .execute(
            "UPDATE orders SET note = 'too late' WHERE customer_id = $1",
            &[&moving],
        )
        .await
        .expect_err("a transaction's hold past the bound fails");
    assert_eq!(error.code().map(|c| c.code()), Some("40001"));
    b.batch_execute("ROLLBACK").await.unwrap();
    let one: i32 = b.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // The operator's catch-up, fence and flip: the rows move to shard-2, the source refuses
    // writes to them, and the range names shard-2 with the next epoch.
    let target = shards[2].client().await.unwrap();
    for (id, note) in rows(&shards[1], moving).await {
        target
            .execute(
                "INSERT INTO orders (customer_id, id, note) VALUES ($1, $2, $3)",
                &[&moving, &id, &note],
            )
            .await
            .unwrap();
    }
    shards[1]
        .client()
        .await
        .unwrap()
        .batch_execute(&fence_sql(&[moving]))
        .await
        .unwrap();
    assert!(!held_insert.is_finished() && !held_update.is_finished());
    let flip = std::time::Instant::now();
    patch_range(
        &client,
        MOVING,
        json!({"shard": "shard-2", "state": "Active", "epoch": 1}),
    )
    .await;
    // The held writes complete, on the new shard.
    let flipped = tokio::time::timeout(Duration::from_secs(10), async {
        (held_insert.await.unwrap(), held_update.await.unwrap())
    })
    .await
    .expect("held writes are released by the flip");
    println!(
        "write_pause_release_after_flip_ms={}",
        flip.elapsed().as_millis()
    );
    assert_eq!(flipped.0.expect("the held INSERT succeeds"), 1);
    flipped.1.expect("the held UPDATE succeeds");
    assert_eq!(
        rows(&shards[2], moving).await,
        vec![
            (1, Some("updated while held".to_string())),
            (2, Some("held".to_string()))
        ]
    );
    assert_eq!(
        rows(&shards[1], moving).await,
        vec![(1, Some("before".to_string()))],
        "nothing written to the source after the pause"
    );
    assert_eq!(
        metric(&router_a, "pg_router_topology_epoch").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&router_a, "pg_router_write_paused_ranges").await,
        Some(0.0)
    );
    assert!(metric(&router_a, "pg_router_write_pause_holds_total").await >= Some(2.0));
    assert!(metric(&router_b, "pg_router_write_pause_holds_total").await >= Some(1.0));

    // (c) Stale routers: S1 and S2 still place the range on shard-1 (they never saw the pause
    // nor the flip). In a transaction, the fence's 40001 reaches the client, and its retry
    // lands on the new shard (the fence made S1 re-read its topology).
    assert_eq!(
        metric(&router_s1, "pg_router_topology_epoch").await,
        Some(0.0)
    );
    s1.batch_execute("BEGIN").await.unwrap();
    let error = s1
        .execute(
            "INSERT INTO orders (customer_id, id, note) VALUES ($1, 3, 'stale')",
            &[&moving],
        )
        .await
        .expect_err("the source's fence refuses a stale router's write");
    let db = error.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "40001", "{db:?}");
    assert!(db.message().contains("moved"), "{}", db.message());
    s1.batch_execute("ROLLBACK").await.unwrap();
    eventually("S1 re-read its topology", || async {
        (metric(&router_s1, "pg_router_topology_epoch").await? == 1.0).then_some(())
    })
    .await;
    s1.batch_execute(&format!(
        "BEGIN; INSERT INTO orders (customer_id, id, note) VALUES ({moving}, 3, 'retried'); COMMIT"
    ))
    .await
    .expect("the retried transaction lands on the new shard");
    // In autocommit, a lone write the fence refused is retried once on the new place: the
    // client does not even see the error.
    let fenced = std::time::Instant::now();
    s2.execute(
        "INSERT INTO orders (customer_id, id, note) VALUES ($1, 4, 'retried by the router')",
        &[&moving],
    )
    .await
    .expect("S2 retries the fenced write on the new shard");
    println!(
        "stale_router_fenced_write_retried_ms={}",
        fenced.elapsed().as_millis()
    );
    assert_eq!(
        metric(&router_s2, "pg_router_topology_epoch").await,
        Some(1.0)
    );
    let on_target: Vec<i64> = rows(&shards[2], moving).await.iter().map(|r| r.0).collect();
    assert_eq!(on_target, vec![1, 2, 3, 4]);
    assert_eq!(
        rows(&shards[1], moving).await.len(),
        1,
        "the source kept only its old copy"
    );
    // Writes to other ranges through the stale routers were never affected.
    s2.execute(
        "INSERT INTO orders (customer_id, id, note) VALUES ($1, 5, 'other range')",
        &[&staying],
    )
    .await
    .unwrap();
    assert_eq!(rows(&shards[1], staying).await.len(), 3);
}
