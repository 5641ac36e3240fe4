//! ShardSplitJob on a real API server with real PostgreSQL 18 shards and the split controller
//! running in-process: pre-flight refusals with clear reasons, a rollback when the job is
//! deleted before its cut-over (with an operator killed mid-copy), and a split under a steady
//! write load that survives an operator restart and leaves every acknowledged row exactly once,
//! on the shard its range names.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use api::common::ClusterReference;
use api::contract;
use api::postgres_cluster::{
    PostgresCluster, ShardKeyType, ShardedTableSpec, ShardingSpec, TableGroupSpec,
};
use api::sharding::{
    ShardRange, ShardRangeSpec, ShardRangeState, ShardSplitJob, ShardSplitJobSpec, SplitStep,
    VindexKind,
};
use common::{Env, spec};
use controllers::metrics::Metrics;
use controllers::postgres_cluster::{Context, Settings};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, ResourceExt};
use router::vindex::{KeyValue, key_hash};
use serde_json::json;
use testbed::pg_tls::TestCa;
use testbed::{Postgres, PostgresOptions};

const PASSWORD: &str = "shard-superuser-pw";

/// The split controller, started and killed by the test (as an operator process would be).
struct Operator {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Operator {
    fn start(env: &Env) -> Self {
        let ctx = Arc::new(Context {
            client: env.client.clone(),
            recorder: Recorder::new(
                env.client.clone(),
                Reporter {
                    controller: "postgres-operator".into(),
                    instance: Some("test".into()),
                },
            ),
            metrics: Arc::new(Metrics::new()),
            settings: Settings::default(),
        });
        let namespace = env.namespace.clone();
        let task = tokio::spawn(async move {
            controllers::shard_split::run(ctx, Some(namespace), std::future::pending()).await
        });
        Self { task: Some(task) }
    }

    /// Kills the controller where it stands (no graceful end of a running step).
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn meta(env: &Env, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(env.namespace.clone()),
        ..ObjectMeta::default()
    }
}

/// The primary pod of shard cluster `child`, as its instance manager and the kubelet leave it.
async fn primary_pod(env: &Env, child: &str, port: u16) {
    let name = format!("{child}-0");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            contract::LABEL_CLUSTER: child, contract::LABEL_ROLE: contract::role::PRIMARY}},
        "spec": {"containers": [{"name": "postgres", "image": "example.org/pg:18",
            "ports": [{"name": contract::PORT_NAME_POSTGRES, "containerPort": port}]}]}
    }))
    .unwrap();
    let pods: Api<Pod> = env.api();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}], "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn secret(env: &Env, name: &str) {
    let mut secret = Secret {
        metadata: meta(env, name),
        ..Secret::default()
    };
    secret.data = Some(BTreeMap::from([
        ("username".to_string(), ByteString(b"postgres".to_vec())),
        (
            "password".to_string(),
            ByteString(PASSWORD.as_bytes().to_vec()),
        ),
    ]));
    env.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

async fn range(
    env: &Env,
    name: &str,
    group: &str,
    shard: &str,
    start: Option<i64>,
    end: Option<i64>,
) {
    let mut range = ShardRange::new(
        name,
        ShardRangeSpec {
            cluster: ClusterReference { name: "db".into() },
            table_group: group.into(),
            shard: shard.into(),
            start,
            end,
            state: ShardRangeState::Active,
            vindex: VindexKind::Hash,
            epoch: 0,
        },
    );
    range.metadata.namespace = Some(env.namespace.clone());
    range.metadata.labels = Some(BTreeMap::from([(
        contract::LABEL_CLUSTER.to_string(),
        "db".to_string(),
    )]));
    env.api::<ShardRange>()
        .create(&PostParams::default(), &range)
        .await
        .unwrap();
}

fn job(name: &str, source: &str, target: &str, split: Option<i64>) -> ShardSplitJob {
    ShardSplitJob::new(
        name,
        ShardSplitJobSpec {
            cluster: ClusterReference { name: "db".into() },
            source_range: source.into(),
            split_point: split,
            target_shard: target.into(),
            max_write_pause_millis: 5000,
            verify: true,
        },
    )
}

