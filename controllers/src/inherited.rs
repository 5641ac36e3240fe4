//! `spec.inheritedMetadata`: the user's labels and annotations on every object the operator
//! creates for a cluster.
//!
//! Objects the operator applies (StatefulSet, Services, ConfigMaps, Secrets, the router's
//! Deployment...) carry them in their built metadata, and server-side apply adds, changes and
//! removes them like any other field. Two kinds of objects are not applied: the pods and the
//! PersistentVolumeClaims, which the StatefulSet controller creates from its templates (and
//! whose claim templates can never change). New ones get the metadata from the templates;
//! existing ones are merge-patched in place, so a label change restarts no PostgreSQL. To remove
//! a key the user dropped, and only such a key (the instance manager and others label pods too),
//! each pod and claim records the inherited keys it carries in [`ANNOTATION_KEYS`]; the
//! templates carry that record as well, so an object created from them knows what it got.

use std::collections::{BTreeMap, BTreeSet};

use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Annotation on pods and claims (and their templates) with the inherited keys they carry, as
/// JSON `{"labels":[...],"annotations":[...]}`.
pub const ANNOTATION_KEYS: &str = "postgres.keiailab.io/inherited-keys";

/// `own` labels over the user's `spec.inheritedMetadata.labels`. The API refuses the operator's
/// own keys there; should one get through, the operator's value wins (selectors need it).
pub fn labels_with(
    cluster: &PostgresCluster,
    own: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = cluster
        .spec
        .inherited_metadata
        .as_ref()
        .map(|inherited| inherited.labels.clone())
        .unwrap_or_default();
    labels.extend(own);
    labels
}

/// The user's `spec.inheritedMetadata.annotations`, `None` when there are none (an object applied
/// without annotations leaves those other managers wrote alone).
pub fn annotations(cluster: &PostgresCluster) -> Option<BTreeMap<String, String>> {
    cluster
        .spec
        .inherited_metadata
        .as_ref()
        .map(|inherited| inherited.annotations.clone())
        .filter(|annotations| !annotations.is_empty())
}

/// The inherited annotations plus the record of the inherited keys, for the pod and claim
/// templates (objects created from them are updated in place later, see the module comment).
pub fn template_annotations(cluster: &PostgresCluster) -> BTreeMap<String, String> {
    let mut annotations = annotations(cluster).unwrap_or_default();
    let keys = Keys::of(cluster);
    if !keys.is_empty() {
        annotations.insert(ANNOTATION_KEYS.to_string(), keys.to_json());
    }
    annotations
}

/// Which inherited keys an object carries.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq, Eq)]
struct Keys {
    #[serde(default)]
    labels: BTreeSet<String>,
    #[serde(default)]
    annotations: BTreeSet<String>,
}

