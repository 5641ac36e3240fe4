//! The OLM bundle (registry+v1) derived from the typed API: the ClusterServiceVersion, the bundle
//! annotations, the scorecard configuration and the bundle image's Dockerfile.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use crate::operator_install::{self as install, NAME, VERSION};

/// OLM package name.
pub const PACKAGE: &str = NAME;
/// The only channel so far (the API is v1alpha1).
pub const CHANNEL: &str = "alpha";
/// Operator maturity, as OperatorHub shows it.
pub const MATURITY: &str = "alpha";
/// Operator capability level (OperatorHub's five levels): installs, upgrades, and manages backups,
/// failover and restores.
pub const CAPABILITY_LEVEL: &str = "Full Lifecycle";
/// Scorecard test image (operator-sdk's, pinned).
pub const SCORECARD_IMAGE: &str = "quay.io/operator-framework/scorecard-test:v1.42.0";

/// The operator's icon, shown by OperatorHub.
const ICON_SVG: &str = include_str!("../assets/icon.svg");

/// Name of the ClusterServiceVersion.
pub fn csv_name() -> String {
    format!("{PACKAGE}.v{VERSION}")
}

/// The bundle annotations (`metadata/annotations.yaml` and the bundle Dockerfile's labels).
pub fn annotations() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        (
            "operators.operatorframework.io.bundle.mediatype.v1",
            "registry+v1".to_string(),
        ),
        (
            "operators.operatorframework.io.bundle.manifests.v1",
            "manifests/".to_string(),
        ),
        (
            "operators.operatorframework.io.bundle.metadata.v1",
            "metadata/".to_string(),
        ),
        (
            "operators.operatorframework.io.bundle.package.v1",
            PACKAGE.to_string(),
        ),
        (
            "operators.operatorframework.io.bundle.channels.v1",
            CHANNEL.to_string(),
        ),
        (
            "operators.operatorframework.io.bundle.channel.default.v1",
            CHANNEL.to_string(),
        ),
        (
            "operators.operatorframework.io.test.mediatype.v1",
            "scorecard+v1".to_string(),
        ),
        (
            "operators.operatorframework.io.test.config.v1",
            "tests/scorecard/".to_string(),
        ),
    ])
}

/// `bundle/metadata/annotations.yaml`.
pub fn annotations_yaml() -> anyhow::Result<String> {
    Ok(serde_yaml::to_string(
        &json!({ "annotations": annotations() }),
    )?)
}

/// `bundle/bundle.Dockerfile`: the bundle image (build context: `bundle/`).
pub fn bundle_dockerfile() -> String {
    let mut text = String::from("FROM scratch\n\n");
    for (key, value) in annotations() {
        text.push_str(&format!("LABEL {key}={value}\n"));
    }
    text.push_str("\nCOPY manifests /manifests/\nCOPY metadata /metadata/\nCOPY tests/scorecard /tests/scorecard/\n");
    text
}

/// `bundle/tests/scorecard/config.yaml`: operator-sdk's basic and OLM suites.
pub fn scorecard_config() -> anyhow::Result<String> {
    let test = |suite: &str, test: &str| {
        json!({
            "entrypoint": ["scorecard-test", test],
            "image": SCORECARD_IMAGE,
            "labels": {"suite": suite, "test": format!("{test}-test")}
        })
    };
    let config = json!({
        "apiVersion": "scorecard.operatorframework.io/v1alpha3",
        "kind": "Configuration",
        "metadata": {"name": "config"},
        "stages": [{
            "parallel": true,
            "tests": [
                test("basic", "basic-check-spec"),
                test("olm", "olm-bundle-validation"),
                test("olm", "olm-crds-have-validation"),
                test("olm", "olm-crds-have-resources"),
                test("olm", "olm-spec-descriptors"),
                test("olm", "olm-status-descriptors"),
            ]
        }]
    });
    Ok(serde_yaml::to_string(&config)?)
}

/// Every example of `examples/` (one object per file), in file-name order.
pub fn examples(root: &Path) -> anyhow::Result<Vec<Value>> {
    let folder = root.join("examples");
    let mut paths: Vec<_> = std::fs::read_dir(&folder)
        .with_context(|| format!("reading {}", folder.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        for document in testbed::manifests::documents(&text)
            .with_context(|| format!("parsing {}", path.display()))?
        {
            out.push(document);
        }
    }
    Ok(out)
}

fn schema(crd: &CustomResourceDefinition) -> Value {
    crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .map(|s| serde_json::to_value(s).expect("schema serializes"))
        .unwrap_or(Value::Null)
}

/// `postgresVersion` -> `Postgres Version`.
fn display_name(field: &str) -> String {
    let mut out = String::new();
    for (i, c) in field.chars().enumerate() {
        if i == 0 {
            out.extend(c.to_uppercase());
        } else if c.is_uppercase() {
            out.push(' ');
            out.push(c);
        } else {
            out.push(c);
        }
    }
    out
}

fn first_sentence(text: &str) -> String {
    text.split("\n\n").next().unwrap_or(text).replace('\n', " ")
}

fn descriptors(properties: &Value, status: bool) -> Vec<Value> {
    let Some(map) = properties.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (field, schema) in map {
        let mut descriptor = json!({
            "path": field,
            "displayName": display_name(field),
            "description": first_sentence(schema["description"].as_str().unwrap_or_default()),
        });
        if status && field == "conditions" {
            descriptor["x-descriptors"] = json!(["urn:alm:descriptor:io.kubernetes.conditions"]);
        }
        out.push(descriptor);
    }
    out
}

/// One `spec.customresourcedefinitions.owned` entry.
fn owned(crd: &CustomResourceDefinition, kinds_it_creates: &[(&str, &str)]) -> Value {
    let schema = schema(crd);
    json!({
        "name": crd.metadata.name,
        "version": crd.spec.versions[0].name,
        "kind": crd.spec.names.kind,
        "displayName": display_name(&crd.spec.names.kind),
        "description": first_sentence(schema["properties"]["spec"]["description"].as_str().unwrap_or_default()),
        "resources": kinds_it_creates.iter().map(|(kind, version)| json!({"kind": kind, "version": version, "name": ""})).collect::<Vec<_>>(),
        "specDescriptors": descriptors(&schema["properties"]["spec"]["properties"], false),
        "statusDescriptors": descriptors(&schema["properties"]["status"]["properties"], true),
    })
}

/// Kinds each of our kinds creates, for the CSV's `resources`.
fn created_kinds(kind: &str) -> &'static [(&'static str, &'static str)] {
    match kind {
        "PostgresCluster" => &[
            ("StatefulSet", "v1"),
            ("Pod", "v1"),
            ("Service", "v1"),
            ("Secret", "v1"),
            ("ConfigMap", "v1"),
            ("PersistentVolumeClaim", "v1"),
            ("PodDisruptionBudget", "v1"),
            ("Lease", "v1"),
        ],
        "Pooler" => &[("Deployment", "v1"), ("Service", "v1")],
        "BackupJob" => &[("Job", "v1")],
        "ScheduledBackup" => &[("BackupJob", "v1alpha1")],
        "ShardSplitJob" => &[("ShardRange", "v1alpha1")],
        _ => &[],
    }
}

