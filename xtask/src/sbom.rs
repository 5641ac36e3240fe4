//! CycloneDX 1.5 SBOMs of the workspace and of each binary, built from `cargo metadata` with the
//! `cyclonedx-bom` crate, and validated offline against the vendored CycloneDX JSON schema.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, bail};
use cargo_metadata::{DependencyKind, Metadata, MetadataCommand, Package, PackageId};
use cyclonedx_bom::external_models::uri::Purl;
use cyclonedx_bom::models::bom::{Bom, SpecVersion};
use cyclonedx_bom::models::component::{Classification, Component, Components};
use cyclonedx_bom::models::dependency::{Dependencies, Dependency};
use cyclonedx_bom::models::hash::{Hash, HashAlgorithm, HashValue, Hashes};
use cyclonedx_bom::models::license::{LicenseChoice, Licenses};
use cyclonedx_bom::models::metadata::Metadata as BomMetadata;
use cyclonedx_bom::models::tool::{Tool, Tools};
use serde_json::Value;

/// Which dependency edges count: what ships (normal) and what builds it (build), never dev-only.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Edges {
    /// Normal dependencies only: what is linked into a binary.
    Runtime,
    /// Normal and build dependencies: the supply chain of a build.
    Build,
}

/// `cargo metadata` of the workspace at `manifest_path`, resolved for this host's platform.
pub fn metadata(manifest_path: &Path) -> anyhow::Result<Metadata> {
    let mut command = MetadataCommand::new();
    command.manifest_path(manifest_path);
    if let Some(target) = host_target() {
        command.other_options(vec!["--filter-platform".to_string(), target]);
    }
    command
        .exec()
        .with_context(|| format!("cargo metadata of {}", manifest_path.display()))
}

fn host_target() -> Option<String> {
    let output = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_string))
}

/// Packages reachable from `roots` over `edges` (the roots included).
pub fn reachable(metadata: &Metadata, roots: &[PackageId], edges: Edges) -> BTreeSet<PackageId> {
    let resolve = metadata
        .resolve
        .as_ref()
        .expect("cargo metadata resolves dependencies");
    let nodes: BTreeMap<&PackageId, _> = resolve.nodes.iter().map(|n| (&n.id, n)).collect();
    let mut seen: BTreeSet<PackageId> = BTreeSet::new();
    let mut queue: Vec<PackageId> = roots.to_vec();
    while let Some(id) = queue.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(node) = nodes.get(&id) else { continue };
        for dep in &node.deps {
            let follows = dep.dep_kinds.iter().any(|k| match k.kind {
                DependencyKind::Normal => true,
                DependencyKind::Build => edges == Edges::Build,
                _ => false,
            });
            if follows {
                queue.push(dep.pkg.clone());
            }
        }
    }
    seen
}

/// The SPDX expression of a package, canonical when it parses (`MIT/Apache-2.0` -> `MIT OR Apache-2.0`).
pub fn license_expression(package: &Package) -> Option<String> {
    let raw = package.license.as_deref()?;
    Some(
        spdx::Expression::canonicalize(raw)
            .ok()
            .flatten()
            .unwrap_or_else(|| raw.to_string()),
    )
}

/// SHA-256 of each registry package's `.crate` file, from Cargo.lock: (name, version) -> checksum.
fn lock_checksums(metadata: &Metadata) -> anyhow::Result<BTreeMap<(String, String), String>> {
    let path = metadata.workspace_root.join("Cargo.lock");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let lock: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let mut checksums = BTreeMap::new();
    for package in lock
        .get("package")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        let field = |key: &str| {
            package
                .get(key)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        if let (Some(name), Some(version), Some(checksum)) =
            (field("name"), field("version"), field("checksum"))
        {
            checksums.insert((name, version), checksum);
        }
    }
    Ok(checksums)
}

fn component(
    package: &Package,
    workspace: bool,
    checksum: Option<&String>,
) -> anyhow::Result<Component> {
    let classification = if workspace {
        Classification::Application
    } else {
        Classification::Library
    };
    let version = package.version.to_string();
    let mut component = Component::new(
        classification,
        &package.name,
        &version,
        Some(package.id.repr.clone()),
    );
    component.purl = Some(Purl::new("cargo", &package.name, &version)?);
    if let Some(license) = license_expression(package) {
        component.licenses = Some(Licenses(vec![LicenseChoice::expression(&license)]));
    }
    if let Some(checksum) = checksum {
        component.hashes = Some(Hashes(vec![Hash {
            alg: HashAlgorithm::SHA_256,
            content: HashValue(checksum.clone()),
        }]));
    }
    if let Some(description) = &package.description {
        component.description = Some(cyclonedx_bom::prelude::NormalizedString::new(description));
    }
    Ok(component)
}

