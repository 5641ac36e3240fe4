//! The release: the license check (our workspace passes, a planted GPL dependency fails it),
//! the signed artifacts `cargo xtask release` writes (cosign verifies every signature, the SBOMs
//! validate against the CycloneDX schema) and the key pairs it signs with.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use testbed::delivery::{run, run_ok};
use testbed::paths;

use super::{helm, root, xtask, xtask_with_env};

#[test]
fn license_check_passes_the_workspace_and_refuses_a_planted_gpl_dependency() {
    let ours = xtask(&["licenses"]);
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );

    let fixture = tempfile::tempdir().unwrap();
    testbed::delivery::copy_dir(
        &root().join("xtask/tests/fixtures/copyleft"),
        fixture.path(),
    )
    .unwrap();
    let manifest = fixture.path().join("Cargo.toml");
    let output = xtask(&[
        "licenses",
        "--manifest-path",
        &manifest.display().to_string(),
    ]);
    assert!(
        !output.status.success(),
        "a GPL dependency must fail the check"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gpl-dep 1.0.0"), "{stderr}");
    assert!(stderr.contains("GPL-3.0-only"), "{stderr}");
    assert!(!stderr.contains("permissive-app"), "{stderr}");
}

fn cosign_verify(dir: &Path, key: &str, artifact: &str) -> std::process::Output {
    let signature = format!("{artifact}.sig");
    run(
        &paths::cosign(),
        &[
            "verify-blob",
            "--key",
            &dir.join(key).display().to_string(),
            "--signature",
            &dir.join(signature).display().to_string(),
            "--insecure-ignore-tlog=true",
            &dir.join(artifact).display().to_string(),
        ],
        None,
    )
    .unwrap()
}