impl Keys {
    fn of(cluster: &PostgresCluster) -> Self {
        let inherited = cluster.spec.inherited_metadata.as_ref();
        Keys {
            labels: inherited
                .map(|inherited| inherited.labels.keys().cloned().collect())
                .unwrap_or_default(),
            annotations: inherited
                .map(|inherited| inherited.annotations.keys().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// The record on `metadata`; an unreadable one counts as empty (nothing is removed then).
    fn recorded(metadata: &ObjectMeta) -> Self {
        metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(ANNOTATION_KEYS))
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default()
    }

    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The merge patch that brings an existing pod's or claim's metadata to the cluster's inherited
/// metadata: keys set or changed, recorded keys the user dropped removed, the record updated;
/// `None` when the object is already there.
pub fn metadata_patch(cluster: &PostgresCluster, current: &ObjectMeta) -> Option<Value> {
    let desired = Keys::of(cluster);
    let recorded = Keys::recorded(current);
    let inherited = cluster.spec.inherited_metadata.clone().unwrap_or_default();
    let labels = changes(current.labels.as_ref(), &inherited.labels, &recorded.labels);
    let mut annotations = changes(
        current.annotations.as_ref(),
        &inherited.annotations,
        &recorded.annotations,
    );
    if desired != recorded {
        annotations.insert(
            ANNOTATION_KEYS.to_string(),
            if desired.is_empty() {
                Value::Null
            } else {
                Value::String(desired.to_json())
            },
        );
    }
    if labels.is_empty() && annotations.is_empty() {
        return None;
    }
    let mut metadata = Map::new();
    if !labels.is_empty() {
        metadata.insert("labels".to_string(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        metadata.insert("annotations".to_string(), Value::Object(annotations));
    }
    Some(json!({ "metadata": metadata }))
}

/// Merge-patch entries for one map: `desired` values that differ from `current`, and `null` for
/// recorded keys no longer desired that the object still has.
fn changes(
    current: Option<&BTreeMap<String, String>>,
    desired: &BTreeMap<String, String>,
    recorded: &BTreeSet<String>,
) -> Map<String, Value> {
    let empty = BTreeMap::new();
    let current = current.unwrap_or(&empty);
    let mut patch = Map::new();
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            patch.insert(key.clone(), Value::String(value.clone()));
        }
    }
    for key in recorded {
        if !desired.contains_key(key) && current.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    patch
}

/// Brings the cluster's existing pods (`pods`, as the reconcile listed them with `selector`)
/// and claims to its inherited metadata, in place. Returns how many objects were patched.
pub async fn apply_in_place(
    client: &Client,
    cluster: &PostgresCluster,
    namespace: &str,
    selector: &str,
    pods: &[Pod],
) -> Result<usize, kube::Error> {
    let list = ListParams::default().labels(selector);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let mut patched = 0;
    for pod in pods {
        if let Some(patch) = metadata_patch(cluster, &pod.metadata) {
            patch_one(&pod_api, &pod.name_any(), &patch).await?;
            patched += 1;
        }
    }
    for claim in claims.list(&list).await?.items {
        if let Some(patch) = metadata_patch(cluster, &claim.metadata) {
            patch_one(&claims, &claim.name_any(), &patch).await?;
            patched += 1;
        }
    }
    Ok(patched)
}

/// A merge patch of one object; one that is gone meanwhile is not an error.
async fn patch_one<K>(api: &Api<K>, name: &str, patch: &Value) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::{InheritedMetadata, PostgresClusterSpec};

    fn cluster(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PostgresCluster {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let mut spec = PostgresClusterSpec::with_image(1, "postgres:18");
        if !labels.is_empty() || !annotations.is_empty() {
            spec.inherited_metadata = Some(InheritedMetadata {
                labels: map(labels),
                annotations: map(annotations),
            });
        }
        PostgresCluster::new("db", spec)
    }

    fn meta(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        let map = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(key, value)| (key.to_string(), value.to_string()))
                    .collect(),
            )
        };
        ObjectMeta {
            labels: map(labels),
            annotations: map(annotations),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn the_operators_labels_win_over_inherited_ones() {
        let cluster = cluster(
            &[("team", "payments"), ("app.kubernetes.io/name", "x")],
            &[],
        );
        let own = BTreeMap::from([(
            "app.kubernetes.io/name".to_string(),
            "postgresql".to_string(),
        )]);
        let labels = labels_with(&cluster, own);
        assert_eq!(labels["team"], "payments");
        assert_eq!(labels["app.kubernetes.io/name"], "postgresql");
    }

    #[test]
    fn a_new_key_is_set_and_recorded_and_other_keys_are_left_alone() {
        let cluster = cluster(&[("team", "payments")], &[("cost-center", "42")]);
        let pod = meta(
            &[("postgres.keiailab.io/role", "primary")],
            &[("other", "x")],
        );
        let patch = metadata_patch(&cluster, &pod).unwrap();
        assert_eq!(patch["metadata"]["labels"], json!({"team": "payments"}));
        assert_eq!(patch["metadata"]["annotations"]["cost-center"], "42");
        let record: Keys = serde_json::from_str(
            patch["metadata"]["annotations"][ANNOTATION_KEYS]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(record, Keys::of(&cluster));
        assert!(patch["metadata"]["annotations"].get("other").is_none());
    }

    #[test]
    fn a_dropped_key_is_removed_only_when_it_was_inherited() {
        let before = cluster(&[("team", "payments"), ("tier", "gold")], &[]);
        let record = Keys::of(&before).to_json();
        let pod = meta(
            &[
                ("team", "payments"),
                ("tier", "gold"),
                ("postgres.keiailab.io/role", "replica"),
            ],
            &[(ANNOTATION_KEYS, &record)],
        );
        let after = cluster(&[("team", "billing")], &[]);
        let patch = metadata_patch(&after, &pod).unwrap();
        assert_eq!(
            patch["metadata"]["labels"],
            json!({"team": "billing", "tier": null})
        );
        // Everything dropped: the labels go and so does the record.
        let none = cluster(&[], &[]);
        let patch = metadata_patch(&none, &pod).unwrap();
        assert_eq!(
            patch["metadata"]["labels"],
            json!({"team": null, "tier": null})
        );
        assert_eq!(
            patch["metadata"]["annotations"],
            json!({ ANNOTATION_KEYS: null })
        );
    }

    #[test]
    fn an_object_already_up_to_date_needs_no_patch() {
        let cluster = cluster(&[("team", "payments")], &[("cost-center", "42")]);
        let template = template_annotations(&cluster);
        let pod = meta(
            &[("team", "payments")],
            &template
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(metadata_patch(&cluster, &pod), None);
        assert_eq!(
            metadata_patch(&self::cluster(&[], &[]), &meta(&[], &[])),
            None
        );
    }
}
