//! Applying YAML manifests (any kind) to an API server, as `kubectl apply --server-side` does.

use std::path::Path;

use anyhow::{Context, bail};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};

use crate::apiserver::FIELD_MANAGER;

/// Splits a multi-document YAML text into its non-empty documents.
pub fn documents(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Reads every `*.yaml` file of `folder`, in name order, as (file name, document) pairs.
pub fn read_folder(folder: &Path) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let mut names: Vec<_> = std::fs::read_dir(folder)
        .with_context(|| format!("reading {}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for path in names {
        let text = std::fs::read_to_string(&path)?;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for document in documents(&text).with_context(|| format!("parsing {name}"))? {
            out.push((name.clone(), document));
        }
    }
    Ok(out)
}

/// Server-side applies one object; namespaced objects without a namespace go to `namespace`.
/// Returns the object as the API server stored it (defaults filled in).
pub async fn apply(
    client: &kube::Client,
    object: &serde_json::Value,
    namespace: &str,
) -> Result<DynamicObject, kube::Error> {
    let dynamic: DynamicObject =
        serde_json::from_value(object.clone()).map_err(kube::Error::SerdeError)?;
    let types = dynamic.types.clone().unwrap_or_default();
    let gvk = GroupVersionKind::try_from(&types).map_err(|e| {
        kube::Error::Discovery(kube::error::DiscoveryError::MissingKind(e.to_string()))
    })?;
    let (resource, capabilities) = pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => {
            let ns = dynamic.metadata.namespace.as_deref().unwrap_or(namespace);
            Api::namespaced_with(client.clone(), ns, &resource)
        }
    };
    let name = dynamic.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&dynamic),
    )
    .await
}

/// Applies every document, failing on the first error with the object named.
pub async fn apply_all(
    client: &kube::Client,
    objects: &[(String, serde_json::Value)],
    namespace: &str,
) -> anyhow::Result<Vec<DynamicObject>> {
    let mut stored = Vec::new();
    for (file, object) in objects {
        match apply(client, object, namespace).await {
            Ok(object) => stored.push(object),
            Err(error) => bail!(
                "applying {} {:?} from {file}: {error}",
                object["kind"],
                object["metadata"]["name"]
            ),
        }
    }
    Ok(stored)
}