async fn create_job(env: &Env, job: ShardSplitJob) -> ShardSplitJob {
    env.api::<ShardSplitJob>()
        .create(&PostParams::default(), &job)
        .await
        .expect("creating the ShardSplitJob")
}

/// Holds the job's barrier table on `shard` locked, so that the job's CopySnapshot step stops
/// where it first writes it (before the slot): the place the tests kill the operator.
async fn block_copy(shard: &Postgres, job: &ShardSplitJob) -> tokio_postgres::Client {
    let barrier = controllers::shard_split::plan::barrier_table(&job.uid().unwrap());
    let client = shard.client().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {barrier} (id int PRIMARY KEY, seq bigint NOT NULL);
             INSERT INTO {barrier} VALUES (1, 0)"
        ))
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {barrier} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    client
}

/// Holds the job's barrier row on `shard` locked, so that the target never confirms a catch-up:
/// the job stays in CatchUp (its copy done) until the returned session ends its transaction.
async fn block_catch_up(shard: &Postgres, job: &ShardSplitJob) -> tokio_postgres::Client {
    let barrier = controllers::shard_split::plan::barrier_table(&job.uid().unwrap());
    let client = shard.client().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {barrier} (id int PRIMARY KEY, seq bigint NOT NULL);
             INSERT INTO {barrier} VALUES (1, 0)"
        ))
        .await
        .unwrap();
    client
        .batch_execute(&format!("BEGIN; SELECT * FROM {barrier} FOR UPDATE"))
        .await
        .unwrap();
    client
}

/// The job once `check` holds for it.
async fn job_where(
    env: &Env,
    name: &str,
    what: &str,
    check: impl Fn(&ShardSplitJob) -> bool,
) -> ShardSplitJob {
    let api = env.api::<ShardSplitJob>();
    env.eventually(what, || {
        let api = api.clone();
        let check = &check;
        async move {
            let job = api.get_opt(name).await.ok()??;
            let found = check(&job).then_some(job.clone());
            if found.is_none() && std::env::var_os("SPLIT_TEST_TRACE").is_some() {
                eprintln!("{name}: {:?}", job.status);
            }
            found
        }
    })
    .await
}

fn phase(job: &ShardSplitJob) -> Option<&str> {
    job.status.as_ref()?.phase.as_deref()
}

fn step(job: &ShardSplitJob) -> Option<SplitStep> {
    job.status.as_ref()?.step
}

