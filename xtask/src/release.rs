//! `cargo xtask release`: every release artifact into one folder (default
//! `target/release-artifacts/`), each signed, with a manifest of SHA-256 digests:
//!
//! - `postgres-operator-crds.yaml`: every CRD, from the typed API;
//! - `postgres-operator-<version>.tgz`: the Helm chart package (`helm install` / `helm lint` read it);
//! - `postgres-operator-bundle-<version>.tar.gz`: the OLM bundle (`bundle/`);
//! - `sbom/*.cdx.json`: CycloneDX 1.5 SBOMs of the workspace and of each binary (schema-validated);
//! - `bin/<binary>`: `postgres-operator`, `pg-instance`, `pg-router` and `kubectl-pg`, built with
//!   the `release` profile (or the one `--profile` names);
//! - `release-manifest.json`: name, size and SHA-256 of every artifact;
//! - `<artifact>.sig` for each of the above and `cosign.pub`: verify with
//!   `cosign verify-blob --key cosign.pub --signature <artifact>.sig --insecure-ignore-tlog=true <artifact>`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

use crate::operator_install::VERSION;
use crate::sbom::{self, Edges};
use crate::signing::SigningKey;

/// The binaries of a release: (crate, binary).
pub const BINARIES: [(&str, &str); 4] = [
    ("controllers", "postgres-operator"),
    ("instance", "pg-instance"),
    ("router", "pg-router"),
    ("kubectl-pg", "kubectl-pg"),
];

/// Options of `cargo xtask release`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Folder for the artifacts (emptied first); default `target/release-artifacts`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// P-256 private key to sign with (also `$RELEASE_SIGNING_KEY`): the `cosign.key` of `cosign
    /// generate-key-pair`, opened with the password in `$COSIGN_PASSWORD`, or an unencrypted PKCS#8
    /// PEM. Without one, a new key pair is written to `target/release-signing/` (the private key
    /// never enters `--out`).
    #[arg(long, env = "RELEASE_SIGNING_KEY")]
    pub key: Option<PathBuf>,
    /// Do not build and ship the binaries (`cargo build --profile <profile>`), for a quick
    /// artifact check.
    #[arg(long)]
    pub skip_binaries: bool,
    /// The Cargo profile the binaries are built with. `release` is what ships; the delivery test
    /// passes `dev` to sign the binaries `cargo xtask test` has built already, as what it checks
    /// (signatures, SBOMs, manifest) does not depend on the optimisation level and an optimised
    /// build costs eleven minutes of a two-core machine.
    #[arg(long, default_value = "release")]
    pub profile: String,
}

struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    fn next(&mut self, what: &str) {
        self.step += 1;
        crate::step(&format!("[{}/{}] {what}", self.step, self.total));
    }
}

