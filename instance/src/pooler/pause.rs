//! PAUSE / RESUME of the cluster's Poolers around a primary change, driven by the instance
//! managers (they alone know the moment before the primary stops and the moment the new one is
//! writable):
//!
//! 1. The primary, before its switchover checkpoint, sends `PAUSE` to every PgBouncer of the
//!    cluster's Poolers and waits (at most the Pooler's `pauseTimeoutSeconds`) until their
//!    in-flight transactions are done; new transactions queue in PgBouncer instead of failing.
//!    A completed PAUSE has also closed every server connection, so none to the former primary
//!    is ever reused.
//! 2. After the hand-over, it probes the cluster's rw Service (as the pooler auth role) until it
//!    answers writable, that is until the Service routes to the new primary; then `RESUME`. If
//!    that takes longer than `pauseTimeoutSeconds` since the PAUSE, it resumes anyway and
//!    clients see the errors.
//! 3. A new primary (switchover or failover) sends `RESUME` to every Pooler once the rw Service
//!    answers writable: this resumes Poolers a crashed former primary left paused.
//!
//! No `RECONNECT`: on a Pooler the other side already resumed it cuts server logins in flight,
//! which PgBouncer reports to the waiting clients as failed logins (seen in the tests).
//!
//! The admin console is PgBouncer's own port, database `pgbouncer`, user `pgbouncer_auth` (the
//! Pooler config lists it in `admin_users`), with the password of the pooler auth Secret.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::contract;
use api::pooler::Pooler;
use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tokio_postgres::config::SslMode;
use tracing::{info, warn};

/// How often the rw Service is probed while Poolers are paused (clients wait for the first
/// writable answer; one probe is one SCRAM login, a few milliseconds of CPU).
const PROBE_PERIOD: Duration = Duration::from_millis(50);
/// Deadline of one admin or probe connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One PgBouncer pod of one of the cluster's Poolers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Pod name.
    pub pod: String,
    /// Its admin console address (pod IP, PgBouncer port).
    pub address: SocketAddr,
    /// Longest hold (`spec.pgbouncer.pauseTimeoutSeconds` of its Pooler).
    pub pause_timeout: Duration,
    /// With the cluster's TLS on: the cluster's CA file and the Pooler's Service name
    /// (`<pooler>.<namespace>.svc`), which PgBouncer's own certificate carries. PgBouncer then
    /// takes TLS clients only (by default), its admin console included.
    pub tls: Option<RwTls>,
}

/// The Poolers of one cluster, as the instance manager reaches them.
#[derive(Clone)]
pub struct Poolers {
    client: Client,
    namespace: String,
    cluster: String,
    /// `host:port` of the cluster's rw Service (what the Poolers point at).
    rw_address: String,
    /// How the probe of the rw Service verifies it; `None` when the cluster has no TLS.
    rw_tls: Option<RwTls>,
}

/// TLS of the probe of the rw Service: the cluster's CA (the mounted server Secret's `ca.crt`,
/// read at each probe so that a renewal is seen) and the Service's name the certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RwTls {
    /// The CA certificate file.
    pub ca_file: PathBuf,
    /// The name the server certificate must carry (`<cluster>-rw.<namespace>.svc`).
    pub server_name: String,
}

/// Poolers caught by a PAUSE, with what is needed to resume them.
#[derive(Debug, Clone)]
pub struct Paused {
    /// PgBouncer pods that were told to PAUSE.
    pub targets: Vec<Target>,
    /// When the PAUSE was sent.
    pub since: Instant,
    password: String,
}

