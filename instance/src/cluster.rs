//! The instance's view of the Kubernetes objects of its cluster: the Lease, the member pods, the
//! Secrets, the fence annotations. Every call has a deadline, so that a partition turns into an
//! error quickly instead of a hang.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use api::contract;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::error::{Error, Result};
use crate::status::InstanceStatus;

/// Container port name of PostgreSQL on instance pods (defaults to 5432 when absent).
pub use api::contract::PORT_NAME_POSTGRES;
/// Container port name of the instance manager's HTTP endpoints (defaults to 8000 when absent).
pub use api::contract::PORT_NAME_STATUS;

/// One instance pod of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Pod name.
    pub name: String,
    /// Pod IP, once it has one.
    pub ip: Option<String>,
    /// PostgreSQL port.
    pub postgres_port: u16,
    /// HTTP status port.
    pub http_port: u16,
    /// Its published status, when any.
    pub status: Option<InstanceStatus>,
    /// Its pod annotations.
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes access for one instance.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    namespace: String,
    cluster: String,
    pod: String,
    timeout: Duration,
    recorder: Recorder,
}

impl Cluster {
    /// Wraps a client; every call gives up after `timeout`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        cluster: &str,
        pod: &str,
        timeout: Duration,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "pg-instance".to_string(),
                instance: Some(pod.to_string()),
            },
        );
        Self {
            recorder,
            client,
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            pod: pod.to_string(),
            timeout,
        }
    }

    /// Name of the cluster's Lease.
    pub fn lease_name(&self) -> String {
        contract::lease_name(&self.cluster)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(Error::kube(what)),
            Err(_) => Err(Error::KubeTimeout(what.to_string())),
        }
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The Lease, `None` when it does not exist.
    pub async fn get_lease(&self) -> Result<Option<Lease>> {
        let name = self.lease_name();
        self.bounded(&format!("get Lease {name}"), self.leases().get_opt(&name))
            .await
    }

    /// Creates the Lease (fails with a conflict when it exists).
    pub async fn create_lease(&self, lease: &Lease) -> Result<Lease> {
        let name = self.lease_name();
        self.bounded(
            &format!("create Lease {name}"),
            self.leases().create(&PostParams::default(), lease),
        )
        .await
    }

    /// Replaces the Lease; its `resourceVersion` makes this an optimistic-concurrency update
    /// (a conflict when someone else changed it since it was read).
    pub async fn replace_lease(&self, lease: &Lease) -> Result<Lease> {
        let name = self.lease_name();
        self.bounded(
            &format!("update Lease {name}"),
            self.leases().replace(&name, &PostParams::default(), lease),
        )
        .await
    }

    /// The instance pods of the cluster (label `postgres.keiailab.io/cluster`).
    pub async fn members(&self) -> Result<Vec<Member>> {
        let params =
            ListParams::default().labels(&format!("{}={}", contract::LABEL_CLUSTER, self.cluster));
        let list = self
            .bounded(
                &format!("list pods of cluster {}", self.cluster),
                self.pods().list(&params),
            )
            .await?;
        Ok(list.items.iter().map(member_of).collect())
    }

    /// Reads `username` and `password` of a Secret.
    pub async fn credentials(&self, secret: &str) -> Result<Option<Credentials>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(found) = self
            .bounded(&format!("get Secret {secret}"), api.get_opt(secret))
            .await?
        else {
            return Ok(None);
        };
        let data = found.data.unwrap_or_default();
        let field = |key: &str| {
            data.get(key)
                .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
        };
        match (field("username"), field("password")) {
            (Some(username), Some(password)) => Ok(Some(Credentials {
                username,
                password,
                dbname: field("dbname"),
            })),
            _ => Err(Error::Invalid(format!(
                "Secret {secret} needs the keys `username` and `password`"
            ))),
        }
    }

    /// The cluster-level fence annotation (`*` or pod names), from the PostgresCluster object;
    /// `None` when absent (or when the PostgresCluster does not exist).
    pub async fn cluster_fence_annotation(&self) -> Result<Option<String>> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "postgres.keiailab.io",
            "v1alpha1",
            "PostgresCluster",
        ));
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
        let found = self
            .bounded(
                &format!("get PostgresCluster {}", self.cluster),
                api.get_opt(&self.cluster),
            )
            .await;
        match found {
            Ok(object) => Ok(object.and_then(|object| {
                object
                    .metadata
                    .annotations
                    .and_then(|annotations| annotations.get(contract::ANNOTATION_FENCED).cloned())
            })),
            // The CRD may not be installed (a bare test bed): no cluster-level fencing then.
            Err(Error::Kube {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 404 => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Records a Warning event on this instance's pod (what the instance manager did on its own
    /// that an operator should know about).
    pub async fn warning_event(&self, reason: &str, note: String) -> Result<()> {
        // The API server refuses a note longer than 1 kB.
        const MAX_NOTE: usize = 1000;
        let note = if note.len() > MAX_NOTE {
            let mut end = MAX_NOTE - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}...", &note[..end])
        } else {
            note
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_string(),
            note: Some(note),
            action: reason.to_string(),
            secondary: None,
        };
        let pod = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(self.pod.clone()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        };
        self.bounded(
            &format!("event on pod {}", self.pod),
            self.recorder.publish(&event, &pod),
        )
        .await
    }

    /// Sets the role label and the status annotation on this instance's pod.
    pub async fn publish(&self, role: &str, status: &InstanceStatus) -> Result<()> {
        let status_json = serde_json::to_string(status)
            .map_err(|error| Error::Invalid(format!("serializing the status: {error}")))?;
        let patch = serde_json::json!({
            "metadata": {
                "labels": { contract::LABEL_ROLE: role },
                "annotations": { contract::ANNOTATION_INSTANCE_STATUS: status_json },
            }
        });
        self.bounded(
            &format!("patch pod {}", self.pod),
            self.pods()
                .patch(&self.pod, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(|_| ())
    }
}

/// A user name and password read from a Secret (never logged).
#[derive(Clone)]
pub struct Credentials {
    /// Role name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Database name (application Secret only).
    pub dbname: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

fn member_of(pod: &Pod) -> Member {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    Member {
        name: pod.metadata.name.clone().unwrap_or_default(),
        ip: pod
            .status
            .as_ref()
            .and_then(|status| status.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
        postgres_port: contract::container_port(pod, PORT_NAME_POSTGRES, contract::POSTGRES_PORT),
        http_port: contract::container_port(pod, PORT_NAME_STATUS, contract::INSTANCE_HTTP_PORT),
        status: annotations
            .get(contract::ANNOTATION_INSTANCE_STATUS)
            .and_then(|json| serde_json::from_str(json).ok()),
        annotations,
    }
}

/// Whether the fence annotations (pod value `true`, or cluster value `*` / comma-separated pod
/// names) fence pod `pod`.
pub fn fence_requested(
    pod: &str,
    pod_annotation: Option<&str>,
    cluster_annotation: Option<&str>,
) -> bool {
    let on_pod = pod_annotation
        .map(|value| {
            let value = value.trim();
            value.eq_ignore_ascii_case("true")
                || value == "*"
                || value.split(',').any(|n| n.trim() == pod)
        })
        .unwrap_or(false);
    let on_cluster = cluster_annotation
        .map(|value| {
            value
                .split(',')
                .any(|name| matches!(name.trim(), "*") || name.trim() == pod)
        })
        .unwrap_or(false);
    on_pod || on_cluster
}

#[cfg(test)]
mod tests {
    use super::fence_requested;

    #[test]
    fn fence_annotations_on_pod_or_cluster() {
        assert!(fence_requested("a", Some("true"), None));
        assert!(!fence_requested("a", Some("false"), None));
        assert!(fence_requested("a", None, Some("*")));
        assert!(fence_requested("a", None, Some("b, a")));
        assert!(!fence_requested("a", None, Some("b")));
        assert!(!fence_requested("a", None, None));
    }
}