const DESCRIPTION: &str = "\
postgres-operator runs vanilla PostgreSQL 18 on Kubernetes, from a single highly-available cluster \
to a sharded cluster behind a distributed-SQL router with online resharding.

* **High availability**: one primary and streaming replicas (synchronous or asynchronous), \
automated failover and switchover driven by an instance manager in every pod that holds a \
Kubernetes Lease, with fencing and pg_rewind.
* **Day-2 operations**: TLS automation, backups and point-in-time recovery to S3-compatible object \
stores, scheduled backups with retention, declarative databases and roles, PgBouncer poolers, \
hibernation, and upgrades through image catalogs.
* **Sharding**: ShardRange objects are the source of truth for pg-router, which routes single-shard \
statements directly and runs multi-shard statements with scatter-gather and two-phase commit; \
ShardSplitJob splits a range online.

PostgreSQL versions below 18 are refused.";

/// The ClusterServiceVersion.
pub fn csv(root: &Path) -> anyhow::Result<Value> {
    use base64::Engine;
    let crds = api::all_crds();
    let examples = examples(root)?;
    let alm_examples = serde_json::to_string_pretty(&examples)?;
    let image = format!("{}:{VERSION}", install::IMAGE_REPOSITORY);
    let owned: Vec<Value> = crds
        .iter()
        .map(|crd| owned(crd, created_kinds(&crd.spec.names.kind)))
        .collect();
    // OLM sets `olm.targetNamespaces` on the Deployment's pods from the OperatorGroup: one
    // namespace, or empty for AllNamespaces (the operator then watches every namespace).
    let watch = "metadata.annotations['olm.targetNamespaces']";
    Ok(json!({
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "ClusterServiceVersion",
        "metadata": {
            "name": csv_name(),
            "namespace": "placeholder",
            "annotations": {
                "alm-examples": alm_examples,
                "capabilities": CAPABILITY_LEVEL,
                "categories": "Database",
                "containerImage": image,
                "description": "PostgreSQL 18 operator: HA clusters, backups, poolers and online resharding.",
                "repository": "https://github.com/keiailab/postgres-operator",
                "support": "keiailab",
                "operatorframework.io/suggested-namespace": install::NAMESPACE,
                "operators.operatorframework.io/builder": "cargo xtask gen",
            },
            "labels": {
                "operatorframework.io/arch.amd64": "supported",
                "operatorframework.io/arch.arm64": "supported",
                "operatorframework.io/os.linux": "supported",
            }
        },
        "spec": {
            "displayName": "PostgreSQL Operator",
            "description": DESCRIPTION,
            "version": VERSION,
            "maturity": MATURITY,
            "minKubeVersion": "1.30.0",
            "keywords": ["postgresql", "postgres", "database", "sql", "sharding", "high-availability", "backup"],
            "provider": {"name": "keiailab", "url": "https://github.com/keiailab"},
            "maintainers": [{"name": "keiailab", "email": "postgres-operator@keiailab.io"}],
            "links": [{"name": "Source", "url": "https://github.com/keiailab/postgres-operator"}],
            "icon": [{
                "base64data": base64::engine::general_purpose::STANDARD.encode(ICON_SVG),
                "mediatype": "image/svg+xml"
            }],
            "installModes": [
                {"type": "OwnNamespace", "supported": true},
                {"type": "SingleNamespace", "supported": true},
                {"type": "MultiNamespace", "supported": false},
                {"type": "AllNamespaces", "supported": true},
            ],
            "customresourcedefinitions": {"owned": owned},
            "install": {
                "strategy": "deployment",
                "spec": {
                    "clusterPermissions": [{
                        "serviceAccountName": NAME,
                        "rules": install::rules_json(&install::cluster_rules()),
                    }],
                    "permissions": [{
                        "serviceAccountName": NAME,
                        "rules": install::rules_json(&install::namespaced_rules()),
                    }],
                    "deployments": [{
                        "name": NAME,
                        "label": install::labels(),
                        "spec": install::manager_deployment_spec(watch),
                    }],
                }
            },
            "relatedImages": [
                {"name": "manager", "image": image},
                {"name": "instance-manager", "image": format!("{}:{VERSION}", install::INSTANCE_IMAGE_REPOSITORY)},
            ],
        }
    }))
}
