//! The declarative finalizer: present exactly while an object's `reclaimPolicy` is `Delete`, so
//! that a retained object never waits on an instance manager to go away.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::FINALIZER;
use super::error::{DeclarativeError, Result};

/// Whether `object` carries the finalizer.
pub fn has_finalizer<K: Resource>(object: &K) -> bool {
    object.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds (`present`) or removes the finalizer, guarded by the object's resourceVersion.
pub async fn set_finalizer<K>(api: &Api<K>, object: &K, present: bool) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let mut finalizers: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": object.resource_version(), "finalizers": finalizers}
    });
    api.patch(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(DeclarativeError::kube(format!(
        "update the finalizers of {} {}",
        K::kind(&K::DynamicType::default()),
        object.name_any()
    )))?;
    Ok(())
}