/// SBOM named `name` of the packages reachable from `roots`.
pub fn bom(
    metadata: &Metadata,
    name: &str,
    roots: &[PackageId],
    edges: Edges,
) -> anyhow::Result<Bom> {
    let included = reachable(metadata, roots, edges);
    let packages: BTreeMap<&PackageId, &Package> =
        metadata.packages.iter().map(|p| (&p.id, p)).collect();
    let members: BTreeSet<&PackageId> = metadata.workspace_members.iter().collect();
    let checksums = lock_checksums(metadata)?;
    let mut components = Vec::new();
    for id in &included {
        let package = packages
            .get(id)
            .with_context(|| format!("package {id} missing from cargo metadata"))?;
        let checksum = checksums.get(&(package.name.to_string(), package.version.to_string()));
        components.push(component(package, members.contains(id), checksum)?);
    }
    let resolve = metadata.resolve.as_ref().expect("resolved");
    let mut dependencies = Vec::new();
    for node in &resolve.nodes {
        if !included.contains(&node.id) {
            continue;
        }
        let mut deps: Vec<String> = node
            .deps
            .iter()
            .filter(|d| included.contains(&d.pkg))
            .filter(|d| {
                d.dep_kinds.iter().any(|k| {
                    k.kind == DependencyKind::Normal
                        || (edges == Edges::Build && k.kind == DependencyKind::Build)
                })
            })
            .map(|d| d.pkg.repr.clone())
            .collect();
        deps.sort();
        deps.dedup();
        dependencies.push(Dependency {
            dependency_ref: node.id.repr.clone(),
            dependencies: deps,
        });
    }
    let mut top = Component::new(
        Classification::Application,
        name,
        crate::operator_install::VERSION,
        Some(format!("{name}@{}", crate::operator_install::VERSION)),
    );
    top.licenses = Some(Licenses(vec![LicenseChoice::expression("MIT")]));
    let mut bom_metadata = BomMetadata::new()?;
    bom_metadata.component = Some(top);
    bom_metadata.tools = Some(Tools::List(vec![Tool::new(
        "keiailab",
        "cargo xtask release",
        crate::operator_install::VERSION,
    )]));
    Ok(Bom {
        metadata: Some(bom_metadata),
        components: Some(Components(components)),
        dependencies: Some(Dependencies(dependencies)),
        spec_version: SpecVersion::V1_5,
        ..Bom::default()
    })
}

/// CycloneDX 1.5 JSON of `bom`.
pub fn to_json(bom: &Bom) -> anyhow::Result<String> {
    let mut out = Vec::new();
    bom.clone()
        .output_as_json_v1_5(&mut out)
        .map_err(|e| anyhow::anyhow!("writing the CycloneDX JSON: {e}"))?;
    Ok(String::from_utf8(out)?)
}

/// The vendored schemas by file name (`$ref`s of the BOM schema are relative file names).
const SCHEMAS: [(&str, &str); 3] = [
    (
        "bom-1.5.SNAPSHOT.schema.json",
        include_str!("../schemas/cyclonedx/bom-1.5.SNAPSHOT.schema.json"),
    ),
    (
        "spdx.SNAPSHOT.schema.json",
        include_str!("../schemas/cyclonedx/spdx.SNAPSHOT.schema.json"),
    ),
    (
        "jsf-0.82.SNAPSHOT.schema.json",
        include_str!("../schemas/cyclonedx/jsf-0.82.SNAPSHOT.schema.json"),
    ),
];

/// Serves the vendored schemas (by the last path segment of the URI); never touches the network.
struct VendoredSchemas;

impl jsonschema::Retrieve for VendoredSchemas {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let file = uri.as_str().rsplit('/').next().unwrap_or_default();
        let (_, text) = SCHEMAS
            .iter()
            .find(|(name, _)| *name == file)
            .ok_or_else(|| format!("schema {uri} is not vendored"))?;
        Ok(serde_json::from_str(text)?)
    }
}

/// Validates a CycloneDX 1.5 JSON document against the official schema; fails listing every error.
pub fn validate(json: &str) -> anyhow::Result<()> {
    let schema: Value = serde_json::from_str(SCHEMAS[0].1)?;
    let validator = jsonschema::options()
        .with_retriever(VendoredSchemas)
        .build(&schema)
        .map_err(|e| anyhow::anyhow!("compiling the CycloneDX schema: {e}"))?;
    let document: Value = serde_json::from_str(json).context("the SBOM is not JSON")?;
    let errors: Vec<String> = validator
        .iter_errors(&document)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if !errors.is_empty() {
        bail!(
            "the SBOM does not conform to the CycloneDX 1.5 schema:\n{}",
            errors.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_rejects_an_unknown_component_type() {
        let good = r#"{"bomFormat":"CycloneDX","specVersion":"1.5","version":1,
            "components":[{"type":"library","name":"serde","version":"1.0.0"}]}"#;
        validate(good).unwrap();
        let bad = good.replace("\"library\"", "\"spaceship\"");
        assert!(validate(&bad).is_err());
    }
}
