//! A real PostgreSQL 18 server for one test: initdb as an unprivileged user, a free loopback port,
//! stopped (fast shutdown) and deleted on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::paths;
use crate::process::{ChildGuard, chown_to_unprivileged, unprivileged_command};

/// How to start a [`Postgres`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// pg_hba method for loopback connections (`trust` or `scram-sha-256`).
    pub auth_method: String,
    /// Password of the `postgres` superuser (needed with scram-sha-256).
    pub superuser_password: Option<String>,
    /// Turn fsync off (faster; safe against process crashes, not against OS crashes).
    pub fsync_off: bool,
    /// Speak TLS with this certificate, and TLS only over TCP (`hostssl`; plain TCP is
    /// refused), as the operator's clusters do. Uses the OpenSSL build of PostgreSQL
    /// (`paths::pg_bin_tls`).
    pub tls: Option<crate::pg_tls::ServerTls>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            settings: Vec::new(),
            auth_method: "trust".to_string(),
            superuser_password: None,
            fsync_off: true,
            tls: None,
        }
    }
}

impl PostgresOptions {
    /// Adds a `-c name=value` setting.
    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }
}

/// A running PostgreSQL server owned by a test.
#[derive(Debug)]
pub struct Postgres {
    server: ChildGuard,
    port: u16,
    password: Option<String>,
    /// TCP takes TLS clients only: the fixture's own clients use the Unix socket.
    tls: bool,
    // Dropped last: the server must be stopped before its data directory goes.
    dir: TempDir,
}

impl Postgres {
    /// initdb + start with the default options (trust auth on loopback).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(PostgresOptions::default())
    }

    /// initdb + start with `options`.
    pub fn start_with(options: PostgresOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("pgtest-").tempdir()?;
        chown_to_unprivileged(dir.path())?;
        let data = dir.path().join("data");
        let bin = if options.tls.is_some() {
            paths::pg_bin_tls()
        } else {
            paths::pg_bin()
        };
        if !bin.join("postgres").exists() {
            bail!(
                "PostgreSQL 18 binaries not found in {} (run `cargo xtask setup`, or set PG_BIN)",
                bin.display()
            );
        }

        let mut initdb = unprivileged_command(bin.join("initdb"))?;
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--data-checksums",
                "--no-sync",
            ])
            .arg(format!("--auth={}", options.auth_method));
        let pwfile = dir.path().join("pwfile");
        if let Some(password) = &options.superuser_password {
            fs::write(&pwfile, password)?;
            chown_to_unprivileged(&pwfile)?;
            initdb.arg(format!("--pwfile={}", pwfile.display()));
        }
        let output = initdb.output().context("running initdb")?;
        let _ = fs::remove_file(&pwfile);
        if !output.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }

        let mut options = options;
        if let Some(tls) = options.tls.clone() {
            Self::install_tls(dir.path(), &data, &tls, &options.auth_method)?;
            let file = |name: &str| dir.path().join(name).display().to_string();
            options = options
                .setting("ssl", "on")
                .setting("ssl_cert_file", file("server.crt"))
                .setting("ssl_key_file", file("server.key"));
            if tls.ca_pem.is_some() {
                options = options.setting("ssl_ca_file", file("ca.crt"));
            }
        }

        // A port can be taken between picking and binding it; try a few.
        let mut last_error = None;
        for _ in 0..5 {
            let port = crate::free_port();
            match Self::spawn_server(&bin, dir.path(), port, &options) {
                Ok(server) => {
                    return Ok(Self {
                        server,
                        port,
                        password: options.superuser_password.clone(),
                        tls: options.tls.is_some(),
                        dir,
                    });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap())
    }

    /// The certificate and key next to the data directory (PostgreSQL demands a key only its
    /// user can read), and a pg_hba.conf that takes TCP clients over TLS only.
    fn install_tls(
        dir: &Path,
        data: &Path,
        tls: &crate::pg_tls::ServerTls,
        auth_method: &str,
    ) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let files = [
            ("server.crt", Some(&tls.certificate_pem)),
            ("server.key", Some(&tls.key_pem)),
            ("ca.crt", tls.ca_pem.as_ref()),
        ];
        for (name, text) in files
            .iter()
            .filter_map(|(name, text)| Some((name, (*text)?)))
        {
            let path = dir.join(name);
            fs::write(&path, text)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            chown_to_unprivileged(&path)?;
        }
        let hba = data.join("pg_hba.conf");
        fs::write(
            &hba,
            format!(
                "local all all {auth_method}\nhostssl all all 127.0.0.1/32 {auth_method}\n\
                 hostssl all all ::1/128 {auth_method}\n"
            ),
        )?;
        chown_to_unprivileged(&hba)?;
        Ok(())
    }

    fn spawn_server(
        bin: &Path,
        dir: &Path,
        port: u16,
        options: &PostgresOptions,
    ) -> anyhow::Result<ChildGuard> {
        let log_path = dir.join("postgres.log");
        let log = fs::File::create(&log_path)?;
        chown_to_unprivileged(&log_path)?;
        let mut command = unprivileged_command(bin.join("postgres"))?;
        command
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()));
        if options.fsync_off {
            command.args(["-c", "fsync=off"]);
        }
        for (name, value) in &options.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().context("spawning postgres")?;
        let mut server = ChildGuard::new(child, Signal::SIGINT, Duration::from_secs(10));

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.try_wait() {
                bail!(
                    "postgres exited ({status}) on port {port}: {}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres on port {port} not ready after 30 s: {}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Process id of the postmaster.
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// libpq keyword/value connection string for `database` as the superuser (no password in it);
    /// over the Unix socket when TCP takes TLS clients only.
    pub fn connection_string(&self, database: &str) -> String {
        let host = if self.tls {
            self.dir.path().display().to_string()
        } else {
            "127.0.0.1".to_string()
        };
        format!(
            "host={host} port={} user=postgres dbname={database}",
            self.port
        )
    }

    /// A tokio-postgres client to the `postgres` database as the superuser; its connection task
    /// runs on the current runtime.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        self.client_for("postgres").await
    }

    /// A tokio-postgres client to `database` as the superuser.
    pub async fn client_for(&self, database: &str) -> anyhow::Result<tokio_postgres::Client> {
        let mut config: tokio_postgres::Config = self.connection_string(database).parse()?;
        if let Some(password) = &self.password {
            config.password(password);
        }
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to PostgreSQL on port {}", self.port))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "test connection closed");
            }
        });
        Ok(client)
    }

    /// Runs `sql` with psql (`-X -A -t -v ON_ERROR_STOP=1`) and returns its standard output.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut command = Command::new(paths::pg_bin().join("psql"));
        command
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.connection_string("postgres"))
            .args(["-c", sql]);
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", password);
        }
        let output = command.output().context("running psql")?;
        if !output.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Replaces the server's certificate and key (as an instance manager does when its Secret
    /// is renewed) and reloads the configuration: new connections get the new certificate.
    pub async fn replace_tls(&self, tls: &crate::pg_tls::ServerTls) -> anyhow::Result<()> {
        anyhow::ensure!(self.tls, "this server was started without TLS");
        // Written over the files in place: they keep the owner and mode PostgreSQL demands.
        fs::write(self.dir.path().join("server.crt"), &tls.certificate_pem)?;
        fs::write(self.dir.path().join("server.key"), &tls.key_pem)?;
        self.client()
            .await?
            .batch_execute("SELECT pg_reload_conf()")
            .await?;
        Ok(())
    }

    /// Kills the postmaster with SIGKILL (a crash).
    pub fn kill_hard(&mut self) {
        self.server.kill_hard();
    }
}
