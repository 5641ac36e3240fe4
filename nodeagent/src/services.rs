//! What kube-proxy and cluster DNS do: each Service port is served at two places, forwarding each
//! connection to a ready endpoint from the Service's EndpointSlices (written by the real
//! EndpointSlice controller), taking the ready endpoints in turn so that connections spread over
//! all of them:
//! - for clients on the host, a local port on 127.0.0.1 (the demo's psql, the tests);
//! - for pods, the Service's own address on the pod network (the agent's stand-in for its
//!   ClusterIP, on the node's bridge) at the Service's port, with the Service's DNS names
//!   (`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`, `<svc>.<ns>.svc.cluster.local`) in every pod's
//!   `/etc/hosts` (see [`ServiceTable::hosts_entries`]). So a Pooler reaches `<cluster>-rw` by
//!   name, as it does on a real cluster.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

/// A Service port: (namespace, service name, port).
pub type ServiceKey = (String, String, u16);

/// Ready endpoints per Service port, and the local port of each.
#[derive(Default)]
pub struct ServiceTable {
    endpoints: Mutex<BTreeMap<ServiceKey, Vec<SocketAddr>>>,
    local_ports: Mutex<BTreeMap<ServiceKey, u16>>,
    listeners: Mutex<BTreeMap<ServiceKey, Vec<tokio::task::JoinHandle<()>>>>,
    /// The address of each Service (namespace, name) on the pod network.
    addresses: Mutex<BTreeMap<(String, String), Ipv4Addr>>,
}

impl ServiceTable {
    /// The local port forwarding to `namespace/name:port`, once the agent has opened it.
    pub fn local_port(&self, namespace: &str, name: &str, port: u16) -> Option<u16> {
        self.local_ports
            .lock()
            .expect("lock")
            .get(&(namespace.to_string(), name.to_string(), port))
            .copied()
    }

    /// Every Service port and its local port.
    pub fn all(&self) -> BTreeMap<ServiceKey, u16> {
        self.local_ports.lock().expect("lock").clone()
    }

    /// Opens listeners for new Service ports, closes those of deleted ones, and refreshes the
    /// ready endpoints from the EndpointSlices.
    pub async fn sync(
        self: &Arc<Self>,
        client: &kube::Client,
        network: &crate::network::NodeNetwork,
    ) -> anyhow::Result<()> {
        let services = Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let slices = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let mut wanted = BTreeMap::new();
        for service in &services {
            let namespace = service.metadata.namespace.clone().unwrap_or_default();
            let name = service.metadata.name.clone().unwrap_or_default();
            if namespace == "default" && name == "kubernetes" {
                continue;
            }
            let spec = service.spec.clone().unwrap_or_default();
            for port in spec.ports.unwrap_or_default() {
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                let key = (namespace.clone(), name.clone(), number);
                // The slice's ports are named after the Service port's name.
                let mut ready = Vec::new();
                for slice in slices.iter().filter(|slice| {
                    slice.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && slice
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get("kubernetes.io/service-name"))
                            == Some(&name)
                }) {
                    let Some(target) = slice
                        .ports
                        .as_ref()
                        .and_then(|ports| ports.iter().find(|p| p.name == port.name))
                        .and_then(|p| p.port)
                        .and_then(|p| u16::try_from(p).ok())
                    else {
                        continue;
                    };
                    for endpoint in &slice.endpoints {
                        let is_ready = endpoint
                            .conditions
                            .as_ref()
                            .and_then(|c| c.ready)
                            .unwrap_or(true);
                        if !is_ready {
                            continue;
                        }
                        for address in &endpoint.addresses {
                            if let Ok(ip) = address.parse::<std::net::IpAddr>() {
                                ready.push(SocketAddr::new(ip, target));
                            }
                        }
                    }
                }
                wanted.insert(key, ready);
            }
        }
        {
            let mut listeners = self.listeners.lock().expect("lock");
            let mut ports = self.local_ports.lock().expect("lock");
            listeners.retain(|key, tasks| {
                let keep = wanted.contains_key(key);
                if !keep {
                    tasks.iter().for_each(|task| task.abort());
                    ports.remove(key);
                }
                keep
            });
        }
        for key in wanted.keys() {
            if self.listeners.lock().expect("lock").contains_key(key) {
                continue;
            }
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
            let local = listener.local_addr()?.port();
            let address = self.address_of(&key.0, &key.1, network)?;
            let in_pods = tokio::net::TcpListener::bind((address, key.2)).await?;
            eprintln!(
                "node agent: Service {}/{} port {} -> 127.0.0.1:{local}, {address}:{} in pods",
                key.0, key.1, key.2, key.2
            );
            let tasks = vec![
                self.serve(listener, key.clone()),
                self.serve(in_pods, key.clone()),
            ];
            self.listeners
                .lock()
                .expect("lock")
                .insert(key.clone(), tasks);
            self.local_ports
                .lock()
                .expect("lock")
                .insert(key.clone(), local);
        }
        *self.endpoints.lock().expect("lock") = wanted;
        Ok(())
    }
}

impl ServiceTable {
    /// The Service's address on the pod network, added to the bridge on first use.
    fn address_of(
        &self,
        namespace: &str,
        name: &str,
        network: &crate::network::NodeNetwork,
    ) -> anyhow::Result<Ipv4Addr> {
        let mut addresses = self.addresses.lock().expect("lock");
        let key = (namespace.to_string(), name.to_string());
        if let Some(address) = addresses.get(&key) {
            return Ok(*address);
        }
        let address = network.add_service_address(addresses.len())?;
        addresses.insert(key, address);
        Ok(address)
    }

    /// Accepts connections on `listener` and forwards each to a ready endpoint of `serving`.
    fn serve(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        serving: ServiceKey,
    ) -> tokio::task::JoinHandle<()> {
        let table = self.clone();
        tokio::spawn(async move {
            let mut turn = 0usize;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut targets = table
                    .endpoints
                    .lock()
                    .expect("lock")
                    .get(&serving)
                    .cloned()
                    .unwrap_or_default();
                // Each connection starts at the next endpoint (round robin).
                if !targets.is_empty() {
                    let first = turn % targets.len();
                    targets.rotate_left(first);
                    turn = turn.wrapping_add(1);
                }
                tokio::spawn(async move {
                    // As kube-proxy: one ready endpoint per connection (the next one in turn, or
                    // the one after when it refuses); no endpoint closes the connection.
                    for target in targets {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        })
    }

    /// `/etc/hosts` lines for every Service, as cluster DNS would answer a pod in `namespace`
    /// (the short name only for Services of its own namespace).
    pub fn hosts_entries(&self, namespace: &str) -> String {
        let mut lines = String::new();
        for ((service_namespace, name), address) in self.addresses.lock().expect("lock").iter() {
            let full = format!("{name}.{service_namespace}");
            lines.push_str(&format!(
                "{address}\t{full}.svc.cluster.local {full}.svc {full}"
            ));
            if service_namespace == namespace {
                lines.push_str(&format!(" {name}"));
            }
            lines.push('\n');
        }
        lines
    }
}

impl Drop for ServiceTable {
    fn drop(&mut self) {
        for task in self.listeners.lock().expect("lock").values().flatten() {
            task.abort();
        }
    }
}
