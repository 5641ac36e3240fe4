//! Pod networking: one Linux bridge per node agent (`10.244.N.1/24` on the host), one network
//! namespace per pod joined to it by a veth pair, so every pod has its own IP and the standard
//! ports, as a CNI plugin would give it.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, bail};

/// Pods take the host numbers below this one on the /24; Service addresses the ones from it up.
const FIRST_SERVICE_HOST: u8 = 200;

/// The node's pod network: a bridge and its /24.
#[derive(Debug)]
pub struct NodeNetwork {
    bridge: String,
    subnet: u8,
    next_host: std::sync::atomic::AtomicU8,
}

impl NodeNetwork {
    /// Creates a bridge on a free `10.244.N.0/24` (the bridge's name is the lock against other
    /// agents on this machine).
    pub fn create() -> anyhow::Result<Self> {
        let start = (std::process::id() % 200) as u8;
        for offset in 0..200u8 {
            let subnet = 20 + (start.wrapping_add(offset) % 200);
            let bridge = format!("nab{subnet}");
            if !ip(&["link", "add", &bridge, "type", "bridge"])? {
                continue;
            }
            let gateway = format!("10.244.{subnet}.1/24");
            run_ip(&["addr", "add", &gateway, "dev", &bridge])?;
            run_ip(&["link", "set", &bridge, "up"])?;
            return Ok(Self {
                bridge,
                subnet,
                next_host: std::sync::atomic::AtomicU8::new(2),
            });
        }
        bail!("no free 10.244.N.0/24 for the node's pod network")
    }

    /// The host's address on the pod network.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }

    /// Adds the `index`th Service address (from the top of the /24 down) to the bridge, where
    /// the agent listens for that Service as kube-proxy would; the address.
    pub fn add_service_address(&self, index: usize) -> anyhow::Result<Ipv4Addr> {
        let host = 254usize
            .checked_sub(index)
            .filter(|host| *host >= usize::from(FIRST_SERVICE_HOST))
            .with_context(|| format!("no Service address left on {}", self.cidr()))?;
        let address = Ipv4Addr::new(10, 244, self.subnet, host as u8);
        run_ip(&["addr", "add", &format!("{address}/32"), "dev", &self.bridge])?;
        Ok(address)
    }

    /// The pod CIDR (for the Node's spec).
    pub fn cidr(&self) -> String {
        format!("10.244.{}.0/24", self.subnet)
    }

    /// Creates the network namespace of a pod with its own address; returns it.
    pub fn add_pod(&self) -> anyhow::Result<PodNetwork> {
        let host = self
            .next_host
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if host >= FIRST_SERVICE_HOST {
            bail!("the node's pod network {} is full", self.cidr());
        }
        let address = Ipv4Addr::new(10, 244, self.subnet, host);
        let namespace = format!("na{}-{host}", self.subnet);
        let host_side = format!("nav{}h{host}", self.subnet);
        let pod_side = format!("nav{}p{host}", self.subnet);
        let _ = ip(&["netns", "del", &namespace]);
        run_ip(&["netns", "add", &namespace])?;
        run_ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &pod_side,
        ])?;
        run_ip(&["link", "set", &host_side, "master", &self.bridge, "up"])?;
        run_ip(&["link", "set", &pod_side, "netns", &namespace])?;
        let in_pod = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &namespace, "ip"];
            all.extend_from_slice(args);
            run_ip(&all)
        };
        in_pod(&["link", "set", "lo", "up"])?;
        in_pod(&["link", "set", &pod_side, "name", "eth0"])?;
        in_pod(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
        in_pod(&["link", "set", "eth0", "up"])?;
        // No default route on purpose: a pod reaches its peers on the /24 and the API server
        // through an address on its own loopback, and nothing else. A lookup or a connection to
        // any other address fails at once inside the pod instead of leaving through the host.
        Ok(PodNetwork {
            namespace,
            host_side,
            address,
        })
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A pod's network namespace; removed on drop.
#[derive(Debug)]
pub struct PodNetwork {
    namespace: String,
    host_side: String,
    address: Ipv4Addr,
}

impl PodNetwork {
    /// The pod's IP.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Name of the network namespace (`ip netns exec <name>`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Adds `address` to the pod's loopback (a Service IP the pod reaches through a listener of
    /// the agent bound inside the pod's namespace).
    pub fn add_local_address(&self, address: Ipv4Addr) -> anyhow::Result<()> {
        run_ip(&[
            "netns",
            "exec",
            &self.namespace,
            "ip",
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
        ])
    }

    /// Connects the pod to the bridge (`true`) or cuts it off (`false`): the host side of its
    /// veth pair goes down, so every packet to and from the pod is dropped, as in a network
    /// partition (connections hang rather than fail).
    pub fn set_connected(&self, connected: bool) -> anyhow::Result<()> {
        let state = if connected { "up" } else { "down" };
        run_ip(&["link", "set", &self.host_side, state])
    }

    /// Binds a TCP listener inside the pod's network namespace.
    pub fn listen(&self, address: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
        let path = format!("/var/run/netns/{}", self.namespace);
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<std::net::TcpListener> {
                    let target =
                        std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                    // SAFETY: setns on this short-lived thread only; the socket keeps the
                    // namespace it was created in.
                    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns {path}: {}", std::io::Error::last_os_error());
                    }
                    let listener = std::net::TcpListener::bind(address)
                        .with_context(|| format!("binding {address} in {path}"))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the setns thread panicked"))?
        })
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_side]);
        let _ = ip(&["netns", "del", &self.namespace]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<bool> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    Ok(output.status.success())
}

fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
