//! A pod's volumes as folders of the pod (ConfigMap, Secret, projected, emptyDir) or of its
//! claim's PersistentVolume, and the environment of its containers (values, fieldRef,
//! secretKeyRef, configMapKeyRef), resolved as the kubelet does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
    ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};

/// Files of one volume: key -> bytes (ConfigMap, Secret, projected).
type Files = BTreeMap<String, Vec<u8>>;

/// Writes (or refreshes) every volume of `pod` under `dir`; returns volume name -> host folder.
pub async fn materialize(
    client: &kube::Client,
    pod: &Pod,
    dir: &Path,
    owner: (u32, u32),
    ca: &Path,
) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut folders = BTreeMap::new();
    for volume in spec.volumes.unwrap_or_default() {
        let folder = match source_files(client, pod, &namespace, &volume, ca).await? {
            Some(files) => {
                let folder = dir.join("volumes").join(&volume.name);
                write_files(&folder, &files, owner)?;
                folder
            }
            None if volume.empty_dir.is_some() => {
                let folder = dir.join("volumes").join(&volume.name);
                if !folder.exists() {
                    std::fs::create_dir_all(&folder)?;
                    chown(&folder, owner)?;
                }
                folder
            }
            None => match &volume.persistent_volume_claim {
                Some(claim) => claim_folder(client, &namespace, &claim.claim_name).await?,
                None => bail!(
                    "volume {} has a source the node agent does not run",
                    volume.name
                ),
            },
        };
        folders.insert(volume.name, folder);
    }
    Ok(folders)
}

async fn source_files(
    client: &kube::Client,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    ca: &Path,
) -> anyhow::Result<Option<Files>> {
    if let Some(source) = &volume.config_map {
        let data = config_map_files(client, namespace, &source.name).await?;
        return Ok(Some(select(data, source.items.as_deref())));
    }
    if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        let data = secret_files(client, namespace, &name).await?;
        return Ok(Some(select(data, source.items.as_deref())));
    }
    let Some(projected) = &volume.projected else {
        return Ok(None);
    };
    let mut files = Files::new();
    for source in projected.sources.clone().unwrap_or_default() {
        if let Some(token) = source.service_account_token {
            let account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_string());
            let issued = request_token(
                client,
                namespace,
                &account,
                pod,
                token.expiration_seconds.unwrap_or(3607),
                token.audience,
            )
            .await?;
            files.insert(token.path, issued.into_bytes());
        }
        if let Some(source) = source.config_map {
            let data = if source.name == "kube-root-ca.crt" {
                // The API server's serving chain, what the root-CA publisher copies.
                BTreeMap::from([(
                    "ca.crt".to_string(),
                    std::fs::read(ca).context("reading the API server's CA")?,
                )])
            } else {
                config_map_files(client, namespace, &source.name).await?
            };
            files.extend(select(data, source.items.as_deref()));
        }
        if let Some(source) = source.secret {
            let data = secret_files(client, namespace, &source.name).await?;
            files.extend(select(data, source.items.as_deref()));
        }
        if let Some(source) = source.downward_api {
            for item in source.items.unwrap_or_default() {
                if let Some(field) = item.field_ref {
                    files.insert(item.path, field_value(pod, &field.field_path).into_bytes());
                }
            }
        }
    }
    Ok(Some(files))
}

fn select(data: Files, items: Option<&[KeyToPath]>) -> Files {
    match items {
        None => data,
        Some(items) => items
            .iter()
            .filter_map(|item| Some((item.path.clone(), data.get(&item.key)?.clone())))
            .collect(),
    }
}

async fn config_map_files(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Files> {
    let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("reading ConfigMap {namespace}/{name}"))?;
    let mut files: Files = map
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| (key, value.into_bytes()))
        .collect();
    files.extend(
        map.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, value.0)),
    );
    Ok(files)
}

async fn secret_files(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<Files> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?;
    let mut files: Files = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| (key, value.0))
        .collect();
    files.extend(
        secret
            .string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, value.into_bytes())),
    );
    Ok(files)
}

async fn request_token(
    client: &kube::Client,
    namespace: &str,
    account: &str,
    pod: &Pod,
    expiration: i64,
    audience: Option<String>,
) -> anyhow::Result<String> {
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audience.map(|a| vec![a]).unwrap_or_default(),
            "expirationSeconds": expiration,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.metadata.name,
                "uid": pod.metadata.uid,
            },
        },
    });
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let issued: TokenRequest = accounts
        .create_subresource("token", account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{account}"))?;
    Ok(issued.status.map(|s| s.token).unwrap_or_default())
}