fn condition_message(job: &ShardSplitJob) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Where `key` lives according to `ranges` (the cluster's hash ranges of group customers).
fn shard_of(ranges: &[ShardRange], key: i64) -> String {
    let hash = i128::from(key_hash(&KeyValue::Int(key)) as i64);
    ranges
        .iter()
        .filter(|r| r.spec.table_group == "customers" && r.spec.state != ShardRangeState::Retired)
        .find(|r| {
            r.spec.start.is_none_or(|s| i128::from(s) <= hash)
                && r.spec.end.is_none_or(|e| hash < i128::from(e))
        })
        .map(|r| r.spec.shard.clone())
        .expect("a range holds every hash")
}

async fn ranges(env: &Env) -> Vec<ShardRange> {
    ranges_in(&env.api()).await
}

async fn ranges_in(api: &Api<ShardRange>) -> Vec<ShardRange> {
    api.list(&ListParams::default()).await.unwrap().items
}

async fn rows(shard: &Postgres, table: &str) -> Vec<(i64, i64)> {
    shard
        .client()
        .await
        .unwrap()
        .query(&format!("SELECT customer_id, id FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn scalar(shard: &Postgres, sql: &str) -> i64 {
    shard
        .client()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

const SCHEMA: &str = "CREATE TABLE orders (customer_id bigint, id bigint, note text,
                          PRIMARY KEY (customer_id, id));
                      CREATE TABLE payments (customer_id bigint, id bigint, amount numeric(12,2),
                          PRIMARY KEY (customer_id, id));
                      CREATE TABLE logs (customer_id bigint, line text)";

/// Writes rows to the shard the current ShardRanges name, re-reading them before each write
/// and retrying a write the fence refuses (40001); returns the acknowledged keys.
async fn write_load(
    ranges: Api<ShardRange>,
    urls: BTreeMap<String, String>,
    stop: Arc<AtomicBool>,
    first_id: i64,
) -> (Vec<(i64, i64)>, usize) {
    let mut clients = BTreeMap::new();
    for (shard, url) in &urls {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        clients.insert(shard.clone(), client);
    }
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let mut id = first_id;
    while !stop.load(Ordering::Relaxed) {
        id += 1;
        let key = id % 97;
        loop {
            let layout = ranges_in(&ranges).await;
            let shard = shard_of(&layout, key);
            let client = &clients[&shard];
            let result = client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO orders VALUES ({key}, {id}, 'n');
                     INSERT INTO payments VALUES ({key}, {id}, 1.5); COMMIT"
                ))
                .await;
            match result {
                Ok(()) => break,
                Err(error)
                    if error.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) =>
                {
                    let _ = client.batch_execute("ROLLBACK").await;
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => panic!("write of key {key} to {shard} failed: {error:?}"),
            }
        }
        acknowledged.push((key, id));
    }
    (acknowledged, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_splits_online_refuses_bad_jobs_and_rolls_back_when_deleted() {
    let env = Env::without_controller("split").await;
    // The shards speak TLS only, as the operator's clusters do, each shard cluster with its own
    // CA (the test plays the operator's TLS stage: the certificates and the `<child>-ca`
    // Secrets); the split controller verifies each like pg-router does.
    let cas: Vec<TestCa> = (0..3)
        .map(|i| TestCa::new(&format!("db-shard-{i} CA")).unwrap())
        .collect();
    let shards: Vec<Postgres> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|i| {
                let name = format!("db-shard-{i}-rw.{}.svc", env.namespace);
                let options = PostgresOptions {
                    auth_method: "scram-sha-256".into(),
                    superuser_password: Some(PASSWORD.into()),
                    tls: Some(cas[i].issue(&[&name]).unwrap()),
                    ..PostgresOptions::default()
                }
                .setting("wal_level", "logical");
                Postgres::start_with(options).expect("a shard")
            })
            .collect()
    });
    for (i, ca) in cas.iter().enumerate() {
        let mut secret = Secret {
            metadata: meta(&env, &contract::tls_ca_secret(&format!("db-shard-{i}"))),
            ..Secret::default()
        };
        secret.data = Some(BTreeMap::from([(
            contract::tls_keys::CA.to_string(),
            ByteString(ca.pem().as_bytes().to_vec()),
        )]));
        env.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    for shard in &shards[..2] {
        shard
            .client()
            .await
            .unwrap()
            .batch_execute(SCHEMA)
            .await
            .unwrap();
    }

    // What the operator writes for a two-shard cluster, and the shards' primaries.
    let mut cluster_spec = spec(1, "example.org/pg:18");
    cluster_spec.sharding = Some(ShardingSpec {
        shards: 2,
        router: Default::default(),
        table_groups: vec![
            TableGroupSpec {
                name: "customers".into(),
                vindex: VindexKind::Hash,
                key_type: ShardKeyType::Bigint,
            },
            TableGroupSpec {
                name: "logs".into(),
                vindex: VindexKind::Hash,
                key_type: ShardKeyType::Bigint,
            },
        ],
        sharded_tables: vec![
            ShardedTableSpec {
                name: "orders".into(),
                table_group: "customers".into(),
                shard_key: "customer_id".into(),
            },
            ShardedTableSpec {
                name: "payments".into(),
                table_group: "customers".into(),
                shard_key: "customer_id".into(),
            },
            ShardedTableSpec {
                name: "logs".into(),
                table_group: "logs".into(),
                shard_key: "customer_id".into(),
            },
        ],
        reference_tables: vec![],
    });
    env.create_cluster("db", cluster_spec).await;
    for name in [
        "db-superuser",
        "db-shard-0-superuser",
        "db-shard-1-superuser",
    ] {
        secret(&env, name).await;
    }
    primary_pod(&env, "db-shard-0", shards[0].port()).await;
    primary_pod(&env, "db-shard-1", shards[1].port()).await;
    range(
        &env,
        "db-customers-0",
        "customers",
        "shard-0",
        None,
        Some(0),
    )
    .await;
    range(
        &env,
        "db-customers-1",
        "customers",
        "shard-1",
        Some(0),
        None,
    )
    .await;
    range(&env, "db-logs-0", "logs", "shard-0", None, Some(0)).await;
    range(&env, "db-logs-1", "logs", "shard-1", Some(0), None).await;
    // The load's own connections use the shards' Unix sockets (TCP takes TLS clients only).
    let urls: BTreeMap<String, String> = (0..3)
        .map(|i| {
            (
                format!("shard-{i}"),
                format!(
                    "{} password={PASSWORD}",
                    shards[i].connection_string("postgres")
                ),
            )
        })
        .collect();
    // Initial rows, each on the shard its range names.
    {
        let layout = ranges(&env).await;
        for key in 0..97i64 {
            let shard = shard_of(&layout, key);
            let index: usize = shard.trim_start_matches("shard-").parse().unwrap();
            shards[index]
                .client()
                .await
                .unwrap()
                .batch_execute(&format!(
                    "INSERT INTO orders VALUES ({key}, 0, 'seed'); INSERT INTO payments VALUES ({key}, 0, 2)"
                ))
                .await
                .unwrap();
        }
    }
    let mut operator = Operator::start(&env);

    // (b) Pre-flight refusals, each with a condition that names the problem.
    create_job(&env, job("unknown", "db-customers-9", "shard-2", None)).await;
    create_job(&env, job("outside", "db-customers-0", "shard-2", Some(5))).await;
    create_job(&env, job("nokey", "db-logs-0", "shard-1", None)).await;
    for (name, expected) in [
        ("unknown", "ShardRange db-customers-9 does not exist"),
        ("outside", "spec.splitPoint 5 is not strictly inside"),
        ("nokey", "table logs has no primary key"),
    ] {
        let refused = job_where(&env, name, &format!("{name} refused"), |j| {
            phase(j) == Some("Failed")
        })
        .await;
        let message = condition_message(&refused);
        assert!(message.contains(expected), "{name}: {message}");
    }
    assert_eq!(
        ranges(&env).await.len(),
        4,
        "a refused job changes no range"
    );

    // (d) Rollback: a split of db-customers-1 onto shard-0, held in CatchUp (the target never
    // confirms a barrier) after its copy, then deleted before cut-over.
    let before_0 = rows(&shards[0], "orders").await.len();
    let undo = create_job(&env, job("undo", "db-customers-1", "shard-0", None)).await;
    let hold = block_catch_up(&shards[0], &undo).await;
    job_where(&env, "undo", "undo catching up", |j| {
        step(j) == Some(SplitStep::CatchUp) && condition_message(j).contains("behind")
    })
    .await;
    assert!(
        env.api::<ShardRange>()
            .get_opt("undo-moving")
            .await
            .unwrap()
            .is_some(),
        "the Plan step split the range"
    );
    assert!(
        rows(&shards[0], "orders").await.len() > before_0,
        "rows were copied to the target"
    );
    assert_eq!(
        scalar(&shards[1], "SELECT count(*) FROM pg_replication_slots").await,
        1
    );
    env.api::<ShardSplitJob>()
        .delete("undo", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    hold.batch_execute("ROLLBACK").await.unwrap();
    env.eventually("the undone job is gone", || async {
        env.api::<ShardSplitJob>()
            .get_opt("undo")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let after = ranges(&env).await;
    let customers_1 = after
        .iter()
        .find(|r| r.name_any() == "db-customers-1")
        .unwrap();
    assert_eq!(
        (
            customers_1.spec.start,
            customers_1.spec.end,
            customers_1.spec.shard.as_str()
        ),
        (Some(0), None, "shard-1"),
        "merged back"
    );
    assert!(after.iter().all(|r| r.name_any() != "undo-moving"));
    assert_eq!(
        rows(&shards[0], "orders").await.len(),
        before_0,
        "copied rows removed"
    );
    assert_eq!(
        scalar(&shards[1], "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(
        scalar(&shards[1], "SELECT count(*) FROM pg_publication").await,
        0
    );
    assert_eq!(
        scalar(&shards[0], "SELECT count(*) FROM pg_subscription").await,
        0
    );

    // (a) + (c): split db-customers-0 onto a new shard-2 under a steady write load, with the
    // operator killed in the middle of the copy and started again.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let api = env.api::<ShardRange>();
        let stop = stop.clone();
        let urls = urls.clone();
        tokio::spawn(async move { write_load(api, urls, stop, 1000).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let split = create_job(&env, job("split", "db-customers-0", "shard-2", None)).await;
    let hold = block_copy(&shards[2], &split).await;
    // The new shard's cluster appears with a copy of the superuser Secret; the test plays its
    // primary once asked for.
    env.object::<PostgresCluster>("db-shard-2").await;
    let target_secret: Secret = env.object("db-shard-2-superuser").await;
    assert_eq!(
        target_secret.data.unwrap()["password"].0,
        PASSWORD.as_bytes()
    );
    primary_pod(&env, "db-shard-2", shards[2].port()).await;
    job_where(&env, "split", "split copying", |j| {
        step(j) == Some(SplitStep::CopySnapshot)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    operator.kill().await;
    hold.batch_execute("ROLLBACK").await.unwrap();
    operator = Operator::start(&env);
    let done = job_where(&env, "split", "split succeeded", |j| {
        matches!(phase(j), Some("Succeeded" | "RolledBack" | "Failed"))
    })
    .await;
    assert_eq!(
        phase(&done),
        Some("Succeeded"),
        "{}",
        condition_message(&done)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, refused) = load.await.unwrap();
    let status = done.status.clone().unwrap();
    let pause = status.write_pause_millis.expect("writePauseMillis");
    println!(
        "split: rowsCopied={:?} writePauseMillis={pause} acknowledged={} refused_by_fence={refused}",
        status.rows_copied,
        acknowledged.len()
    );
    assert!(status.rows_copied.unwrap_or(0) > 0, "{status:?}");
    assert!(
        acknowledged.len() > 20,
        "the load ran: {}",
        acknowledged.len()
    );

    // Every acknowledged row (and every seed row) exists exactly once, on the shard its
    // range names now.
    let layout = ranges(&env).await;
    let moving = layout
        .iter()
        .find(|r| r.name_any() == "split-moving")
        .unwrap();
    assert_eq!(
        (
            moving.spec.shard.as_str(),
            moving.spec.state,
            moving.spec.epoch
        ),
        ("shard-2", ShardRangeState::Active, 1)
    );
    let source = layout
        .iter()
        .find(|r| r.name_any() == "db-customers-0")
        .unwrap();
    assert_eq!(source.spec.end, moving.spec.start);
    let mut expected: BTreeSet<(i64, i64)> = acknowledged.iter().copied().collect();
    expected.extend((0..97).map(|key| (key, 0)));
    for table in ["orders", "payments"] {
        let mut seen: BTreeMap<(i64, i64), Vec<String>> = BTreeMap::new();
        for (index, shard) in shards.iter().enumerate() {
            for row in rows(shard, table).await {
                seen.entry(row).or_default().push(format!("shard-{index}"));
            }
        }
        assert_eq!(
            seen.keys().copied().collect::<BTreeSet<_>>(),
            expected,
            "{table}: rows lost or invented"
        );
        for ((key, id), places) in &seen {
            assert_eq!(
                places,
                &vec![shard_of(&layout, *key)],
                "{table} row ({key}, {id}) is not once on its range's shard"
            );
        }
    }
    // The source keeps the fence: a stale write to the moved range is refused with 40001.
    let moved_key = (0..97)
        .find(|k| shard_of(&layout, *k) == "shard-2")
        .unwrap();
    let stale = shards[0]
        .client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO orders VALUES ({moved_key}, -1, 'stale')"
        ))
        .await
        .unwrap_err();
    assert_eq!(
        stale.code(),
        Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
    );
    assert!(
        format!("{stale:?}").contains("moved to shard-2 (routing epoch 1)"),
        "{stale:?}"
    );
    assert_eq!(
        scalar(&shards[0], "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(
        scalar(&shards[2], "SELECT count(*) FROM pg_subscription").await,
        0
    );
    operator.kill().await;
}
