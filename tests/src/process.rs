//! Child processes that die with the test: an unprivileged user for PostgreSQL, and a guard that
//! stops a child on drop.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};

/// Name of the unprivileged user that runs PostgreSQL when the tests run as root.
pub const UNPRIVILEGED_USER: &str = "pgtest";

/// The uid/gid PostgreSQL must run as: `None` when we are not root (run as ourselves), else the
/// `pgtest` user, created on first use.
pub fn unprivileged_ids() -> anyhow::Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    if let Some(user) = User::from_name(UNPRIVILEGED_USER)? {
        return Ok(Some((user.uid, user.gid)));
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg(UNPRIVILEGED_USER)
        .status()
        .context("running useradd to create the unprivileged PostgreSQL user")?;
    // Another test may have created it at the same moment; look again either way.
    match User::from_name(UNPRIVILEGED_USER)? {
        Some(user) => Ok(Some((user.uid, user.gid))),
        None => bail!("useradd {UNPRIVILEGED_USER} failed ({status}) and the user does not exist"),
    }
}

/// Gives `path` (recursively) to the unprivileged user, when there is one.
pub fn chown_to_unprivileged(path: &Path) -> anyhow::Result<()> {
    if let Some((uid, gid)) = unprivileged_ids()? {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()?;
        if !status.success() {
            bail!("chown {} failed: {status}", path.display());
        }
    }
    Ok(())
}

/// A command that runs as the unprivileged user (when we are root) and is killed when the thread
/// that spawned it exits, so that a crashed test leaves no server behind.
pub fn unprivileged_command(program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = unprivileged_ids()? {
        command.uid(uid.as_raw()).gid(gid.as_raw());
    }
    die_with_parent(&mut command);
    Ok(command)
}

/// Asks the kernel to SIGKILL the child when its parent thread exits.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Owns a child process; on drop sends `stop_signal`, waits up to `grace`, then kills it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    stop_signal: Signal,
    grace: Duration,
}

impl ChildGuard {
    /// Wraps a spawned child.
    pub fn new(child: Child, stop_signal: Signal, grace: Duration) -> Self {
        Self {
            child: Some(child),
            stop_signal,
            grace,
        }
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    /// Whether the child has exited (and its exit status when it has).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops the child now, as drop would.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, self.stop_signal);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the child with SIGKILL at once (a crash, for failure tests).
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}