impl Poolers {
    /// The Poolers of `cluster` in `namespace`; `rw_address` is the rw Service (`host:port`),
    /// probed over TLS verified by `rw_tls` when the cluster has TLS.
    pub fn new(
        client: Client,
        namespace: &str,
        cluster: &str,
        rw_address: &str,
        rw_tls: Option<RwTls>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            rw_address: rw_address.to_string(),
            rw_tls,
        }
    }

    /// The running PgBouncer pods of every Pooler of the cluster, and the auth password; `None`
    /// when the cluster has no Pooler (or its auth Secret is not there yet).
    pub async fn discover(&self) -> Option<(Vec<Target>, String)> {
        let found = tokio::time::timeout(Duration::from_secs(5), self.discover_unbounded()).await;
        match found {
            Ok(Ok(found)) => found,
            Ok(Err(error)) => {
                warn!(%error, "listing the cluster's Poolers failed; no PAUSE/RESUME this time");
                None
            }
            Err(_) => {
                warn!("listing the cluster's Poolers timed out; no PAUSE/RESUME this time");
                None
            }
        }
    }

    async fn discover_unbounded(&self) -> Result<Option<(Vec<Target>, String)>, kube::Error> {
        let poolers: Api<Pooler> = Api::namespaced(self.client.clone(), &self.namespace);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut targets = Vec::new();
        let list = match poolers.list(&ListParams::default()).await {
            Ok(list) => list,
            // No Pooler CRD installed: no Pooler either.
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
            Err(error) => return Err(error),
        };
        for pooler in list {
            if pooler.spec.cluster.name != self.cluster {
                continue;
            }
            let selector = format!("{}={}", contract::LABEL_POOLER, pooler.name_any());
            let timeout =
                Duration::from_secs(pooler.spec.pgbouncer.pause_timeout_seconds.max(1) as u64);
            for pod in pods.list(&ListParams::default().labels(&selector)).await? {
                if let Some(address) = admin_address(&pod) {
                    targets.push(Target {
                        pod: pod.name_any(),
                        address,
                        pause_timeout: timeout,
                        tls: self.rw_tls.as_ref().map(|rw| RwTls {
                            ca_file: rw.ca_file.clone(),
                            server_name: format!("{}.{}.svc", pooler.name_any(), self.namespace),
                        }),
                    });
                }
            }
        }
        if targets.is_empty() {
            return Ok(None);
        }
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let Some(secret) = secrets
            .get_opt(&contract::pooler_auth_secret(&self.cluster))
            .await?
        else {
            return Ok(None);
        };
        let password = secret
            .data
            .and_then(|data| data.get("password").cloned())
            .and_then(|bytes| String::from_utf8(bytes.0).ok());
        Ok(password.map(|password| (targets, password)))
    }

    /// PAUSEs every PgBouncer of the cluster's Poolers, in parallel, each waiting at most its
    /// pause timeout for its in-flight transactions. Returns what to resume later (also the
    /// Poolers whose PAUSE did not finish in time: they are half-paused).
    pub async fn pause(&self) -> Option<Paused> {
        let (targets, password) = self.discover().await?;
        let since = Instant::now();
        let results = join_all(targets.iter().map(|target| {
            let password = password.clone();
            async move {
                let outcome = tokio::time::timeout(
                    target.pause_timeout,
                    admin_command(target, &password, "PAUSE"),
                )
                .await;
                (target, outcome)
            }
        }))
        .await;
        for (target, outcome) in results {
            match outcome {
                Ok(Ok(())) => {
                    info!(pod = %target.pod, waited_ms = since.elapsed().as_millis() as u64, "pooler paused")
                }
                Ok(Err(error)) => warn!(pod = %target.pod, %error, "PAUSE of a pooler failed"),
                Err(_) => {
                    warn!(pod = %target.pod, "PAUSE of a pooler did not finish in its pause timeout; going on")
                }
            }
        }
        Some(Paused {
            targets,
            since,
            password,
        })
    }

    /// In the background: once the rw Service answers writable, RESUME `paused`;
    /// each Pooler is resumed anyway when its pause timeout (counted from the PAUSE) runs out.
    pub fn resume_when_writable(&self, paused: Paused) {
        let rw_address = self.rw_address.clone();
        let rw_tls = self.rw_tls.clone();
        tokio::spawn(async move {
            resume_when_writable(&rw_address, rw_tls.as_ref(), paused).await;
        });
    }

    /// For a new primary: in the background, RESUME every Pooler of the cluster
    /// once the rw Service answers writable (or after the pause timeout).
    pub fn resume_all_when_writable(&self) {
        let poolers = self.clone();
        tokio::spawn(async move {
            if let Some((targets, password)) = poolers.discover().await {
                let paused = Paused {
                    targets,
                    since: Instant::now(),
                    password,
                };
                resume_when_writable(&poolers.rw_address, poolers.rw_tls.as_ref(), paused).await;
            }
        });
    }
}