/// Runs the release.
pub fn run(options: Options) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let root = testbed::paths::workspace_root();
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("release-artifacts"));
    // Before any work: a wrong key or COSIGN_PASSWORD fails in a second, not after a build.
    let key = signing_key(&root, options.key.as_deref())?;
    let mut progress = Progress { step: 0, total: 8 };

    progress.next("checking that generated files match the typed API");
    crate::generate::run(true)?;

    progress.next("checking dependency licenses");
    let manifest = root.join("Cargo.toml");
    let count = crate::licenses::check(&manifest)?;
    crate::step(&format!("{count} packages pass the license policy"));

    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("emptying {}", out.display()))?;
    }
    fs::create_dir_all(out.join("sbom"))?;
    let mut artifacts: Vec<PathBuf> = Vec::new();

    progress.next("writing CycloneDX SBOMs and validating them against the schema");
    artifacts.extend(write_sboms(&manifest, &out.join("sbom"))?);

    progress.next("writing the CRDs");
    let crds = out.join("postgres-operator-crds.yaml");
    let mut text = String::new();
    for crd in api::all_crds() {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(&crd)?);
    }
    fs::write(&crds, text)?;
    artifacts.push(crds);

    progress.next("packaging the Helm chart");
    let chart = out.join(format!("postgres-operator-{VERSION}.tgz"));
    write_tar_gz(
        &root.join("charts/postgres-operator"),
        "postgres-operator",
        &chart,
    )?;
    artifacts.push(chart);

    progress.next("packaging the OLM bundle");
    let bundle = out.join(format!("postgres-operator-bundle-{VERSION}.tar.gz"));
    write_tar_gz(&root.join("bundle"), "bundle", &bundle)?;
    artifacts.push(bundle);

    progress.next("building the binaries");
    if options.skip_binaries {
        crate::step("skipped (--skip-binaries)");
    } else {
        artifacts.extend(build_binaries(&root, &options.profile, &out.join("bin"))?);
    }

    progress.next("writing the manifest and signing every artifact");
    fs::write(out.join("cosign.pub"), key.public_pem())?;
    let release_manifest = out.join("release-manifest.json");
    fs::write(
        &release_manifest,
        serde_json::to_string_pretty(&manifest_json(&out, &artifacts)?)? + "\n",
    )?;
    artifacts.push(release_manifest);
    for artifact in &artifacts {
        key.sign_file(artifact)?;
    }
    crate::step(&format!(
        "release {VERSION}: {} artifacts in {} (signed; public key cosign.pub) in {:.0} s",
        artifacts.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn signing_key(root: &Path, key: Option<&Path>) -> anyhow::Result<SigningKey> {
    if let Some(path) = key {
        return SigningKey::load(path);
    }
    let folder = root.join("target").join("release-signing");
    let path = folder.join("cosign.key");
    if path.exists() {
        return SigningKey::load(&path);
    }
    crate::step(&format!(
        "no --key given: generating a signing key pair in {}",
        folder.display()
    ));
    crate::signing::write_key_pair(&folder)
}

/// SBOMs of the workspace (normal + build dependencies) and of each binary (what it links).
pub fn write_sboms(manifest: &Path, folder: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let metadata = sbom::metadata(manifest)?;
    let mut written = Vec::new();
    let mut targets: Vec<(String, Vec<cargo_metadata::PackageId>, Edges)> = vec![(
        "postgres-operator-workspace".to_string(),
        metadata.workspace_members.clone(),
        Edges::Build,
    )];
    for (krate, binary) in BINARIES {
        if let Some(package) = metadata
            .packages
            .iter()
            .find(|p| p.name.as_str() == krate && metadata.workspace_members.contains(&p.id))
        {
            targets.push((binary.to_string(), vec![package.id.clone()], Edges::Runtime));
        }
    }
    for (name, roots, edges) in targets {
        let bom = sbom::bom(&metadata, &name, &roots, edges)?;
        let json = sbom::to_json(&bom)?;
        sbom::validate(&json).with_context(|| format!("SBOM of {name}"))?;
        let path = folder.join(format!("{name}.cdx.json"));
        fs::write(&path, json)?;
        written.push(path);
    }
    Ok(written)
}

/// A reproducible `.tar.gz` of `folder` under `prefix/` (sorted entries, zero mtimes and owners).
pub fn write_tar_gz(folder: &Path, prefix: &str, output: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    collect_files(folder, &mut files)?;
    files.sort();
    let encoder = GzEncoder::new(fs::File::create(output)?, Compression::default());
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    for file in files {
        let relative = file.strip_prefix(folder)?;
        let data = fs::read(&file)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder.append_data(
            &mut header,
            Path::new(prefix).join(relative),
            data.as_slice(),
        )?;
    }
    builder.into_inner()?.finish()?;
    Ok(())
}

fn collect_files(folder: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The `cargo build` arguments that build every binary of a release with Cargo profile `profile`.
/// `cargo xtask test` builds the binaries for its end-to-end tests with these same arguments, so
/// that the delivery test's `release --profile dev` finds them built (the same packages give the
/// same feature set, hence the same artifacts).
pub fn build_args(profile: &str) -> Vec<&str> {
    let mut args = vec!["build", "--locked", "--profile", profile];
    for (krate, _) in BINARIES {
        args.extend(["-p", krate]);
    }
    args
}

/// The folder under `target/` where Cargo puts what profile `profile` builds.
fn profile_folder(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

fn build_binaries(root: &Path, profile: &str, folder: &Path) -> anyhow::Result<Vec<PathBuf>> {
    crate::cargo(&build_args(profile))?;
    fs::create_dir_all(folder)?;
    let mut out = Vec::new();
    for (_, binary) in BINARIES {
        let built = root
            .join("target")
            .join(profile_folder(profile))
            .join(binary);
        if !built.exists() {
            bail!("{} was not built", built.display());
        }
        let destination = folder.join(binary);
        fs::copy(&built, &destination)?;
        out.push(destination);
    }
    Ok(out)
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn manifest_json(out: &Path, artifacts: &[PathBuf]) -> anyhow::Result<serde_json::Value> {
    let mut entries = Vec::new();
    for artifact in artifacts {
        let data = fs::read(artifact)?;
        let name = artifact.strip_prefix(out)?.to_string_lossy().to_string();
        entries.push(json!({
            "name": name,
            "size": data.len(),
            "sha256": sha256_hex(&data),
            "signature": format!("{name}.sig"),
        }));
    }
    Ok(json!({
        "name": "postgres-operator",
        "version": VERSION,
        "publicKey": "cosign.pub",
        "verify": "cosign verify-blob --key cosign.pub --signature <name>.sig --insecure-ignore-tlog=true <name>",
        "artifacts": entries,
    }))
}
