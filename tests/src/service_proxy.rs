//! A Service for tests without kube-proxy: a loopback port that forwards each new connection to
//! the pod a label selector picks now (as a ClusterIP Service follows its endpoints), on that
//! pod's container port of a given name. The instance tests' pods all run on 127.0.0.1, so the
//! port is what tells them apart. The endpoints are re-read from the API server every 100 ms;
//! connections already open stay where they are, as with kube-proxy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// Forwards connections to the selected pod until dropped.
pub struct ServiceProxy {
    port: u16,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ServiceProxy {
    /// Listens on a free loopback port and forwards to the first running pod of `namespace`
    /// matching `selector`, on its container port named `port_name`.
    pub async fn start(
        client: kube::Client,
        namespace: &str,
        selector: &str,
        port_name: &str,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let endpoint: Arc<Mutex<Option<u16>>> = Arc::default();
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let params = ListParams::default().labels(selector);
        let port_name = port_name.to_string();
        let watched = endpoint.clone();
        let follow = tokio::spawn(async move {
            loop {
                if let Ok(list) = pods.list(&params).await {
                    let found = list.items.iter().find_map(|pod| {
                        let running = pod.status.as_ref()?.phase.as_deref() == Some("Running");
                        let port = pod
                            .spec
                            .as_ref()?
                            .containers
                            .iter()
                            .flat_map(|container| container.ports.iter().flatten())
                            .find(|port| port.name.as_deref() == Some(port_name.as_str()))?
                            .container_port;
                        running.then_some(u16::try_from(port).ok()?)
                    });
                    *watched.lock().expect("endpoint lock") = found;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = *endpoint.lock().expect("endpoint lock");
                // No endpoint: the connection is refused, as a Service without endpoints does.
                let Some(target) = target else { continue };
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self {
            port,
            tasks: vec![follow, accept],
        })
    }

    /// The Service's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
