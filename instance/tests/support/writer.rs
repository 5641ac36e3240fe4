//! A writer that follows the Lease holder (as a client of the `-rw` Service would) and records
//! every acknowledged commit: what the failover and chaos benchmarks check for lost writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use super::{TestCluster, connect_port};

/// How long the quorum waits may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// How the writer finds the primary: the Lease holder and each instance's port.
#[derive(Clone)]
pub struct Route {
    leases: Api<Lease>,
    lease: String,
    ports: Vec<(String, u16)>,
}

impl Route {
    pub fn of(cluster: &TestCluster) -> Self {
        Self {
            leases: Api::namespaced(cluster.client.clone(), &cluster.namespace),
            lease: api::contract::lease_name(&cluster.name),
            ports: cluster
                .instances
                .iter()
                .map(|instance| (instance.name.clone(), instance.pg_port))
                .collect(),
        }
    }

    pub async fn primary_port(&self) -> Option<u16> {
        let holder = self
            .leases
            .get_opt(&self.lease)
            .await
            .ok()??
            .spec?
            .holder_identity?;
        self.ports
            .iter()
            .find(|(name, _)| *name == holder)
            .map(|(_, port)| *port)
    }
}

/// One acknowledged commit: its id and when the acknowledgement came.
pub type Ack = (i64, Instant);

/// Writes one row every 10 ms to the Lease holder until `stop`; returns the acknowledged ones.
async fn write_to_holder(route: Route, ids: Arc<AtomicI64>, stop: Arc<AtomicBool>) -> Vec<Ack> {
    let mut acknowledged = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::SeqCst) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            if let Some(port) = route.primary_port().await {
                client = tokio::time::timeout(Duration::from_millis(500), connect_port(port))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
        }
        if let Some(connected) = &client {
            let id = ids.fetch_add(1, Ordering::SeqCst);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let insert = connected.execute("INSERT INTO bench (id) VALUES ($1)", &params);
            match tokio::time::timeout(Duration::from_millis(1000), insert).await {
                Ok(Ok(_)) => acknowledged.push((id, Instant::now())),
                _ => client = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acknowledged
}

/// A writer running in the background.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Ack>>,
}

impl Writer {
    pub fn start(cluster: &TestCluster, ids: &Arc<AtomicI64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write_to_holder(
            Route::of(cluster),
            ids.clone(),
            stop.clone(),
        ));
        Self { stop, task }
    }

    /// Stops the writer; returns its acknowledged commits, and how many of them the primary
    /// `index` lacks.
    pub async fn finish(
        self,
        cluster: &TestCluster,
        index: usize,
    ) -> anyhow::Result<(Vec<Ack>, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        let acknowledged = self.task.await?;
        let ids: Vec<i64> = acknowledged.iter().map(|(id, _)| *id).collect();
        let present: i64 = cluster
            .connect(index)
            .await?
            .query_one("SELECT count(*) FROM bench WHERE id = ANY($1)", &[&ids])
            .await?
            .get(0);
        Ok((acknowledged, (ids.len() as i64 - present).max(0) as u64))
    }
}

/// Waits until the primary has both replicas in its synchronous set and streaming (the state a
/// failover must start from for the quorum to be seen).
pub async fn wait_for_full_quorum(cluster: &TestCluster) -> anyhow::Result<usize> {
    let primary = cluster.wait_for_primary_with_replicas(2, TIMEOUT).await?;
    super::eventually(
        "both replicas synchronous and streaming",
        TIMEOUT,
        || async {
            cluster.status(primary).await.is_some_and(|status| {
                status.synchronous_standbys.len() == 2 && status.streaming_replicas.len() == 2
            })
        },
    )
    .await?;
    Ok(primary)
}
