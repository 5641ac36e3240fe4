//! Types shared by several kinds: references, storage, conditions.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every kind in this crate.
pub const GROUP: &str = "postgres.keiailab.io";
/// API version of every kind in this crate.
pub const VERSION: &str = "v1alpha1";
/// Oldest PostgreSQL major version the operator runs.
pub const MIN_POSTGRES_MAJOR: i32 = 18;

/// Names a PostgresCluster in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterReference {
    /// Name of the PostgresCluster, in the namespace of this object.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Selects one key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Names a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A persistent volume request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(oldSelf.storageClass) || (has(self.storageClass) && self.storageClass == oldSelf.storageClass)",
        "message": "storageClass is immutable: volumes cannot move to another storage class in place; create a new cluster and restore from a backup"
    },
    {
        "rule": "!has(oldSelf.size) || quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0",
        "message": "size cannot shrink: a PersistentVolumeClaim can only grow; set size to at least its current value"
    }
]))]
pub struct StorageSpec {
    /// Size of each volume, as a Kubernetes quantity (for example `10Gi`). Volumes can grow, never shrink.
    #[serde(default = "default_storage_size")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))", "message": "size must be a positive Kubernetes quantity such as 10Gi or 500Mi"}
    ]))]
    pub size: String,
    /// StorageClass of the volumes; the cluster default when unset. Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class: None,
        }
    }
}

fn default_storage_size() -> String {
    "1Gi".to_string()
}

/// Credentials and location of an S3-compatible object store.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Store {
    /// Endpoint URL of the S3-compatible service, for example `https://s3.eu-west-1.amazonaws.com` or `http://minio.backup:9000`.
    #[schemars(length(min = 1, max = 512), extend("x-kubernetes-validations" = [
        {"rule": "self.startsWith('http://') || self.startsWith('https://')", "message": "endpoint must be an http:// or https:// URL"}
    ]))]
    pub endpoint: String,
    /// Bucket name.
    #[schemars(
        length(min = 3, max = 63),
        regex(pattern = r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$")
    )]
    pub bucket: String,
    /// Path prefix inside the bucket; the cluster name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
    /// Region of the bucket: the region requests are signed for (the SigV4 credential scope).
    #[serde(default = "default_region")]
    #[schemars(length(max = 64))]
    pub region: String,
    /// Secret with the keys `ACCESS_KEY_ID` and `ACCESS_SECRET_KEY`.
    pub credentials_secret: LocalObjectReference,
    /// Use path-style addressing (`endpoint/bucket/key`), as MinIO and most self-hosted stores
    /// need. When false, virtual-hosted style (`bucket.endpoint/key`), as AWS S3 prefers: the
    /// endpoint must then be a DNS name under which `<bucket>.<host>` resolves (not an IP address).
    #[serde(default = "default_true")]
    pub force_path_style: bool,
    /// Secret key with the PEM certificate of the CA that signed the store's TLS certificate,
    /// for an `https://` endpoint with a private CA; the system's CAs are trusted when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyReference>,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_string()
}

fn default_region() -> String {
    "us-east-1".to_string()
}

pub(crate) fn default_true() -> bool {
    true
}

/// Condition types and reasons used across kinds.
pub mod condition {
    /// The object's desired state has been reached and it serves.
    pub const READY: &str = "Ready";
    /// The operator is working towards the desired state.
    pub const PROGRESSING: &str = "Progressing";
    /// Something prevents the desired state; the reason and message say what.
    pub const DEGRADED: &str = "Degraded";
}

/// Sets `condition` in `conditions`: replaces the entry of the same type, keeping its
/// `lastTransitionTime` when the status did not change, or appends it.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) {
    match conditions
        .iter_mut()
        .find(|existing| existing.type_ == condition.type_)
    {
        Some(existing) => {
            let transition_time = if existing.status == condition.status {
                existing.last_transition_time.clone()
            } else {
                condition.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time: transition_time,
                ..condition
            };
        }
        None => conditions.push(condition),
    }
}

/// Builds a condition stamped with the current time.
pub fn new_condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Finds the condition of `type_`.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|condition| condition.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut conditions = Vec::new();
        let first = new_condition(condition::READY, true, "Up", "all good", Some(1));
        let first_time = first.last_transition_time.clone();
        set_condition(&mut conditions, first);
        std::thread::sleep(std::time::Duration::from_millis(5));
        set_condition(
            &mut conditions,
            new_condition(condition::READY, true, "StillUp", "fine", Some(2)),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].reason, "StillUp");
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time, first_time);

        set_condition(
            &mut conditions,
            new_condition(condition::READY, false, "Down", "broken", Some(3)),
        );
        assert_ne!(conditions[0].last_transition_time, first_time);
        assert_eq!(
            find_condition(&conditions, condition::READY)
                .unwrap()
                .status,
            "False"
        );
    }
}

/// How one Service is exposed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || self.type == 'LoadBalancer'", "message": "loadBalancerSourceRanges needs type: LoadBalancer"}
]))]
pub struct ServiceExposure {
    /// Service type.
    #[serde(rename = "type", default)]
    pub type_: ServiceType,
    /// Annotations of this Service only (for example the cloud's load balancer settings), beside
    /// `inheritedMetadata`'s.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "x-kubernetes-validations" = [{
            "rule": "self.all(k, !k.startsWith('postgres.keiailab.io/'))",
            "message": "service annotations may not set the operator's own annotations (keys under postgres.keiailab.io/)"
        }]
    ))]
    pub annotations: BTreeMap<String, String>,
    /// Client address ranges (CIDRs) the load balancer admits; every client when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {
        "type": "string",
        "maxLength": 64,
        "x-kubernetes-validations": [{
            "rule": "isCIDR(self)",
            "message": "each loadBalancerSourceRanges entry must be a CIDR such as 10.0.0.0/8 or 2001:db8::/32"
        }]
    }))]
    pub load_balancer_source_ranges: Vec<String>,
}

/// Kubernetes Service types the operator creates.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the Kubernetes cluster.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Service's `spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}
