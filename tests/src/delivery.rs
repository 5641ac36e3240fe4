//! Helpers for the delivery tests: running the real tools (helm, kustomize, kubeconform, cosign,
//! hadolint) that `cargo xtask setup` installs, local kubeconform schemas taken from a real
//! kube-apiserver and from our CRDs, and RBAC questions asked to the API server's authorizer.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, bail};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::{Map, Value, json};

use crate::ApiServer;

/// Runs `tool` with `args` (and `stdin`), returning its output whatever its exit status.
pub fn run(tool: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
    if !tool.exists() {
        bail!(
            "{} not found: run `cargo xtask setup` (it installs the delivery tools)",
            tool.display()
        );
    }
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", tool.display()))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Runs `tool` and fails with its output unless it exits 0; returns its standard output.
pub fn run_ok(tool: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let output = run(tool, args, stdin)?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        bail!(
            "`{} {}` failed ({}):\n{stdout}\n{}",
            tool.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

/// Where kubeconform finds a kind's schema in a folder written by [`write_kubeconform_schemas`].
pub fn schema_location(dir: &Path) -> String {
    format!(
        "{}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
        dir.display()
    )
}

/// Folder of a group as kubeconform's `.Group` names it (the version for the core group).
fn group_folder(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        group.to_string()
    }
}

/// Makes a schema strict as kubeconform's `-strict` schemas are: objects with `properties` refuse
/// unknown fields. Also rewrites Kubernetes' int-or-string and nullable markers to JSON Schema.
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("format").and_then(Value::as_str) == Some("int-or-string")
                || map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
            {
                map.remove("type");
                map.remove("format");
                map.insert(
                    "oneOf".into(),
                    json!([{"type": "string"}, {"type": "integer"}]),
                );
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(kind)) = map.get("type").cloned()
            {
                map.insert("type".into(), json!([kind, "null"]));
            }
            let preserves =
                map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !preserves
            {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for value in map.values_mut() {
                strict(value);
            }
        }
        Value::Array(list) => list.iter_mut().for_each(strict),
        _ => {}
    }
}

/// Writes strict JSON schemas for kubeconform into `dir`: every built-in kind from the API
/// server's `/openapi/v2` and every kind of `crds` from its OpenAPI v3 schema. Returns the
/// `-schema-location` template.
pub async fn write_kubeconform_schemas(
    server: &ApiServer,
    crds: &[CustomResourceDefinition],
    dir: &Path,
) -> anyhow::Result<String> {
    let client = server.client().await?;
    let request = http::Request::get("/openapi/v2").body(Vec::new())?;
    let text = client
        .request_text(request)
        .await
        .context("GET /openapi/v2")?;
    let document: Value = serde_json::from_str(&text)?;
    let mut definitions = document["definitions"].clone();
    strict(&mut definitions);
    let shared = dir.join("_definitions.json");
    fs::create_dir_all(dir)?;
    fs::write(
        &shared,
        serde_json::to_string(&json!({ "definitions": definitions }))?,
    )?;
    for (name, definition) in definitions.as_object().cloned().unwrap_or_default() {
        let Some(kinds) = definition["x-kubernetes-group-version-kind"].as_array() else {
            continue;
        };
        for gvk in kinds {
            let group = gvk["group"].as_str().unwrap_or_default();
            let version = gvk["version"].as_str().unwrap_or_default();
            let kind = gvk["kind"].as_str().unwrap_or_default().to_lowercase();
            let folder = dir.join(group_folder(group, version));
            fs::create_dir_all(&folder)?;
            let reference = format!("{}#/definitions/{name}", shared.display());
            fs::write(
                folder.join(format!("{kind}_{version}.json")),
                serde_json::to_string(&json!({ "$ref": format!("file://{reference}") }))?,
            )?;
        }
    }
    for crd in crds {
        for version in &crd.spec.versions {
            let Some(schema) = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
            else {
                continue;
            };
            let mut schema = serde_json::to_value(schema)?;
            if let Some(properties) = schema["properties"].as_object_mut() {
                // The API server knows these for every kind; the CRD schema may leave them out.
                let mut base = Map::new();
                base.insert("apiVersion".into(), json!({"type": "string"}));
                base.insert("kind".into(), json!({"type": "string"}));
                base.insert("metadata".into(), json!({"type": "object"}));
                for (key, value) in base {
                    properties.entry(key).or_insert(value);
                }
            }
            strict(&mut schema);
            let folder = dir.join(&crd.spec.group);
            fs::create_dir_all(&folder)?;
            fs::write(
                folder.join(format!(
                    "{}_{}.json",
                    crd.spec.names.kind.to_lowercase(),
                    version.name
                )),
                serde_json::to_string(&schema)?,
            )?;
        }
    }
    Ok(schema_location(dir))
}

/// Validates multi-document YAML with kubeconform (strict, no missing schema allowed); kinds in
/// `skip` are not checked. Returns kubeconform's summary.
pub fn kubeconform(yaml: &str, location: &str, skip: &[&str]) -> anyhow::Result<String> {
    let skip = skip.join(",");
    let mut args = vec![
        "-strict",
        "-summary",
        "-output",
        "text",
        "-kubernetes-version",
        "1.35.4",
        "-schema-location",
        location,
    ];
    if !skip.is_empty() {
        args.extend(["-skip", skip.as_str()]);
    }
    run_ok(&crate::paths::kubeconform(), &args, Some(yaml))
}

/// Asks the API server's authorizer whether `user` may `verb` `resource` of `group`, in
/// `namespace` (or cluster-wide with `None`).
pub async fn can(
    client: &kube::Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> anyhow::Result<bool> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, subresource)) => (resource, Some(subresource.to_string())),
        None => (resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(vec![
                "system:serviceaccounts".to_string(),
                "system:authenticated".to_string(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_string()),
                group: Some(group.to_string()),
                resource: Some(resource.to_string()),
                subresource,
                namespace: namespace.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// A temporary copy of a folder (for fixtures that tools write into, such as Cargo.lock).
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target: PathBuf = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
