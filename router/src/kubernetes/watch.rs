//! The acting half of Kubernetes mode: watches the cluster, its ShardRanges, the shards'
//! primary pods and their Leases, rebuilds the topology on every change and reloads it when it
//! differs; reads them all again when a session asks (a shard's fence said this router's epoch
//! is old). The shards' CA Secrets are read again every [`CA_RECHECK`] (the router's Role may
//! `get` them, not watch them), so a rotated CA reaches the router without waiting for another
//! change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use api::sharding::ShardRange;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use super::topology;
use super::trust::TrustedCas;
use crate::frontend::session::RouterState;
use crate::topology::Topology;

/// A topology, the fingerprint of the objects it was built from, and each ShardRange's epoch
/// (by uid).
type Built = (Topology, String, BTreeMap<String, i64>);

/// Changes closer together than this are applied as one reload.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// How often the shards' CA Secrets are read again (one `get` a shard).
const CA_RECHECK: Duration = Duration::from_secs(10);

/// Errors of Kubernetes mode.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The API server could not be reached or refused a call.
    #[error("reading {what} from the API server: {source}")]
    Kube {
        /// What was read.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// No complete topology appeared in time.
    #[error("no usable topology for PostgresCluster {cluster} after {seconds} s: {reason}")]
    NotReady {
        /// The cluster.
        cluster: String,
        /// How long the router waited.
        seconds: u64,
        /// Why the last attempt failed.
        reason: String,
    },
}

/// Where a router in Kubernetes mode reads its topology.
#[derive(Clone)]
pub struct KubernetesSource {
    client: Client,
    namespace: String,
    cluster: String,
    /// The CAs trusted per shard, across a rotation.
    trusted: Arc<std::sync::Mutex<TrustedCas>>,
    /// The client's read timeout, which the watches stay below (see [`super::watch_config`]).
    api_timeout: Duration,
}

/// The holder of each of `cluster`'s shard Leases: child cluster name -> pod name. A released
/// Lease (a switchover hands it over) has no holder and is left out.
fn holders(cluster: &str, leases: &[Arc<Lease>]) -> BTreeMap<String, String> {
    leases
        .iter()
        .filter_map(|lease| {
            let (child, holder) = shard_lease(cluster, lease)?;
            Some((child, holder?))
        })
        .collect()
}

/// The shard cluster of `cluster` whose Lease `lease` is, and the pod holding it; `None` for any
/// other Lease of the namespace.
fn shard_lease(cluster: &str, lease: &Lease) -> Option<(String, Option<String>)> {
    // `contract::lease_name(child)` is the child's name and a fixed suffix.
    let child = lease
        .metadata
        .name
        .as_deref()?
        .strip_suffix(&contract::lease_name(""))?;
    if !child.starts_with(&format!("{cluster}-shard-")) {
        return None;
    }
    let holder = lease
        .spec
        .as_ref()
        .and_then(|spec| spec.holder_identity.clone())
        .filter(|holder| !holder.is_empty());
    Some((child.to_string(), holder))
}

/// The primaries of `cluster`'s shards from their pods (the instance manager labels its own pod
/// `role=primary` when it holds the shard's Lease): child cluster name -> (pod IP, PostgreSQL
/// port). A terminating pod is skipped, and so is a pod labelled primary while its shard's Lease
/// names another pod (`holders`): a primary cut off from the API server cannot take its label
/// off, and another pod has taken over. Without a holder (a Lease handed over), of two pods
/// labelled primary a ready one wins.
fn primaries(
    cluster: &str,
    pods: &[Arc<Pod>],
    holders: &BTreeMap<String, String>,
) -> BTreeMap<String, (String, u16)> {
    let prefix = format!("{cluster}-shard-");
    let mut found: BTreeMap<String, ((String, u16), bool)> = BTreeMap::new();
    for pod in pods {
        let Some(child) = pod.labels().get(contract::LABEL_CLUSTER) else {
            continue;
        };
        let stale = holders
            .get(child)
            .is_some_and(|holder| pod.metadata.name.as_deref() != Some(holder.as_str()));
        if !child.starts_with(&prefix)
            || pod.labels().get(contract::LABEL_ROLE).map(String::as_str)
                != Some(contract::role::PRIMARY)
            || pod.metadata.deletion_timestamp.is_some()
            || stale
        {
            continue;
        }
        let Some(address) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let port = pod
            .spec
            .iter()
            .flat_map(|spec| &spec.containers)
            .flat_map(|container| container.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(contract::PORT_NAME_POSTGRES))
            .map_or(contract::POSTGRES_PORT, |p| p.container_port as u16);
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let better = found
            .get(child)
            .is_none_or(|(_, was_ready)| ready && !was_ready);
        if better {
            found.insert(child.clone(), ((address, port), ready));
        }
    }
    found
        .into_iter()
        .map(|(child, (endpoint, _))| (child, endpoint))
        .collect()
}