#[test]
fn release_writes_signed_artifacts_that_cosign_verifies_and_a_valid_sbom() {
    // Arrange: two key pairs of our own, outside the artifacts.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("artifacts");
    let keys = work.path().join("keys");
    let other_keys = work.path().join("other-keys");
    for folder in [&keys, &other_keys] {
        let output = xtask(&["keygen", "--out", &folder.display().to_string()]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // Act: the whole release, binaries included. Built with the dev profile: `cargo xtask test`
    // has built these binaries already, and an optimised build (651 s alone on two cores, most
    // of the test run beside the end-to-end tests) would check nothing more here.
    let output = xtask(&[
        "release",
        "--profile",
        "dev",
        "--out",
        &out.display().to_string(),
        "--key",
        &keys.join("cosign.key").display().to_string(),
    ]);
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{progress}");
    assert!(progress.contains("[8/8]"), "shows progress: {progress}");
    assert_eq!(
        std::fs::read_to_string(out.join("cosign.pub")).unwrap(),
        std::fs::read_to_string(keys.join("cosign.pub")).unwrap(),
        "the release publishes the public half of the key it signed with"
    );
    assert!(
        !out.join("cosign.key").exists(),
        "no private key among the artifacts"
    );

    // Assert: the manifest lists every artifact with its digest; cosign accepts every signature.
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("release-manifest.json")).unwrap())
            .unwrap();
    let artifacts = manifest["artifacts"].as_array().unwrap();
    let names: Vec<&str> = artifacts
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for expected in [
        "postgres-operator-crds.yaml",
        "sbom/postgres-operator-workspace.cdx.json",
        "sbom/postgres-operator.cdx.json",
        "sbom/pg-instance.cdx.json",
        "sbom/pg-router.cdx.json",
        "bin/postgres-operator",
        "bin/pg-instance",
        "bin/pg-router",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    // The shipped binaries run and say which version they are.
    for binary in ["postgres-operator", "pg-instance", "pg-router"] {
        let version = std::process::Command::new(out.join("bin").join(binary))
            .arg("--version")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&version.stdout);
        assert!(
            version.status.success() && stdout.contains(env!("CARGO_PKG_VERSION")),
            "{binary} --version: {stdout}{}",
            String::from_utf8_lossy(&version.stderr)
        );
    }
    assert!(names.iter().any(|n| n.ends_with(".tgz")));
    assert!(
        names
            .iter()
            .any(|n| n.contains("bundle") && n.ends_with(".tar.gz"))
    );
    for artifact in artifacts {
        let name = artifact["name"].as_str().unwrap();
        let data = std::fs::read(out.join(name)).unwrap();
        assert_eq!(artifact["size"], data.len());
        let digest: String = ring::digest::digest(&ring::digest::SHA256, &data)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(artifact["sha256"], digest.as_str(), "{name}");
        let verified = cosign_verify(&out, "cosign.pub", name);
        assert!(
            verified.status.success(),
            "cosign verify-blob {name}: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    let verified = cosign_verify(&out, "cosign.pub", "release-manifest.json");
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // The packaged chart is a chart helm reads.
    let chart = names.iter().find(|n| n.ends_with(".tgz")).unwrap();
    run_ok(
        &paths::helm(),
        &["lint", "--strict", &out.join(chart).display().to_string()],
        None,
    )
    .unwrap();
    let from_package = helm(&["template", "pg", &out.join(chart).display().to_string()]).unwrap();
    let from_folder = helm(&["template", "pg", &super::chart()]).unwrap();
    assert_eq!(
        from_package, from_folder,
        "the package holds the whole chart"
    );

    // A tampered artifact is rejected.
    let crds = out.join("postgres-operator-crds.yaml");
    let mut text = std::fs::read_to_string(&crds).unwrap();
    text.push_str("# tampered\n");
    std::fs::write(&crds, text).unwrap();
    let tampered = cosign_verify(&out, "cosign.pub", "postgres-operator-crds.yaml");
    assert!(
        !tampered.status.success(),
        "cosign must reject a tampered artifact"
    );

    // A signature checked with another public key is rejected.
    let wrong_key = cosign_verify(&out, "../other-keys/cosign.pub", "release-manifest.json");
    assert!(
        !wrong_key.status.success(),
        "cosign must reject a signature by another key"
    );

    // SBOMs: valid CycloneDX 1.5; the binary's holds what it links, not xtask's tools.
    let sboms: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("sbom/"))
        .map(|n| out.join(n).display().to_string())
        .collect();
    let mut args = vec!["validate-sbom"];
    args.extend(sboms.iter().map(String::as_str));
    let validated = xtask(&args);
    assert!(
        validated.status.success(),
        "{}",
        String::from_utf8_lossy(&validated.stderr)
    );
    let router: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("sbom/pg-router.cdx.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(router["bomFormat"], "CycloneDX");
    assert_eq!(router["specVersion"], "1.5");
    let components: Vec<&str> = router["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(components.contains(&"router"));
    assert!(components.contains(&"tokio"));
    assert!(
        !components.contains(&"jsonschema"),
        "xtask's tools are not in pg-router"
    );
    let tokio = router["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tokio")
        .unwrap();
    assert_eq!(
        tokio["hashes"][0]["alg"], "SHA-256",
        "registry crates carry their checksum"
    );
    assert_eq!(tokio["hashes"][0]["content"].as_str().unwrap().len(), 64);
    assert!(router["components"].as_array().unwrap().iter().all(|c| {
        c["purl"]
            .as_str()
            .is_some_and(|p| p.starts_with("pkg:cargo/"))
    }));

    // The schema check is real: a broken SBOM fails it.
    let mut broken = router.clone();
    broken["components"][0]["type"] = json!("spaceship");
    let broken_path = work.path().join("broken.cdx.json");
    std::fs::write(&broken_path, broken.to_string()).unwrap();
    let refused = xtask(&["validate-sbom", &broken_path.display().to_string()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("spaceship"));
}

#[test]
fn release_signs_with_a_key_pair_from_cosign_generate_key_pair() {
    // Arrange: a key pair as release engineers make it, with real cosign and a password.
    let work = tempfile::tempdir().unwrap();
    let password = "release engineers' passphrase";
    let generated = Command::new(paths::cosign())
        .arg("generate-key-pair")
        .env("COSIGN_PASSWORD", password)
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let key = work.path().join("cosign.key");
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    );
    let out = work.path().join("artifacts");
    let release = |password: &str| {
        xtask_with_env(
            &[
                "release",
                "--skip-binaries",
                "--out",
                &out.display().to_string(),
                "--key",
                &key.display().to_string(),
            ],
            &[("COSIGN_PASSWORD", password)],
        )
    };

    // Act + assert: a wrong password is refused before any work, and never shown.
    let refused = release("not the passphrase");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("wrong COSIGN_PASSWORD or corrupt key"),
        "{stderr}"
    );
    assert!(!stderr.contains("not the passphrase"), "{stderr}");
    assert!(
        !out.exists(),
        "nothing released with a key that did not open"
    );

    // Act: release with the right password.
    let output = release(password);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Assert: cosign verifies our signatures with its own public key, and rejects a tampered file.
    std::fs::copy(
        work.path().join("cosign.pub"),
        out.join("cosign-generated.pub"),
    )
    .unwrap();
    for artifact in ["release-manifest.json", "postgres-operator-crds.yaml"] {
        let verified = cosign_verify(&out, "cosign-generated.pub", artifact);
        assert!(
            verified.status.success(),
            "cosign verify-blob {artifact}: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    let manifest = out.join("release-manifest.json");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push('\n');
    std::fs::write(&manifest, text).unwrap();
    let tampered = cosign_verify(&out, "cosign-generated.pub", "release-manifest.json");
    assert!(
        !tampered.status.success(),
        "cosign must reject a tampered artifact"
    );
}

#[test]
fn keygen_with_a_password_writes_a_key_pair_that_cosign_opens() {
    // Arrange + act: our keygen with a password, as `cosign generate-key-pair` would be run.
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    let password = "a release passphrase";
    let output = xtask_with_env(
        &["keygen", "--out", &keys.display().to_string()],
        &[("COSIGN_PASSWORD", password)],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let private = std::fs::read_to_string(keys.join("cosign.key")).unwrap();
    assert!(
        private.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"),
        "encrypted as cosign encrypts"
    );

    // Assert: real cosign opens the private key with the password and derives our public key,
    // and signs with it a blob that cosign verifies against our cosign.pub.
    let derived = Command::new(paths::cosign())
        .args(["public-key", "--key", "keys/cosign.key"])
        .env("COSIGN_PASSWORD", password)
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        derived.status.success(),
        "{}",
        String::from_utf8_lossy(&derived.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&derived.stdout).trim(),
        std::fs::read_to_string(keys.join("cosign.pub"))
            .unwrap()
            .trim()
    );
    std::fs::write(work.path().join("blob"), "signed by cosign with our key").unwrap();
    let signed = Command::new(paths::cosign())
        .args([
            "sign-blob",
            "--key",
            "keys/cosign.key",
            "--tlog-upload=false",
            "--output-signature",
            "blob.sig",
            "blob",
        ])
        .env("COSIGN_PASSWORD", password)
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    std::fs::copy(keys.join("cosign.pub"), work.path().join("cosign.pub")).unwrap();
    let verified = cosign_verify(work.path(), "cosign.pub", "blob");
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // And the wrong password opens nothing, in cosign as in ours.
    let refused = Command::new(paths::cosign())
        .args(["public-key", "--key", "keys/cosign.key"])
        .env("COSIGN_PASSWORD", "wrong")
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
}
