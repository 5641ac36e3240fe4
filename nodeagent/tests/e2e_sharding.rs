//! End to end, a sharded PostgresCluster under the real controllers and the node agent, with
//! the operator installed by helm (see `common`): two shards (each a child cluster the operator
//! creates) behind two pg-router replicas; clients reach the router Service over TLS
//! (`verify-full` against the cluster's CA and the router's name), DDL reaches every shard, and
//! a ShardSplitJob moves the upper half of a range onto a third shard the operator provisions,
//! online, while a client keeps writing through the routers: the job succeeds, no acknowledged
//! write is lost, every row is stored once, and the new shard holds the rows of its range.
//! This is the README's "Sharding" walk-through, in the pods a user would run.
//!
//! Needs the workspace's `postgres-operator`, `pg-instance` and `pg-router` binaries next to
//! this test's target folder (`cargo build -p controllers -p instance -p router`; `cargo xtask
//! test` builds them).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    Login, Writer, connect, create_cluster, eventually, lost_writes, secret_value, stack,
};
use kube::api::Api;
use serde_json::json;

const NAMESPACE: &str = "e2e-sharding";
const PARENT: &str = "shop";

/// The child cluster that runs `shard` (the operator's naming: `<parent>-<shard>`).
fn shard_cluster(shard: &str) -> String {
    format!("{PARENT}-{shard}")
}

/// A login to the router Service: the parent's superuser password, verify-full against the
/// parent's CA and the router Service's name.
async fn router_login(client: &kube::Client) -> anyhow::Result<Login> {
    let password = secret_value(
        client,
        NAMESPACE,
        &api::contract::superuser_secret(PARENT),
        "password",
    )
    .await?;
    let ca_pem = secret_value(
        client,
        NAMESPACE,
        &api::contract::tls_ca_secret(PARENT),
        api::contract::tls_keys::CA,
    )
    .await?;
    let server_name = format!("{}.{NAMESPACE}.svc", api::contract::router_service(PARENT));
    Ok(Login {
        password,
        tls: testbed::pg_tls::VerifyFull::new(&ca_pem, &server_name)?,
        ca_pem,
        server_name,
    })
}

