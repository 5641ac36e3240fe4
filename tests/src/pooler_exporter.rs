//! The Pooler pods' metrics exporter (`pg-instance pooler-exporter`) as tests run it: the real
//! binary on a free loopback port in front of a PgBouncer, with the admin user's password in a
//! file as the pod mounts it, stopped on drop; and the reading of what it serves (one GET, one
//! sample's value).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::process::{ChildGuard, die_with_parent};

/// A running `pg-instance pooler-exporter`.
pub struct PoolerExporter {
    process: ChildGuard,
    port: u16,
    dir: tempfile::TempDir,
}

impl PoolerExporter {
    /// Starts `binary` (the `pg-instance` the test crate built: `env!("CARGO_BIN_EXE_pg-instance")`)
    /// as the exporter of the PgBouncer on 127.0.0.1:`pgbouncer_port`, logging in as `user` with
    /// `password` (written to a file with a trailing newline, as an editor would leave it), and
    /// waits until `/healthz` answers.
    pub fn start(
        binary: &Path,
        pgbouncer_port: u16,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pooler-exporter-")
            .tempdir()?;
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, format!("{password}\n"))?;
        let log = std::fs::File::create(dir.path().join("exporter.log"))?;
        let port = crate::free_port();
        let mut command = Command::new(binary);
        command
            .arg("pooler-exporter")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--pgbouncer-port")
            .arg(pgbouncer_port.to_string())
            .arg("--user")
            .arg(user)
            .arg("--password-file")
            .arg(&password_file)
            .env("LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {} pooler-exporter", binary.display()))?;
        let mut exporter = Self {
            process: ChildGuard::new(child, Signal::SIGTERM, Duration::from_secs(5)),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(exporter.get("/healthz"), Ok((200, _))) {
            if let Some(status) = exporter.process.try_wait() {
                bail!("the exporter exited ({status}):\n{}", exporter.log());
            }
            if Instant::now() > deadline {
                bail!("the exporter did not answer in 15 s:\n{}", exporter.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(exporter)
    }

    /// Its HTTP port (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("exporter.log")).unwrap_or_default()
    }

    /// GET `path`: the status code and the body.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        get(self.port, path)
    }

    /// GET `/metrics`, which must answer 200.
    pub fn scrape(&self) -> anyhow::Result<String> {
        match self.get("/metrics")? {
            (200, body) => Ok(body),
            (status, body) => bail!("/metrics answered {status}: {body}"),
        }
    }
}

/// GET `path` on 127.0.0.1:`port` (HTTP/1.0, one request per connection): status and body.
pub fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// GET `path` on `address` (a pod's IP and port, for example): status and body.
pub fn get_at(address: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP body in the response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no HTTP status in the response")?;
    Ok((status, body.to_string()))
}

/// The value of the first sample of `name` whose labels include every pair of `labels`.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let end = line.find(['{', ' '])?;
        if &line[..end] != name {
            return None;
        }
        let (label_text, value) = match line[end..].strip_prefix('{') {
            Some(rest) => rest.rsplit_once("} ")?,
            None => ("", line[end..].trim()),
        };
        let all = labels
            .iter()
            .all(|(label, expected)| label_text.contains(&format!("{label}=\"{expected}\"")));
        if !all {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_found_by_name_and_labels() {
        let text = "# TYPE a counter\na_total{database=\"x\",user=\"u\"} 3\na_total{database=\"y\",user=\"u\"} 4\nb 1.5\n";
        assert_eq!(sample(text, "a_total", &[("database", "y")]), Some(4.0));
        assert_eq!(sample(text, "a_total", &[]), Some(3.0));
        assert_eq!(sample(text, "b", &[]), Some(1.5));
        assert_eq!(sample(text, "a_total", &[("database", "z")]), None);
        assert_eq!(sample(text, "a", &[]), None);
    }
}
