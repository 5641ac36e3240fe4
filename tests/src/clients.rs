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

fn lock(name: &str) -> anyhow::Result<fs::File> {
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
    let target = paths::workspace_root().join("target").join("pyclients");
    let marker = target.join(format!(".installed-psycopg{PSYCOPG}-asyncpg{ASYNCPG}"));
    if marker.exists() {
        return Ok(target);
    }
    let _lock = lock("pyclients")?;
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
        .arg(format!("psycopg[binary]=={PSYCOPG}"))
        .arg(format!("asyncpg=={ASYNCPG}"))
        .status()
        .context("running pip (python3 -m pip) to install psycopg and asyncpg")?;
    if !status.success() {
        bail!("pip install of psycopg {PSYCOPG} and asyncpg {ASYNCPG} failed ({status})");
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
