//! Client libraries for compatibility tests, installed on first use into project-local folders
//! under `target/` (a fresh machine has none of them):
//! - psycopg 3 and asyncpg from PyPI (`pip install --target target/pyclients`);
//! - the PostgreSQL JDBC driver from Maven Central (`mvn dependency:copy` into `target/jdbc`).
//!
//! Installs are serialized with a lock file so parallel tests do not race.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use crate::paths;

/// psycopg version installed for tests.
pub const PSYCOPG: &str = "3.3.6";
/// asyncpg version installed for tests.
pub const ASYNCPG: &str = "0.31.0";
/// PostgreSQL JDBC driver version installed for tests.
pub const PGJDBC: &str = "42.7.8";

/// An exclusive file lock `target/.<name>.lock`, held until the file is dropped: test binaries
/// running in parallel install a tool once.
pub(crate) fn lock(name: &str) -> anyhow::Result<fs::File> {
    let dir = paths::workspace_root().join("target");
    fs::create_dir_all(&dir)?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!(".{name}.lock")))?;
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    if rc != 0 {
        bail!("locking {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Folder to put on `PYTHONPATH` for psycopg and asyncpg.
pub fn python_clients() -> anyhow::Result<PathBuf> {
    pip_folder(
        "pyclients",
        &[
            format!("psycopg[binary]=={PSYCOPG}"),
            format!("asyncpg=={ASYNCPG}"),
        ],
    )
}

/// Installs `requirements` with pip into `target/<folder>` once (a marker names the versions, a
/// file lock keeps parallel test binaries from installing twice) and returns the folder, to put
/// on `PYTHONPATH`.
pub(crate) fn pip_folder(folder: &str, requirements: &[String]) -> anyhow::Result<PathBuf> {
    let target = paths::workspace_root().join("target").join(folder);
    let versions: String = requirements
        .join("-")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect();
    let marker = target.join(format!(".installed-{versions}"));
    if marker.exists() {
        return Ok(target);
    }
    let _lock = lock(folder)?;
    if marker.exists() {
        return Ok(target);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&target)
        .args(requirements)
        .status()
        .with_context(|| format!("running pip ({python} -m pip) to install {requirements:?}"))?;
    if !status.success() {
        bail!("pip install of {requirements:?} failed ({status})");
    }
    fs::write(&marker, "")?;
    Ok(target)
}

/// Path of the PostgreSQL JDBC driver jar.
pub fn jdbc_jar() -> anyhow::Result<PathBuf> {
    let dir = paths::workspace_root().join("target").join("jdbc");
    let jar = dir.join(format!("postgresql-{PGJDBC}.jar"));
    if jar.exists() {
        return Ok(jar);
    }
    let _lock = lock("jdbc")?;
    if jar.exists() {
        return Ok(jar);
    }
    let status = Command::new("mvn")
        .args(["-q", "-B", "dependency:copy"])
        .arg(format!("-Dartifact=org.postgresql:postgresql:{PGJDBC}"))
        .arg(format!("-DoutputDirectory={}", dir.display()))
        .status()
        .context("running mvn to fetch the PostgreSQL JDBC driver")?;
    if !status.success() || !jar.exists() {
        bail!("mvn dependency:copy of org.postgresql:postgresql:{PGJDBC} failed ({status})");
    }
    Ok(jar)
}