async fn claim_folder(
    client: &kube::Client,
    namespace: &str,
    claim: &str,
) -> anyhow::Result<PathBuf> {
    let claim_object = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get(claim)
        .await
        .with_context(|| format!("reading PersistentVolumeClaim {namespace}/{claim}"))?;
    let Some(volume) = claim_object.spec.and_then(|s| s.volume_name) else {
        bail!("PersistentVolumeClaim {namespace}/{claim} is not bound yet");
    };
    let volume = Api::<PersistentVolume>::all(client.clone())
        .get(&volume)
        .await?;
    let path = volume
        .spec
        .and_then(|s| s.host_path)
        .map(|h| h.path)
        .with_context(|| format!("PersistentVolume of {namespace}/{claim} is not a hostPath"))?;
    Ok(PathBuf::from(path))
}

fn write_files(folder: &Path, files: &Files, owner: (u32, u32)) -> anyhow::Result<()> {
    std::fs::create_dir_all(folder)?;
    for (path, bytes) in files {
        let file = folder.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::read(&file).is_ok_and(|current| &current == bytes) {
            continue;
        }
        let partial = file.with_extension("agent-partial");
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, &file)?;
    }
    chown(folder, owner)
}

/// Gives `path` (recursively) to the pod's user and fsGroup.
pub fn chown(path: &Path, (uid, gid): (u32, u32)) -> anyhow::Result<()> {
    let status = std::process::Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status()?;
    if !status.success() {
        bail!("chown {} failed", path.display());
    }
    Ok(())
}

/// Value of a downward-API field of `pod`.
pub fn field_value(pod: &Pod, path: &str) -> String {
    let meta = &pod.metadata;
    match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default(),
        other => {
            let label = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
                let key = other.strip_prefix(prefix)?.strip_suffix("']")?;
                map.as_ref()?.get(key).cloned()
            };
            label("metadata.labels['", &meta.labels)
                .or_else(|| label("metadata.annotations['", &meta.annotations))
                .unwrap_or_default()
        }
    }
}

/// The environment of `container`: its `env` entries resolved (fieldRef, secretKeyRef,
/// configMapKeyRef) after its `envFrom` sources.
pub async fn environment(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
) -> anyhow::Result<Vec<(String, String)>> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = Vec::new();
    for source in container.env_from.clone().unwrap_or_default() {
        let prefix = source.prefix.unwrap_or_default();
        let data = if let Some(map) = source.config_map_ref {
            config_map_files(client, &namespace, &map.name).await?
        } else if let Some(secret) = source.secret_ref {
            secret_files(client, &namespace, &secret.name).await?
        } else {
            Files::new()
        };
        for (key, value) in data {
            env.push((
                format!("{prefix}{key}"),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        }
    }
    for variable in container.env.clone().unwrap_or_default() {
        let value = match (variable.value, variable.value_from) {
            (Some(value), _) => value,
            (None, Some(from)) => {
                if let Some(field) = from.field_ref {
                    field_value(pod, &field.field_path)
                } else if let Some(key) = from.secret_key_ref {
                    // As the kubelet: an optional reference to a missing Secret leaves the
                    // variable unset.
                    let data = match secret_files(client, &namespace, &key.name).await {
                        Ok(data) => data,
                        Err(_) if key.optional == Some(true) => continue,
                        Err(error) => return Err(error),
                    };
                    match data.get(&key.key) {
                        Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        None if key.optional == Some(true) => continue,
                        None => bail!("Secret {} has no key {}", key.name, key.key),
                    }
                } else if let Some(key) = from.config_map_key_ref {
                    let data = match config_map_files(client, &namespace, &key.name).await {
                        Ok(data) => data,
                        Err(_) if key.optional == Some(true) => continue,
                        Err(error) => return Err(error),
                    };
                    match data.get(&key.key) {
                        Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        None if key.optional == Some(true) => continue,
                        None => bail!("ConfigMap {} has no key {}", key.name, key.key),
                    }
                } else {
                    String::new()
                }
            }
            (None, None) => String::new(),
        };
        env.push((variable.name, value));
    }
    Ok(env)
}
