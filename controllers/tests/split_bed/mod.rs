//! The arrangement a ShardSplitJob runs in, shared by the split test and `cargo xtask bench
//! reshard`: TLS-only PostgreSQL 18 shards (the shard clusters issued from one CA, their
//! sharded parent's, as the operator issues them), the Secrets and primary pods the operator and the kubelet would
//! leave, the sharded PostgresCluster `db` with its ShardRanges, and the split controller
//! running in-process so that a test can kill and restart it.

#![allow(dead_code)]

pub mod routers;

use std::collections::BTreeMap;
use std::sync::Arc;

use api::common::ClusterReference;
use api::contract;
use api::postgres_cluster::{
    PostgresCluster, PostgresClusterSpec, ShardKeyType, ShardedTableSpec, ShardingSpec,
    TableGroupSpec,
};
use api::sharding::{
    ShardRange, ShardRangeSpec, ShardRangeState, ShardSplitJob, ShardSplitJobSpec, VindexKind,
};
use controllers::metrics::Metrics;
use controllers::postgres_cluster::{Context, Settings};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use router::vindex::{KeyValue, key_hash};
use serde_json::json;
use testbed::pg_tls::TestCa;
use testbed::{Postgres, PostgresOptions};

/// Password of the shards' superuser (every shard cluster's `<child>-superuser` Secret).
pub const PASSWORD: &str = "shard-superuser-pw";

/// The moving tables of group `customers` (logs is a group of its own, without a primary key).
pub const SCHEMA: &str = "CREATE TABLE orders (customer_id bigint, id bigint, note text,
                              PRIMARY KEY (customer_id, id));
                          CREATE TABLE payments (customer_id bigint, id bigint, amount numeric(12,2),
                              PRIMARY KEY (customer_id, id));
                          CREATE TABLE logs (customer_id bigint, line text)";

/// The split controller, started and killed by the caller (as an operator process would be).
pub struct Operator {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Operator {
    /// Runs the ShardSplitJob controller on `namespace`.
    pub fn start(client: &Client, namespace: &str) -> Self {
        let ctx = Arc::new(Context {
            client: client.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "postgres-operator".into(),
                    instance: Some("test".into()),
                },
            ),
            metrics: Arc::new(Metrics::new()),
            settings: Settings::default(),
        });
        let namespace = namespace.to_string();
        let task = tokio::spawn(async move {
            controllers::shard_split::run(ctx, Some(namespace), std::future::pending()).await
        });
        Self { task: Some(task) }
    }

    /// Kills the controller where it stands (no graceful end of a running step).
    pub async fn kill(&mut self) {
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

/// `count` PostgreSQL 18 shards speaking TLS only, issued as the operator issues the shards of
/// one sharded cluster: shard `i` with a certificate for `db-shard-<i>-rw.<namespace>.svc` from
/// the one CA of the sharded cluster, which each shard also keeps as its `ssl_ca_file` (the
/// file a split's subscription verifies the source with); `wal_level=logical` and `settings`.
pub fn start_shards(
    namespace: &str,
    count: usize,
    settings: &[(&str, &str)],
) -> (TestCa, Vec<Postgres>) {
    let ca = TestCa::new("db CA").expect("a CA");
    let shards = (0..count)
        .map(|i| start_shard(namespace, i, &ca, settings))
        .collect();
    (ca, shards)
}

/// Shard `index` of cluster `db` (TLS only, its certificate and `ssl_ca_file` from `ca`).
pub fn start_shard(
    namespace: &str,
    index: usize,
    ca: &TestCa,
    settings: &[(&str, &str)],
) -> Postgres {
    let name = format!("db-shard-{index}-rw.{namespace}.svc");
    let mut options = PostgresOptions {
        auth_method: "scram-sha-256".into(),
        superuser_password: Some(PASSWORD.into()),
        tls: Some(
            ca.issue(&[&name])
                .expect("a certificate")
                .with_ca_file(ca.pem()),
        ),
        ..PostgresOptions::default()
    }
    .setting("wal_level", "logical");
    for (name, value) in settings {
        options = options.setting(name, value);
    }
    tokio::task::block_in_place(|| Postgres::start_with(options).expect("a shard"))
}

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        ..ObjectMeta::default()
    }
}

/// The `<child>-ca` Secret the operator's TLS stage publishes for shard cluster `child`.
pub async fn ca_secret(client: &Client, namespace: &str, child: &str, ca: &TestCa) {
    let mut secret = Secret {
        metadata: meta(namespace, &contract::tls_ca_secret(child)),
        ..Secret::default()
    };
    secret.data = Some(BTreeMap::from([(
        contract::tls_keys::CA.to_string(),
        ByteString(ca.pem().as_bytes().to_vec()),
    )]));
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("a CA Secret");
}