async fn resume_when_writable(rw_address: &str, rw_tls: Option<&RwTls>, paused: Paused) {
    let mut waiting = paused.targets.clone();
    while !waiting.is_empty() {
        let writable = is_writable(rw_address, rw_tls, &paused.password).await;
        let elapsed = paused.since.elapsed();
        let (due, rest): (Vec<Target>, Vec<Target>) = waiting
            .into_iter()
            .partition(|target| writable || elapsed >= target.pause_timeout);
        waiting = rest;
        if !writable && !due.is_empty() {
            warn!(pods = ?due.iter().map(|t| &t.pod).collect::<Vec<_>>(), "the rw Service is not writable within the pause timeout; resuming poolers anyway");
        }
        join_all(due.iter().map(|target| resume(target, &paused))).await;
        if !waiting.is_empty() {
            tokio::time::sleep(PROBE_PERIOD).await;
        }
    }
}

async fn resume(target: &Target, paused: &Paused) {
    let password = &paused.password;
    match admin_command(target, password, "RESUME").await {
        Ok(()) => {
            let held_ms = paused.since.elapsed().as_millis() as u64;
            info!(pod = %target.pod, held_ms, "pooler resumed")
        }
        // It was not paused (a new primary resumes every pooler, paused or not).
        Err(error) if error.contains("not paused") => {}
        Err(error) => warn!(pod = %target.pod, %error, "RESUME of a pooler failed"),
    }
}

/// Whether a connection through the rw Service reaches a server that accepts writes (over TLS
/// verified by `tls` when given: a cluster with TLS refuses clients without it).
pub async fn is_writable(rw_address: &str, tls: Option<&RwTls>, password: &str) -> bool {
    let Some((host, port)) = rw_address.rsplit_once(':') else {
        return false;
    };
    let Ok(port) = port.parse::<u16>() else {
        return false;
    };
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(contract::POOLER_AUTH_USER)
        .password(password)
        .dbname("postgres")
        .application_name("pg-instance-pooler-probe")
        .connect_timeout(CONNECT_TIMEOUT);
    let probe = async {
        let tls = tls.map(|tls| (tls.ca_file.as_path(), tls.server_name.as_str()));
        let (client, _) = super::client::connect(&mut config, tls, SslMode::Require, None)
            .await
            .ok()?;
        let rows = client
            .simple_query("SELECT pg_catalog.pg_is_in_recovery()")
            .await
            .ok()?;
        rows.iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(|value| value == "f"),
            _ => None,
        })
    };
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// Runs one admin console command; the error is PgBouncer's message (no secret in it). With the
/// cluster's TLS on, over TLS verified against the cluster's CA and the Pooler's name when
/// PgBouncer offers it (a Pooler with `clientTLS: Disabled` answers in plain text).
async fn admin_command(target: &Target, password: &str, command: &str) -> Result<(), String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(target.address.ip().to_string())
        .port(target.address.port())
        .user(contract::POOLER_AUTH_USER)
        .password(password)
        .dbname("pgbouncer")
        .connect_timeout(CONNECT_TIMEOUT);
    let tls = target
        .tls
        .as_ref()
        .map(|tls| (tls.ca_file.as_path(), tls.server_name.as_str()));
    let connected = async {
        super::client::connect(&mut config, tls, SslMode::Prefer, None)
            .await
            .map(|(client, _)| client)
    };
    let client = tokio::time::timeout(CONNECT_TIMEOUT, connected)
        .await
        .map_err(|_| "connecting to the admin console timed out".to_string())??;
    client
        .simple_query(command)
        .await
        .map(|_| ())
        .map_err(|error| super::client::describe(&error))
}

/// PgBouncer's address on a running pod: its IP and the container port named
/// [`contract::PORT_NAME_PGBOUNCER`].
fn admin_address(pod: &Pod) -> Option<SocketAddr> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_ref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some(contract::PORT_NAME_PGBOUNCER))?
        .container_port;
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_is_the_pod_ip_and_the_pgbouncer_port_of_a_running_pod() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pool-1"},
            "spec": {"containers": [{"name": "pgbouncer", "ports": [
                {"name": "metrics", "containerPort": 9127},
                {"name": "pgbouncer", "containerPort": 6432}
            ]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7"}
        }))
        .unwrap();
        assert_eq!(admin_address(&pod), Some("10.0.0.7:6432".parse().unwrap()));
        pod.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(admin_address(&pod), None);
    }
}