/// The ids stored on shard `shard`, read from its own `-rw` Service with its own credentials.
async fn ids_on(e2e: &common::E2e, client: &kube::Client, shard: &str) -> anyhow::Result<Vec<i64>> {
    let cluster = shard_cluster(shard);
    let login = common::superuser_login(client, NAMESPACE, &cluster).await?;
    let port = e2e.service_port(NAMESPACE, &api::contract::rw_service(&cluster))?;
    let shard_client = common::connect_writable(port, &login).await?;
    Ok(shard_client
        .query("SELECT id FROM events ORDER BY id", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// The ShardSplitJob's phase, step and conditions, for waiting and failure messages.
async fn job_state(client: &kube::Client, name: &str) -> anyhow::Result<(String, String)> {
    let jobs: Api<api::sharding::ShardSplitJob> = Api::namespaced(client.clone(), NAMESPACE);
    let job = jobs.get(name).await?;
    let status = job.status.unwrap_or_default();
    let conditions: Vec<String> = status
        .conditions
        .iter()
        .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
        .collect();
    Ok((
        status.phase.unwrap_or_default(),
        format!(
            "step {:?}, pause {:?} ms, {}",
            status.step,
            status.write_pause_millis,
            conditions.join("; ")
        ),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sharded_cluster_serves_through_its_routers_and_splits_a_range_online()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let clusters = create_cluster(
        &client,
        NAMESPACE,
        PARENT,
        json!({
            "postgresql": {"parameters": {"shared_buffers": "32MB", "max_prepared_transactions": "20"}},
            "sharding": {
                "shards": 2,
                "router": {"replicas": 2},
                "tableGroups": [{"name": "events", "vindex": "hash", "keyType": "bigint"}],
                "shardedTables": [{"name": "events", "tableGroup": "events", "shardKey": "id"}],
                "referenceTables": ["kinds"]
            }
        }),
    )
    .await?;
    for shard in ["shard-0", "shard-1"] {
        e2e.wait_healthy(
            &clusters,
            &shard_cluster(shard),
            None,
            Duration::from_secs(240),
        )
        .await?;
    }
    eventually(
        "the sharded parent to be Healthy",
        Duration::from_secs(120),
        || async {
            let status = clusters.get(PARENT).await?.status.unwrap_or_default();
            let phase = status.phase.unwrap_or_default();
            Ok(if phase == "Healthy" {
                Ok(())
            } else {
                Err(phase)
            })
        },
    )
    .await?;

    // Through the router Service (two router pods behind it), as an application would.
    let login = router_login(&client).await?;
    let router_port = e2e.service_port(NAMESPACE, &api::contract::router_service(PARENT))?;
    let router = eventually(
        "the router Service to answer (verify-full)",
        Duration::from_secs(120),
        || async {
            Ok(match connect(router_port, &login).await {
                Ok(router) => match router.simple_query("SELECT 1").await {
                    Ok(_) => Ok(router),
                    Err(error) => Err(format!("{error:?}")),
                },
                Err(error) => Err(format!("{error:#}")),
            })
        },
    )
    .await?;
    router
        .batch_execute(
            "CREATE TABLE events (id bigint PRIMARY KEY, note text);
             CREATE TABLE kinds (code text PRIMARY KEY);
             INSERT INTO kinds (code) VALUES ('a'), ('b')",
        )
        .await?;
    for id in 1..=400i64 {
        router
            .execute("INSERT INTO events (id, note) VALUES ($1, 'seed')", &[&id])
            .await?;
    }
    // DDL and writes reached both shards: each holds the reference table and part of the rows.
    let before: BTreeMap<&str, Vec<i64>> = BTreeMap::from([
        ("shard-0", ids_on(&e2e, &client, "shard-0").await?),
        ("shard-1", ids_on(&e2e, &client, "shard-1").await?),
    ]);
    assert!(
        before.values().all(|ids| !ids.is_empty()),
        "both shards hold rows: {:?}",
        before
            .iter()
            .map(|(s, ids)| (s, ids.len()))
            .collect::<Vec<_>>()
    );
    assert_eq!(before.values().map(Vec::len).sum::<usize>(), 400);

    // Split the range of shard-0 onto a new shard-2 while a client keeps writing.
    let writer = Writer::start(router_port, &login, "events");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let job = json!({"apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "ShardSplitJob",
                     "metadata": {"name": "split-0", "namespace": NAMESPACE},
                     "spec": {"cluster": {"name": PARENT},
                              "sourceRange": format!("{PARENT}-events-0"),
                              "targetShard": "shard-2",
                              "maxWritePauseMillis": 2000}});
    testbed::manifests::apply(&client, &job, NAMESPACE).await?;
    let split_started = std::time::Instant::now();
    let outcome = eventually(
        "the ShardSplitJob to end",
        Duration::from_secs(420),
        || async {
            let (phase, detail) = job_state(&client, "split-0").await?;
            Ok(match phase.as_str() {
                "Succeeded" | "Failed" | "RolledBack" => Ok((phase, detail)),
                _ => Err(format!("{phase}: {detail}")),
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acknowledged, outage) = writer.stop().await?;
    let (phase, detail) = match outcome {
        Ok(done) => done,
        Err(error) => anyhow::bail!(
            "{error:#}\n{}\n{}",
            e2e.cluster_logs(NAMESPACE, &shard_cluster("shard-2"), 1),
            common::tail(&e2e.operator_lines(NAMESPACE, "split-0"), 40)
        ),
    };
    assert_eq!(phase, "Succeeded", "the split ended {phase}: {detail}");
    println!(
        "e2e_split_seconds={:.1} e2e_split_acknowledged_writes={} e2e_split_longest_write_outage_ms={} ({detail})",
        split_started.elapsed().as_secs_f64(),
        acknowledged.len(),
        outage.as_millis()
    );
    assert!(
        acknowledged.len() > 10,
        "the writer kept writing: {}",
        acknowledged.len()
    );

    // Nothing acknowledged is lost (read through the routers), and every row is stored once:
    // the three shards together hold exactly the seeded and acknowledged ids.
    let lost = lost_writes(router_port, &login, "events", &acknowledged).await?;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let mut stored = Vec::new();
    let mut after = BTreeMap::new();
    for shard in ["shard-0", "shard-1", "shard-2"] {
        let ids = ids_on(&e2e, &client, shard).await?;
        stored.extend(ids.iter().copied());
        after.insert(shard, ids);
    }
    let sizes: BTreeMap<&str, usize> = after.iter().map(|(s, ids)| (*s, ids.len())).collect();
    stored.sort_unstable();
    let stored_count = stored.len();
    stored.dedup();
    assert_eq!(
        stored_count,
        stored.len(),
        "a row is stored on two shards: {sizes:?}"
    );
    // A write whose acknowledgement was lost with its connection may be stored; never a row
    // nobody wrote.
    let unwritten: Vec<&i64> = stored
        .iter()
        .filter(|id| !(1..=400).contains(*id) && **id < 1_000_000)
        .collect();
    assert!(unwritten.is_empty(), "rows nobody wrote: {unwritten:?}");
    // The seeded rows of shard-0 are now split between shard-0 and shard-2; shard-1's stayed.
    let seeded = |ids: &Vec<i64>| ids.iter().filter(|id| **id <= 400).count();
    assert!(
        seeded(&after["shard-2"]) > 0 && seeded(&after["shard-0"]) > 0,
        "the split moved part of shard-0's rows to shard-2: {sizes:?}"
    );
    assert_eq!(
        seeded(&after["shard-0"]) + seeded(&after["shard-2"]),
        before["shard-0"].len(),
        "shard-0's seeded rows are on shard-0 or shard-2"
    );
    assert_eq!(
        after["shard-1"].iter().filter(|id| **id <= 400).count(),
        before["shard-1"].len()
    );
    let router = connect(router_port, &login).await?;
    let through_router: i64 = router
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    assert_eq!(
        through_router as usize,
        stored.len(),
        "the routers read every shard once"
    );
    Ok(())
}
