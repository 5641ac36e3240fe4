//! What the high-availability tests share: their time limits, a started cluster with a table,
//! and checks that rows reached an instance.

use std::time::Duration;

use super::{TestCluster, eventually};

/// Bootstrap of a whole cluster.
pub const STARTUP: Duration = Duration::from_secs(120);
/// A failover, switchover or rejoin.
pub const FAILOVER: Duration = Duration::from_secs(60);

/// A cluster of `count` instances (`synchronous` of them synchronous standbys) whose primary
/// is up with every replica streaming, and `sql` run on the primary: the cluster, the primary's
/// index and its pod name.
pub async fn started(
    name: &str,
    count: usize,
    synchronous: u32,
    sql: &str,
) -> (TestCluster, usize, String) {
    let cluster = TestCluster::start(name, count, synchronous).await.unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(count - 1, STARTUP)
        .await
        .unwrap();
    let old_primary = cluster.instances[primary].name.clone();
    cluster
        .connect(primary)
        .await
        .unwrap()
        .batch_execute(sql)
        .await
        .unwrap();
    (cluster, primary, old_primary)
}

/// How many of `ids` instance `index` has in `acked`.
pub async fn count_present(
    cluster: &TestCluster,
    index: usize,
    ids: &[i64],
) -> anyhow::Result<i64> {
    let client = cluster.connect(index).await?;
    let row = client
        .query_one("SELECT count(*) FROM acked WHERE id = ANY($1)", &[&ids])
        .await?;
    Ok(row.get(0))
}

/// Writes row `id` of `acked` through `client` and waits until instance `index` has it.
pub async fn replicated(
    cluster: &TestCluster,
    client: &tokio_postgres::Client,
    index: usize,
    id: i64,
    what: &str,
) {
    client
        .execute("INSERT INTO acked (id) VALUES ($1)", &[&id])
        .await
        .unwrap();
    eventually(what, FAILOVER, || async move {
        count_present(cluster, index, &[id])
            .await
            .is_ok_and(|n| n == 1)
    })
    .await
    .unwrap();
}
