//! pg-router as a separate process, started the way a pod starts it. Tests give it port 0 and
//! read back where it listens: a port picked beforehand (bound, released, handed over) can be
//! taken by another process in between, for example as the ephemeral source port of an outgoing
//! connection when many test binaries run side by side, and the router then fails to start.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a router may take to listen (Kubernetes mode waits for a complete topology first).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a started router listens.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// Its PostgreSQL frontend.
    pub port: u16,
    /// Its metrics endpoint, when it has one.
    pub metrics_port: Option<u16>,
}

/// Sends `command`'s stdout and stderr to `log` (appended, so both keep their lines).
pub fn log_to(command: &mut Command, log: &Path) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
    command
        .stdout(file.try_clone().expect("cloning the log handle"))
        .stderr(Stdio::from(file));
}

/// The last lines of a router's log, for failure messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Waits until the router `child` (its output in `log`, see [`log_to`]) reports where it
/// listens. Kills it and fails the test with its log when it exits first or takes too long.
pub async fn listening(child: &mut Child, log: &Path) -> Listening {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let port_after = |prefix: &str| {
            text.lines().find_map(|line| {
                let address = line.strip_prefix(prefix)?;
                address.rsplit_once(':')?.1.trim().parse::<u16>().ok()
            })
        };
        if let Some(port) = port_after("pg-router listening on ") {
            return Listening {
                port,
                // Printed before the frontend's line.
                metrics_port: port_after("pg-router metrics on "),
            };
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || started.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pg-router did not start listening ({}); its log:\n{}",
                exited.map_or_else(
                    || format!("still starting after {START_TIMEOUT:?}"),
                    |status| format!("exited with {status}")
                ),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pg-router started by [`RouterProcess::start`], killed (SIGKILL) when dropped.
pub struct RouterProcess {
    /// The process.
    pub child: Child,
    /// Its PostgreSQL frontend.
    pub port: u16,
    /// Its metrics endpoint, when it has one.
    pub metrics_port: Option<u16>,
}

impl RouterProcess {
    /// Spawns `command` (a pg-router listening on port 0) with its output in `log`, and waits
    /// until it listens.
    pub async fn start(mut command: Command, log: &Path) -> Self {
        log_to(&mut command, log);
        let mut child = command.spawn().expect("starting pg-router");
        let Listening { port, metrics_port } = listening(&mut child, log).await;
        Self {
            child,
            port,
            metrics_port,
        }
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