/// A superuser Secret (`postgres` / [`PASSWORD`]).
pub async fn superuser_secret(client: &Client, namespace: &str, name: &str) {
    let mut secret = Secret {
        metadata: meta(namespace, name),
        ..Secret::default()
    };
    secret.data = Some(BTreeMap::from([
        ("username".to_string(), ByteString(b"postgres".to_vec())),
        (
            "password".to_string(),
            ByteString(PASSWORD.as_bytes().to_vec()),
        ),
    ]));
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("a superuser Secret");
}

/// The primary pod of shard cluster `child`, as its instance manager and the kubelet leave it.
pub async fn primary_pod(client: &Client, namespace: &str, child: &str, port: u16) {
    let name = format!("{child}-0");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {
            contract::LABEL_CLUSTER: child, contract::LABEL_ROLE: contract::role::PRIMARY}},
        "spec": {"containers": [{"name": "postgres", "image": "example.org/pg:18",
            "ports": [{"name": contract::PORT_NAME_POSTGRES, "containerPort": port}]}]}
    }))
    .expect("a pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating a pod");
    let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}], "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("a pod's status");
}

/// A ShardRange of cluster `db`.
pub async fn create_range(
    client: &Client,
    namespace: &str,
    name: &str,
    group: &str,
    shard: &str,
    (start, end): (Option<i64>, Option<i64>),
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
    range.metadata.namespace = Some(namespace.to_string());
    range.metadata.labels = Some(BTreeMap::from([(
        contract::LABEL_CLUSTER.to_string(),
        "db".to_string(),
    )]));
    Api::<ShardRange>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &range)
        .await
        .expect("a ShardRange");
}

/// `spec.sharding` of `db`: group `customers` (orders, payments) and group `logs`.
pub fn sharding() -> ShardingSpec {
    let group = |name: &str| TableGroupSpec {
        name: name.into(),
        vindex: VindexKind::Hash,
        key_type: ShardKeyType::Bigint,
    };
    let table = |name: &str, group: &str| ShardedTableSpec {
        name: name.into(),
        table_group: group.into(),
        shard_key: "customer_id".into(),
        lookups: Vec::new(),
    };
    ShardingSpec {
        shards: 2,
        router: Default::default(),
        table_groups: vec![group("customers"), group("logs")],
        sharded_tables: vec![
            table("orders", "customers"),
            table("payments", "customers"),
            table("logs", "logs"),
        ],
        reference_tables: vec![],
    }
}

/// What the operator writes for the two-shard cluster `db` (the cluster, the superuser
/// Secrets, the CA Secret of every shard in `shards` (the one CA), four ShardRanges: hashes below 0 on shard-0, the rest on
/// shard-1) and the primaries of shards 0 and 1 (`shards[0]`, `shards[1]`).
pub async fn two_shard_cluster(client: &Client, namespace: &str, ca: &TestCa, shards: &[Postgres]) {
    let mut spec = PostgresClusterSpec::with_image(1, "example.org/pg:18");
    spec.sharding = Some(sharding());
    let mut cluster = PostgresCluster::new("db", spec);
    cluster.metadata.namespace = Some(namespace.to_string());
    Api::<PostgresCluster>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &cluster)
        .await
        .expect("the PostgresCluster");
    for i in 0..shards.len() {
        ca_secret(client, namespace, &format!("db-shard-{i}"), ca).await;
    }
    for name in [
        "db-superuser",
        "db-shard-0-superuser",
        "db-shard-1-superuser",
    ] {
        superuser_secret(client, namespace, name).await;
    }
    primary_pod(client, namespace, "db-shard-0", shards[0].port()).await;
    primary_pod(client, namespace, "db-shard-1", shards[1].port()).await;
    for group in ["customers", "logs"] {
        create_range(
            client,
            namespace,
            &format!("db-{group}-0"),
            group,
            "shard-0",
            (None, Some(0)),
        )
        .await;
        create_range(
            client,
            namespace,
            &format!("db-{group}-1"),
            group,
            "shard-1",
            (Some(0), None),
        )
        .await;
    }
}

/// A ShardSplitJob of cluster `db`.
pub fn job(
    name: &str,
    source: &str,
    target: &str,
    split: Option<i64>,
    max_write_pause_millis: i32,
) -> ShardSplitJob {
    ShardSplitJob::new(
        name,
        ShardSplitJobSpec {
            cluster: ClusterReference { name: "db".into() },
            source_range: source.into(),
            split_point: split,
            target_shard: target.into(),
            max_write_pause_millis,
            verify: true,
        },
    )
}

/// The hash of a bigint shard key, as a point in the ranges' space.
pub fn hash_of(key: i64) -> i128 {
    i128::from(key_hash(&KeyValue::Int(key)) as i64)
}

/// Where `key` lives according to `ranges` (the cluster's hash ranges of group customers).
pub fn shard_of(ranges: &[ShardRange], key: i64) -> String {
    let hash = hash_of(key);
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

/// The ShardRanges of the namespace.
pub async fn ranges_in(api: &Api<ShardRange>) -> Vec<ShardRange> {
    api.list(&ListParams::default())
        .await
        .expect("listing ShardRanges")
        .items
}