/// A watch of `api` (narrowed by `config`) that keeps `writer`'s store current and opens
/// again, with kube's default backoff, after an error.
fn reflected<K>(
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Clone + Default + Eq + std::hash::Hash,
{
    reflector::reflector(writer, watcher(api, config)).default_backoff()
}

/// Label selector of primary pods.
fn primary_selector() -> String {
    format!("{}={}", contract::LABEL_ROLE, contract::role::PRIMARY)
}

impl KubernetesSource {
    /// The source for PostgresCluster `cluster` in `namespace`.
    pub fn new(client: Client, namespace: &str, cluster: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            trusted: Arc::default(),
            api_timeout: super::DEFAULT_API_TIMEOUT,
        }
    }

    /// The read timeout of the client given to [`Self::new`] (made by [`super::client`]).
    pub fn with_api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = timeout;
        self
    }

    /// The namespaced API of `K` in the cluster's namespace.
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn kube_error(&self, what: &str) -> impl FnOnce(kube::Error) -> WatchError {
        let what = format!("{what} of {}/{}", self.namespace, self.cluster);
        move |source| WatchError::Kube { what, source }
    }

    /// Reads everything once and builds the topology.
    async fn read(&self) -> Result<Result<Built, String>, WatchError> {
        let cluster = self
            .api::<PostgresCluster>()
            .get_opt(&self.cluster)
            .await
            .map_err(self.kube_error("the PostgresCluster"))?;
        let Some(cluster) = cluster else {
            return Ok(Err(format!("PostgresCluster {} not found", self.cluster)));
        };
        let ranges = self
            .api::<ShardRange>()
            .list(&Default::default())
            .await
            .map_err(self.kube_error("the ShardRanges"))?
            .items;
        let pods: Vec<Arc<Pod>> = self
            .api::<Pod>()
            .list(&kube::api::ListParams::default().labels(&primary_selector()))
            .await
            .map_err(self.kube_error("the primary pods"))?
            .items
            .into_iter()
            .map(Arc::new)
            .collect();
        let leases: Vec<Arc<Lease>> = self
            .api::<Lease>()
            .list(&Default::default())
            .await
            .map_err(self.kube_error("the shards' Leases"))?
            .items
            .into_iter()
            .map(Arc::new)
            .collect();
        let holders = holders(&self.cluster, &leases);
        let ca_pems = self.ca_pems(&pods, &holders).await?;
        Ok(self.build(&cluster, &ranges, &pods, &holders, &ca_pems))
    }

    /// The CA certificates each shard cluster that has a primary may chain to: `ca.crt` of its
    /// `<child>-ca` Secret (absent when the cluster's TLS is disabled or the Secret is not
    /// written yet; [`topology::secure`] decides whether that is a problem), and a CA it
    /// replaced during the overlap of a rotation ([`TrustedCas`]).
    async fn ca_pems(
        &self,
        pods: &[Arc<Pod>],
        holders: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, WatchError> {
        let secrets: Api<Secret> = self.api();
        let mut pems = BTreeMap::new();
        for child in primaries(&self.cluster, pods, holders).into_keys() {
            let name = contract::tls_ca_secret(&child);
            let secret = secrets
                .get_opt(&name)
                .await
                .map_err(self.kube_error(&format!("Secret {name}")))?;
            let pem = secret
                .and_then(|s| s.data)
                .and_then(|mut data| data.remove(contract::tls_keys::CA))
                .and_then(|bytes| String::from_utf8(bytes.0).ok());
            if let Some(pem) = pem {
                pems.insert(child, pem);
            }
        }
        let mut trusted = self
            .trusted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(trusted.update(pems, std::time::Instant::now()))
    }

    /// The topology, a fingerprint of what it was built from, and the epoch of each range.
    fn build(
        &self,
        cluster: &PostgresCluster,
        ranges: &[ShardRange],
        pods: &[Arc<Pod>],
        holders: &BTreeMap<String, String>,
        ca_pems: &BTreeMap<String, String>,
    ) -> Result<Built, String> {
        let primaries = primaries(&self.cluster, pods, holders);
        let topology = topology::build(cluster, ranges, &primaries)
            .and_then(|topology| topology::secure(topology, cluster, ca_pems))
            .map_err(|e| e.to_string())?;
        let mut placement: Vec<String> = ranges
            .iter()
            .filter(|r| r.spec.cluster.name == self.cluster)
            .map(|r| serde_json::to_string(&r.spec).unwrap_or_default())
            .collect();
        placement.sort();
        // The CAs too: a rotated CA must reach the endpoints.
        let fingerprint = format!(
            "{}|{:?}|{}|{:?}|{:?}",
            serde_json::to_string(&cluster.spec.sharding).unwrap_or_default(),
            cluster.spec.tls.mode,
            placement.join(","),
            primaries,
            ca_pems
        );
        // By uid: a range deleted and created again under its name starts its epochs anew.
        let epochs = ranges
            .iter()
            .filter(|r| r.spec.cluster.name == self.cluster)
            .map(|r| (r.uid().unwrap_or_else(|| r.name_any()), r.spec.epoch))
            .collect();
        Ok((topology, fingerprint, epochs))
    }

    /// Waits (up to `timeout`) for a complete topology: the cluster, ranges that cover every
    /// table group, and a ready primary for every shard.
    pub async fn initial_topology(&self, timeout: Duration) -> Result<Topology, WatchError> {
        let started = tokio::time::Instant::now();
        loop {
            let reason = match self.read().await {
                Ok(Ok((topology, _, _))) => return Ok(topology),
                Ok(Err(reason)) => reason,
                Err(error) => error.to_string(),
            };
            if started.elapsed() > timeout {
                return Err(WatchError::NotReady {
                    cluster: self.cluster.clone(),
                    seconds: timeout.as_secs(),
                    reason,
                });
            }
            tracing::info!(cluster = %self.cluster, %reason, "waiting for a complete topology");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Follows changes forever: every change of the cluster, a ShardRange or a primary pod
    /// rebuilds the topology; a different one is swapped in, an incomplete one is logged and
    /// skipped (the router keeps routing by the last complete topology).
    pub async fn follow(self, state: Arc<RouterState>) {
        let (clusters, clusters_writer) = reflector::store::<PostgresCluster>();
        let (ranges, ranges_writer) = reflector::store::<ShardRange>();
        let (pods, pods_writer) = reflector::store::<Pod>();
        let (leases, leases_writer) = reflector::store::<Lease>();
        let cluster_stream = reflected(
            clusters_writer,
            self.api(),
            super::watch_config(self.api_timeout)
                .fields(&format!("metadata.name={}", self.cluster)),
        )
        .map(|_| ());
        let range_stream = reflected(
            ranges_writer,
            self.api(),
            super::watch_config(self.api_timeout),
        )
        .map(|_| ());
        let pod_stream = reflected(
            pods_writer,
            self.api(),
            super::watch_config(self.api_timeout).labels(&primary_selector()),
        )
        .map(|_| ());
        // A Lease changes at every renewal (every few seconds a shard): only a new holder counts.
        let cluster = self.cluster.clone();
        let mut seen_holders = BTreeMap::new();
        let lease_stream = reflected(
            leases_writer,
            self.api(),
            super::watch_config(self.api_timeout),
        )
        .touched_objects()
        .filter_map(move |lease| {
            let changed = lease
                .ok()
                .and_then(|lease| shard_lease(&cluster, &lease))
                .is_some_and(|(child, holder)| {
                    seen_holders.insert(child, holder.clone()) != Some(holder)
                });
            futures::future::ready(changed.then_some(()))
        });
        let mut changes = futures::stream::select_all(vec![
            cluster_stream.boxed(),
            range_stream.boxed(),
            pod_stream.boxed(),
            lease_stream.boxed(),
        ]);
        let stores = Stores {
            clusters,
            ranges,
            pods,
            leases,
        };
        let mut applied = Applied::default();
        let mut ca_recheck = tokio::time::interval(CA_RECHECK);
        ca_recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Fault injection for tests: a router whose watch lags behind (it routes by its first
        // topology until a shard's fence makes it read the objects again).
        let ignore_watch =
            std::env::var("PG_ROUTER_FAULT").as_deref() == Ok("ignore_topology_watch");
        loop {
            tokio::select! {
                change = changes.next() => {
                    if change.is_none() {
                        break;
                    }
                    // Let a burst of changes (a split flips two ranges) settle into one reload.
                    tokio::time::sleep(DEBOUNCE).await;
                    while let Some(Some(())) = futures::FutureExt::now_or_never(changes.next()) {}
                    if ignore_watch {
                        continue;
                    }
                    if let Err(error) = self.apply(&state, &stores, &mut applied).await {
                        tracing::warn!(cluster = %self.cluster, %error, "reading the shards' CA Secrets; keeping the current topology");
                    }
                }
                _ = ca_recheck.tick() => {
                    if ignore_watch {
                        continue;
                    }
                    // A rotated CA: the fingerprint holds the PEMs, so only a change reloads.
                    if let Err(error) = self.apply(&state, &stores, &mut applied).await {
                        tracing::debug!(cluster = %self.cluster, %error, "reading the shards' CA Secrets again");
                    }
                }
                () = state.refresh_requested() => {
                    let ticket = state.refresh_ticket();
                    self.refresh(&state, &mut applied).await;
                    state.refresh_done(ticket);
                }
            }
        }
    }

    /// Reads the cluster, its ShardRanges and the primaries again now (a shard's fence said
    /// this router routes by an old epoch: the watch may lag behind), and applies them.
    async fn refresh(&self, state: &RouterState, applied: &mut Applied) {
        match self.read().await {
            Ok(Ok((topology, fingerprint, epochs))) => {
                tracing::info!(cluster = %self.cluster, epoch = topology.epoch, "topology re-read on request");
                applied.apply(state, &self.cluster, topology, fingerprint, epochs);
            }
            Ok(Err(reason)) => {
                tracing::warn!(cluster = %self.cluster, %reason, "incomplete topology on a re-read; keeping the current one")
            }
            Err(error) => {
                tracing::warn!(cluster = %self.cluster, %error, "re-reading the topology failed")
            }
        }
    }

    /// Builds the topology from the watched objects (and the shards' CA Secrets, read now) and
    /// applies it when it is complete and new; fails only when a CA Secret cannot be read.
    async fn apply(
        &self,
        state: &RouterState,
        stores: &Stores,
        applied: &mut Applied,
    ) -> Result<(), WatchError> {
        let pods = stores.pods.state();
        let holders = holders(&self.cluster, &stores.leases.state());
        let ca_pems = self.ca_pems(&pods, &holders).await?;
        let Some(cluster) = stores
            .clusters
            .state()
            .into_iter()
            .find(|c| c.name_any() == self.cluster)
        else {
            return Ok(());
        };
        let ranges: Vec<ShardRange> = stores
            .ranges
            .state()
            .iter()
            .map(|r| (**r).clone())
            .collect();
        match self.build(&cluster, &ranges, &pods, &holders, &ca_pems) {
            Ok((topology, fingerprint, epochs)) => {
                applied.last_error.clear();
                applied.apply(state, &self.cluster, topology, fingerprint, epochs);
            }
            Err(reason) => {
                if applied.last_error != reason {
                    tracing::warn!(cluster = %self.cluster, %reason, "incomplete topology; keeping the current one");
                    applied.last_error = reason;
                }
            }
        }
        Ok(())
    }
}

/// What the watches of [`KubernetesSource::follow`] hold.
struct Stores {
    clusters: Store<PostgresCluster>,
    ranges: Store<ShardRange>,
    pods: Store<Pod>,
    leases: Store<Lease>,
}

/// What the router applied last, from the watch or a re-read.
#[derive(Default)]
struct Applied {
    /// Fingerprint of the objects of the topology in use.
    fingerprint: String,
    /// The last reason a topology could not be built (logged once).
    last_error: String,
    /// The highest epoch seen of each ShardRange (by uid).
    epochs: BTreeMap<String, i64>,
}

impl Applied {
    /// Swaps `topology` in when it differs from the one in use, unless it is older: a re-read
    /// can see a flip before the watch does, and the watch must not take it back.
    fn apply(
        &mut self,
        state: &RouterState,
        cluster: &str,
        topology: Topology,
        fingerprint: String,
        epochs: BTreeMap<String, i64>,
    ) {
        if let Some((range, seen)) = epochs.iter().find_map(|(range, epoch)| {
            let seen = *self.epochs.get(range)?;
            (seen > *epoch).then_some((range, seen))
        }) {
            tracing::debug!(cluster, %range, seen, "the watch lags behind a re-read; waiting for it");
            return;
        }
        for (range, epoch) in epochs {
            self.epochs.insert(range, epoch);
        }
        // The first one too: something may have changed since the initial topology.
        if self.fingerprint != fingerprint {
            let epoch = topology.epoch;
            state.reload(topology);
            tracing::info!(cluster, epoch, "topology from Kubernetes applied");
            self.fingerprint = fingerprint;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, child: &str, ip: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {
                    contract::LABEL_CLUSTER: child, contract::LABEL_ROLE: contract::role::PRIMARY}},
                "status": {"podIP": ip, "conditions": [
                    {"type": "Ready", "status": if ready { "True" } else { "False" }}]},
            }))
            .unwrap(),
        )
    }

    fn lease(child: &str, holder: Option<&str>) -> Arc<Lease> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": contract::lease_name(child)},
                "spec": {"holderIdentity": holder},
            }))
            .unwrap(),
        )
    }

    fn addresses(pods: &[Arc<Pod>], leases: &[Arc<Lease>]) -> Vec<(String, String)> {
        primaries("db", pods, &holders("db", leases))
            .into_iter()
            .map(|(child, (address, _))| (child, address))
            .collect()
    }

    #[test]
    fn the_lease_holder_is_the_primary_of_two_pods_labelled_primary() {
        // Both labelled and ready (the old primary is cut off from the API server and keeps its
        // label), in either order: the Lease decides.
        let old = pod("db-shard-0-0", "db-shard-0", "10.0.0.1", true);
        let new = pod("db-shard-0-1", "db-shard-0", "10.0.0.2", true);
        for pods in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
            assert_eq!(
                addresses(&pods, &[lease("db-shard-0", Some("db-shard-0-1"))]),
                [("db-shard-0".to_string(), "10.0.0.2".to_string())]
            );
            assert_eq!(
                addresses(&pods, &[lease("db-shard-0", Some("db-shard-0-0"))]),
                [("db-shard-0".to_string(), "10.0.0.1".to_string())]
            );
        }
    }

    #[test]
    fn a_pod_labelled_primary_that_does_not_hold_the_lease_is_no_primary() {
        // The new holder has not labelled itself yet: no primary for that shard (the router
        // keeps its last complete topology) rather than the stale one.
        let old = pod("db-shard-0-0", "db-shard-0", "10.0.0.1", true);
        let other = pod("db-shard-1-0", "db-shard-1", "10.0.1.1", true);
        assert_eq!(
            addresses(&[old, other], &[lease("db-shard-0", Some("db-shard-0-1"))]),
            [("db-shard-1".to_string(), "10.0.1.1".to_string())]
        );
    }

    #[test]
    fn without_a_holder_a_ready_pod_wins_and_other_clusters_leases_do_not_count() {
        let unready = pod("db-shard-0-0", "db-shard-0", "10.0.0.1", false);
        let ready = pod("db-shard-0-1", "db-shard-0", "10.0.0.2", true);
        let leases = [
            lease("db-shard-0", None),
            lease("db", Some("db-shard-0-0")),
            lease("other-shard-0", Some("db-shard-0-0")),
        ];
        assert!(holders("db", &leases).is_empty());
        assert_eq!(
            addresses(&[unready, ready], &leases),
            [("db-shard-0".to_string(), "10.0.0.2".to_string())]
        );
    }
}
