//! A streaming replica of a test bed [`Postgres`]: `pg_basebackup -R -C -S <slot>` (the slot is
//! created on the primary), started on a free port, stopped on drop or by [`Replica::stop`].

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::process::{ChildGuard, chown_to_unprivileged, unprivileged_command};
use crate::{Postgres, paths};

/// A streaming replica; its data directory goes with it.
pub struct Replica {
    server: Option<ChildGuard>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Replica {
    /// Clones `primary` through slot `slot` and starts the copy; returns once it accepts
    /// connections (30 s at most).
    pub fn start(primary: &Postgres, slot: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pgtest-replica-")
            .tempdir()?;
        chown_to_unprivileged(dir.path())?;
        let data = dir.path().join("data");
        let output = unprivileged_command(paths::pg_bin().join("pg_basebackup"))?
            .arg("-D")
            .arg(&data)
            .args(["-R", "-C", "-S", slot, "-X", "stream", "-c", "fast"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(primary.port().to_string())
            .output()
            .context("running pg_basebackup")?;
        if !output.status.success() {
            bail!("pg_basebackup: {}", String::from_utf8_lossy(&output.stderr));
        }
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log"))?;
        let child = unprivileged_command(paths::pg_bin().join("postgres"))?
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=off", "-c", "archive_mode=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let server = ChildGuard::new(child, Signal::SIGINT, Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(paths::pg_bin().join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("replica on port {port} not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            server: Some(server),
            port,
            _dir: dir,
        })
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (a fast shutdown); its data directory stays until drop.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop();
        }
    }
}
