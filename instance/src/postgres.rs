//! The local PostgreSQL: its files (data directory, managed configuration, pg_hba, password
//! file), the programs that create or repair it (initdb, pg_basebackup, pg_rewind), and the
//! `postgres` child process (start, stop, restart, promote).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::process::{Child, Command};

use crate::cluster::Credentials;
use crate::config::Config;
use crate::connect::{ConnectError, connect_within};
use crate::error::{Error, Result};
use crate::quote;
use crate::tls::{self, TlsFiles};

/// Name of the configuration file the instance manager owns, included from postgresql.conf.
pub const MANAGED_CONFIG: &str = "pg-instance.conf";

/// How to stop PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, let WAL senders send everything (SIGINT).
    Fast,
    /// Stop at once, without a checkpoint (SIGQUIT): for fencing.
    Immediate,
}

/// Where this instance's PostgreSQL streams from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Host (pod IP).
    pub host: String,
    /// Port.
    pub port: u16,
}

/// The settings the instance manager writes to [`MANAGED_CONFIG`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManagedSettings {
    /// The primary to stream from (replicas); `None` for a primary or a replica with no primary.
    pub upstream: Option<Upstream>,
    /// `synchronous_standby_names`.
    pub synchronous_standby_names: String,
}

/// The local PostgreSQL server and its files.
pub struct LocalPostgres {
    bin: PathBuf,
    pgdata: PathBuf,
    pgwal: Option<PathBuf>,
    run_dir: PathBuf,
    listen_address: String,
    port: u16,
    pod: String,
    extra_settings: Vec<(String, String)>,
    ids: Option<(Uid, Gid)>,
    superuser: String,
    initdb_options: Vec<String>,
    child: Option<Child>,
    /// Archiving, WAL restore and recovery settings (see [`crate::backup`]).
    backup_settings: Vec<(String, String)>,
    /// TLS from the mounted certificate Secrets; `None` runs without TLS.
    tls: Option<TlsFiles>,
    /// The server's major version (`postgres --version`), read at the first start: the binary
    /// does not change under a running instance manager.
    server_major: std::sync::OnceLock<Option<u32>>,
    /// A replica cluster's source primary (host, port) to stream from, when it streams.
    replica_source: Option<(String, u16)>,
}

/// The major version in a `PG_VERSION` file's text (`18`).
fn major_of(text: &str) -> Option<u32> {
    text.split('.').next()?.parse().ok()
}

/// The major version in `postgres --version`'s output (`postgres (PostgreSQL) 18.6`, or a
/// vendor's `postgres (PostgreSQL) 19beta1 (Debian ...)`).
fn server_major(output: &str) -> Option<u32> {
    let version = output
        .split("(PostgreSQL)")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The lines of a PostgreSQL program's output that say what went wrong (`initdb: error: ...`,
/// `pg_rewind: hint: ...`, a server's `FATAL:`), or the whole output when none does: the rest
/// is progress (`The files belonging to this database system will be owned by ...`).
pub fn diagnosis(output: &str) -> String {
    const MARKS: [&str; 8] = [
        ": error:",
        ": fatal:",
        ": hint:",
        ": detail:",
        "FATAL:",
        "ERROR:",
        "PANIC:",
        "HINT:",
    ];
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|line| MARKS.iter().any(|mark| line.contains(mark)))
        .collect();
    if lines.is_empty() {
        output.trim().to_string()
    } else {
        lines.join("\n")
    }
}

/// initdb options for the encoding, locale and checksums of a new cluster.
pub fn initdb_options(encoding: &str, locale: &str, data_checksums: bool) -> Vec<String> {
    let mut options = vec![
        format!("--encoding={encoding}"),
        format!("--locale={locale}"),
    ];
    options.push(if data_checksums {
        "--data-checksums".into()
    } else {
        "--no-data-checksums".into()
    });
    options
}

impl LocalPostgres {
    /// Prepares the folders; resolves the unprivileged user when running as root.
    pub fn new(config: &Config, superuser: &str) -> Result<Self> {
        let ids = if Uid::effective().is_root() {
            let name = config.run_as_user.as_deref().ok_or_else(|| {
                Error::Invalid(
                    "pg-instance runs as root and PostgreSQL refuses to: set --run-as-user (PG_RUN_AS_USER) to an unprivileged user".into(),
                )
            })?;
            let user = User::from_name(name)
                .map_err(|error| Error::Invalid(format!("looking up user {name}: {error}")))?
                .ok_or_else(|| Error::Invalid(format!("user {name} does not exist")))?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        let postgres = Self {
            bin: config.pg_bin.clone(),
            pgdata: config.pgdata.clone(),
            pgwal: config.pgwal.clone(),
            run_dir: config.run_dir(),
            listen_address: config.listen_address.clone(),
            port: config.port,
            pod: config.pod_name.clone(),
            extra_settings: config.extra_settings(),
            ids,
            superuser: superuser.to_string(),
            initdb_options: initdb_options(
                &config.initdb_encoding,
                &config.initdb_locale,
                config.initdb_data_checksums,
            ),
            child: None,
            backup_settings: Vec::new(),
            tls: config
                .tls_dir
                .as_ref()
                .map(|mounted| TlsFiles::new(mounted, &config.run_dir())),
            server_major: std::sync::OnceLock::new(),
            replica_source: config
                .replica_source_host
                .clone()
                .filter(|_| config.replica_cluster)
                .map(|host| (host, config.replica_source_port)),
        };
        postgres.private_dir(&postgres.run_dir)?;
        Ok(postgres)
    }

    /// Name of the superuser.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// Data directory.
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// Free bytes on the data directory's file system (`None` when it cannot be read).
    pub fn available_bytes(&self) -> Option<u64> {
        let path = if self.pgdata.exists() {
            self.pgdata.as_path()
        } else {
            self.pgdata.parent()?
        };
        let stats = nix::sys::statvfs::statvfs(path).ok()?;
        Some(stats.blocks_available() as u64 * stats.fragment_size() as u64)
    }

    /// Whether the data directory holds a cluster.
    pub fn has_data(&self) -> bool {
        self.pgdata.join("PG_VERSION").exists()
    }

    /// Refuses to start a server of another major version than the data directory's (an image
    /// of the next major put in the catalog's entry, or in `spec.image`): PostgreSQL would exit
    /// with "database files are incompatible with server" on its standard error, which the
    /// status never sees; this says what to change instead. The data is left as it is.
    pub async fn check_major_version(&self) -> Result<()> {
        let Ok(text) = fs::read_to_string(self.pgdata.join("PG_VERSION")) else {
            return Ok(());
        };
        let server = match self.server_major.get() {
            Some(known) => *known,
            None => {
                let output = self
                    .run_program("postgres", self.command("postgres").arg("--version"))
                    .await?;
                *self.server_major.get_or_init(|| server_major(&output))
            }
        };
        match (major_of(text.trim()), server) {
            (Some(data), Some(server)) if data != server => Err(Error::Invalid(format!(
                "the data directory holds PostgreSQL {data} data and this image runs PostgreSQL {server}; \
                 the operator does not run major upgrades: run an image of PostgreSQL {data} \
                 (spec.image, or the catalog's image for postgresVersion {data})"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether the data directory is set up as a standby (`standby.signal`).
    pub fn is_standby_configured(&self) -> bool {
        self.pgdata.join("standby.signal").exists()
    }

    fn private_dir(&self, path: &Path) -> Result<()> {
        fs::create_dir_all(path).map_err(Error::io(format!("creating {}", path.display())))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("chmod {}", path.display())))?;
        self.give(path)
    }

    fn give(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))
                .map_err(Error::io(format!("chown {}", path.display())))?;
        }
        Ok(())
    }

    fn write_private(&self, path: &Path, content: &str) -> Result<()> {
        fs::write(path, content).map_err(Error::io(format!("writing {}", path.display())))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(Error::io(format!("chmod {}", path.display())))?;
        self.give(path)
    }

    fn passfile(&self) -> PathBuf {
        self.run_dir.join("pgpass")
    }

    /// Writes the password file (superuser and replication user) that PostgreSQL's clients
    /// (walreceiver, pg_basebackup, pg_rewind) read; passwords never go on a command line.
    pub fn write_passfile(&self, superuser: &Credentials, replication: &Credentials) -> Result<()> {
        let escape = |text: &str| text.replace('\\', "\\\\").replace(':', "\\:");
        let content = [superuser, replication]
            .iter()
            .map(|user| {
                format!(
                    "*:*:*:{}:{}\n",
                    escape(&user.username),
                    escape(&user.password)
                )
            })
            .collect::<String>();
        self.write_private(&self.passfile(), &content)
    }

    /// A command for a PostgreSQL program, as the unprivileged user, killed if we die.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.ids {
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
        command
            .env("PGPASSFILE", self.passfile())
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc_prctl_pdeathsig() != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    async fn run_program(&self, program: &str, command: &mut Command) -> Result<String> {
        let output = command
            .output()
            .await
            .map_err(Error::io(format!("running {program}")))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            // The whole output goes to the log; the error (which the instance's status and the
            // cluster's conditions repeat) keeps the lines that say what went wrong.
            tracing::warn!(program, status = %output.status, output = %text, "program failed");
            return Err(Error::Program {
                program: program.to_string(),
                status: output.status.to_string(),
                output: diagnosis(&text),
            });
        }
        Ok(text)
    }

    /// Sets the archiving / WAL restore / recovery settings the next [`Self::write_config`] writes.
    pub fn set_backup_settings(&mut self, settings: Vec<(String, String)>) {
        self.backup_settings = settings;
    }

    /// Folder of the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The (uid, gid) PostgreSQL runs as, when the instance manager runs as root.
    pub fn run_as_ids(&self) -> Option<(u32, u32)> {
        self.ids.map(|(uid, gid)| (uid.as_raw(), gid.as_raw()))
    }

    /// Removes and recreates the data directory (and the WAL directory), empty.
    pub fn empty_data_dir(&self) -> Result<()> {
        if self.pgdata.exists() {
            fs::remove_dir_all(&self.pgdata)
                .map_err(Error::io(format!("removing {}", self.pgdata.display())))?;
        }
        if let Some(wal) = &self.pgwal
            && wal.exists()
        {
            fs::remove_dir_all(wal).map_err(Error::io(format!("removing {}", wal.display())))?;
        }
        if let Some(parent) = self.pgdata.parent() {
            fs::create_dir_all(parent)
                .map_err(Error::io(format!("creating {}", parent.display())))?;
        }
        self.private_dir(&self.pgdata)
    }

    /// initdb with the configured encoding, locale and checksums and SCRAM-SHA-256, the
    /// superuser's password from a file.
    pub async fn initdb(&self, superuser: &Credentials) -> Result<()> {
        self.empty_data_dir()?;
        let pwfile = self.run_dir.join("initdb-password");
        self.write_private(&pwfile, &superuser.password)?;
        let mut command = self.command("initdb");
        command
            .arg("-D")
            .arg(&self.pgdata)
            .args(&self.initdb_options)
            .arg("--no-sync")
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--username={}", superuser.username))
            .arg(format!("--pwfile={}", pwfile.display()));
        if let Some(wal) = &self.pgwal {
            command.arg(format!("--waldir={}", wal.display()));
        }
        let result = self.run_program("initdb", &mut command).await;
        let _ = fs::remove_file(&pwfile);
        result?;
        let conf = self.pgdata.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(Error::io("reading postgresql.conf"))?;
        text.push_str(&format!(
            "\n# Settings managed by pg-instance (replication, listen address, ...).\ninclude_if_exists = {}\n",
            quote::config_value(MANAGED_CONFIG)
        ));
        fs::write(&conf, text).map_err(Error::io("writing postgresql.conf"))?;
        Ok(())
    }

    /// Clones the primary at `upstream` with pg_basebackup (WAL streamed alongside).
    pub async fn basebackup(&self, upstream: &Upstream, replication_user: &str) -> Result<()> {
        // The client certificate and CA pg_basebackup's conninfo names.
        self.install_tls()?;
        self.empty_data_dir()?;
        let mut command = self.command("pg_basebackup");
        command
            .arg("-D")
            .arg(&self.pgdata)
            .arg("-d")
            .arg(self.conninfo(upstream, replication_user, None))
            .args(["-X", "stream", "-c", "fast", "--no-password", "--no-sync"]);
        if let Some(wal) = &self.pgwal {
            command.arg(format!("--waldir={}", wal.display()));
        }
        self.run_program("pg_basebackup", &mut command).await?;
        Ok(())
    }

    /// Rewinds this (stopped) former primary onto the timeline of the primary at `upstream`.
    pub async fn rewind(&self, upstream: &Upstream) -> Result<String> {
        self.install_tls()?;
        let mut command = self.command("pg_rewind");
        command
            .arg("-D")
            .arg(&self.pgdata)
            .arg(format!(
                "--source-server={}",
                self.conninfo(upstream, &self.superuser, Some("postgres"))
            ))
            .arg("--no-sync");
        self.run_program("pg_rewind", &mut command).await
    }

    fn conninfo(&self, upstream: &Upstream, user: &str, dbname: Option<&str>) -> String {
        let mut text = format!(
            "host={} port={} user={} passfile={} application_name={} connect_timeout=2",
            quote::conninfo_value(&upstream.host),
            upstream.port,
            quote::conninfo_value(user),
            quote::conninfo_value(&self.passfile().display().to_string()),
            quote::conninfo_value(&quote::slot_name(&self.pod)),
        );
        if let Some(dbname) = dbname {
            text.push_str(&format!(" dbname={}", quote::conninfo_value(dbname)));
        }
        if let Some(tls) = &self.tls {
            // Only the replication role presents the client certificate (its CN names it).
            let client_certificate = user != self.superuser;
            for (name, value) in tls.client_options(client_certificate) {
                text.push_str(&format!(" {name}={}", quote::conninfo_value(&value)));
            }
        }
        text
    }

    /// `primary_conninfo` of a replica cluster streaming from its source's primary, when it does
    /// (`spec.replica.streaming`, certificates mounted).
    fn source_conninfo(&self, replication_user: &str) -> Option<String> {
        let (host, port) = self.replica_source.as_ref()?;
        let tls = self.tls.as_ref().filter(|tls| tls.has_source())?;
        let mut text = format!(
            "host={} port={port} user={} application_name={} connect_timeout=2",
            quote::conninfo_value(host),
            quote::conninfo_value(replication_user),
            quote::conninfo_value(&quote::slot_name(&self.pod)),
        );
        for (name, value) in tls.source_client_options() {
            text.push_str(&format!(" {name}={}", quote::conninfo_value(&value)));
        }
        Some(text)
    }

    /// The TLS files in use, when TLS is on.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Copies the mounted certificate Secrets to the private files PostgreSQL reads (mode 0600,
    /// owned by its user), each written aside and renamed into place. Does nothing without TLS.
    pub fn install_tls(&self) -> Result<()> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let copies = tls.copies().map_err(|missing| {
            Error::Invalid(format!(
                "TLS is on but {} is missing: is the certificate Secret mounted?",
                missing.display()
            ))
        })?;
        self.private_dir(&tls.private)?;
        for (target, content) in copies {
            let staged = target.with_extension("new");
            fs::write(&staged, content)
                .map_err(Error::io(format!("writing {}", staged.display())))?;
            fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))
                .map_err(Error::io(format!("chmod {}", staged.display())))?;
            self.give(&staged)?;
            fs::rename(&staged, &target)
                .map_err(Error::io(format!("renaming {}", staged.display())))?;
        }
        Ok(())
    }

    /// Writes pg_hba.conf, the managed configuration file, and `standby.signal` when `standby`.
    pub fn write_config(
        &self,
        settings: &ManagedSettings,
        standby: bool,
        replication_user: &str,
    ) -> Result<()> {
        self.install_tls()?;
        let hba = tls::pg_hba(replication_user, self.tls.is_some());
        let hba_path = self.pgdata.join("pg_hba.conf");
        self.write_private(&hba_path, &hba)?;

        let mut lines: Vec<(String, String)> = vec![
            ("listen_addresses".into(), self.listen_address.clone()),
            ("port".into(), self.port.to_string()),
            (
                "unix_socket_directories".into(),
                self.run_dir.display().to_string(),
            ),
            ("unix_socket_permissions".into(), "0700".into()),
            ("password_encryption".into(), "scram-sha-256".into()),
            ("wal_level".into(), "replica".into()),
            ("hot_standby".into(), "on".into()),
            ("hot_standby_feedback".into(), "on".into()),
            ("wal_log_hints".into(), "on".into()),
            ("wal_keep_size".into(), "512MB".into()),
            ("max_wal_senders".into(), "10".into()),
            ("max_replication_slots".into(), "10".into()),
            ("wal_receiver_status_interval".into(), "1s".into()),
            ("wal_retrieve_retry_interval".into(), "250ms".into()),
            ("recovery_target_timeline".into(), "latest".into()),
            (
                "synchronous_standby_names".into(),
                settings.synchronous_standby_names.clone(),
            ),
        ];
        match &settings.upstream {
            Some(upstream) => {
                lines.push((
                    "primary_conninfo".into(),
                    self.conninfo(upstream, replication_user, None),
                ));
                lines.push(("primary_slot_name".into(), quote::slot_name(&self.pod)));
            }
            None => {
                // A standby with no upstream in the cluster is a replica cluster's designated
                // primary: it streams from the source's primary when told where it is (no slot
                // there: the source's archive covers what the source recycles).
                let source = standby
                    .then(|| self.source_conninfo(replication_user))
                    .flatten();
                lines.push(("primary_conninfo".into(), source.unwrap_or_default()));
                lines.push(("primary_slot_name".into(), String::new()));
            }
        }
        lines.extend(crate::postgres_log::settings(&self.run_dir));
        if let Some(tls) = &self.tls {
            lines.extend(tls.server_settings());
        }
        lines.extend(self.backup_settings.iter().cloned());
        lines.extend(self.extra_settings.iter().cloned());
        let text: String = std::iter::once("# Written by pg-instance; do not edit.\n".to_string())
            .chain(
                lines
                    .iter()
                    .map(|(name, value)| format!("{name} = {}\n", quote::config_value(value))),
            )
            .collect();
        self.write_private(&self.pgdata.join(MANAGED_CONFIG), &text)?;

        let signal = self.pgdata.join("standby.signal");
        if standby {
            self.write_private(&signal, "")?;
        } else if signal.exists() {
            fs::remove_file(&signal).map_err(Error::io("removing standby.signal"))?;
        }
        Ok(())
    }

    /// Starts `postgres` as a child and waits until it accepts connections.
    pub async fn start(&mut self, timeout: Duration) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.check_major_version().await?;
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.pgdata)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        // PostgreSQL must outlive a dropped handle only when we exit on purpose; kill_on_drop
        // stays, the fast stop below runs first on a clean exit.
        let child = command.spawn().map_err(Error::io("spawning postgres"))?;
        tracing::info!(pid = child.id(), pgdata = %self.pgdata.display(), "postgres started");
        self.child = Some(child);
        self.wait_ready(timeout).await
    }

    /// Waits until PostgreSQL accepts connections.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return Err(Error::Invalid(
                    "postgres exited during start-up (see its log above)".into(),
                ));
            }
            if let Ok(client) = self.connect().await
                && client.simple_query("SELECT 1").await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "postgres did not accept connections within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the child is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    tracing::warn!(%status, "postgres exited");
                    self.child = None;
                    false
                }
                Err(_) => false,
            },
            None => false,
        }
    }

    /// Stops PostgreSQL and waits for it (escalating to SIGKILL after a while).
    pub async fn stop(&mut self, mode: StopMode) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Some(pid) = child.id() else {
            return;
        };
        let pid = Pid::from_raw(pid as i32);
        let signal = match mode {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        };
        let _ = kill(pid, signal);
        let grace = match mode {
            StopMode::Fast => Duration::from_secs(30),
            StopMode::Immediate => Duration::from_secs(3),
        };
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            tracing::warn!(?mode, "postgres did not stop in time; killing it");
            let _ = kill(pid, Signal::SIGQUIT);
            if tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        tracing::info!(?mode, "postgres stopped");
    }

    /// Process id of the postmaster, when running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|child| child.id())
    }

    /// Sends a signal to the postmaster (SIGHUP: reload).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.as_ref().and_then(|child| child.id()) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// A connection over the private Unix socket, as the superuser.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        self.connector("pg-instance").connect().await
    }

    /// What [`Self::connect`] does, for a task that runs beside the run loop (it cannot borrow
    /// the server); `application_name` tells its backends apart in pg_stat_activity.
    pub fn connector(&self, application_name: &str) -> LocalConnector {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.run_dir)
            .port(self.port)
            .user(&self.superuser)
            .dbname("postgres")
            .application_name(application_name)
            // The instance manager's own statements never wait for standbys (a primary whose
            // standbys are gone must still be managed) and never hang the run loop.
            .options("-c synchronous_commit=local -c statement_timeout=10000")
            .connect_timeout(LOCAL_CONNECT_TIMEOUT);
        LocalConnector { config }
    }

    /// "Latest checkpoint location" of the server, from pg_controldata, when it was shut down
    /// cleanly (its last WAL record is then that shutdown checkpoint).
    pub async fn shutdown_checkpoint_lsn(&self) -> Result<String> {
        let mut command = self.command("pg_controldata");
        command.arg("-D").arg(&self.pgdata).env("LC_ALL", "C");
        let output = self.run_program("pg_controldata", &mut command).await?;
        let state = output
            .lines()
            .find_map(|line| line.strip_prefix("Database cluster state:"))
            .map(str::trim)
            .unwrap_or_default();
        if state != "shut down" {
            return Err(Error::Invalid(format!(
                "PostgreSQL did not shut down cleanly (state: {state})"
            )));
        }
        output
            .lines()
            .find_map(|line| line.strip_prefix("Latest checkpoint location:"))
            .map(|value| value.trim().to_string())
            .ok_or_else(|| Error::Invalid("pg_controldata shows no checkpoint location".into()))
    }
}

fn libc_prctl_pdeathsig() -> i32 {
    // PostgreSQL dies with its instance manager (as it would with its container).
    nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL))
        .map(|_| 0)
        .unwrap_or(-1)
}

/// How long the socket connect to the local PostgreSQL may take (the whole handshake gets
/// twice as long).
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to the local PostgreSQL as the superuser over the private socket.
#[derive(Clone)]
pub struct LocalConnector {
    config: tokio_postgres::Config,
}

impl LocalConnector {
    /// A new connection, or an error within twice the connect timeout (a server that accepts
    /// the socket and never answers does not hold the caller).
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        connect_within(&self.config, LOCAL_CONNECT_TIMEOUT * 2)
            .await
            .map_err(|error| match error {
                ConnectError::Postgres(source) => Error::Postgres {
                    what: "connecting to the local PostgreSQL".into(),
                    source,
                },
                timed_out @ ConnectError::TimedOut(_) => Error::Io {
                    what: format!("connecting to the local PostgreSQL: {timed_out}"),
                    source: std::io::ErrorKind::TimedOut.into(),
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_versions_are_read_from_pg_version_and_the_server_banner() {
        assert_eq!(major_of("18"), Some(18));
        assert_eq!(server_major("postgres (PostgreSQL) 18.6\n"), Some(18));
        assert_eq!(
            server_major("postgres (PostgreSQL) 19beta1 (Debian 19~beta1-1)"),
            Some(19)
        );
        assert_eq!(server_major("something else"), None);
    }

    #[test]
    fn a_failed_program_is_described_by_its_error_lines() {
        let initdb = "The files belonging to this database system will be owned by user \"postgres\".\n\
            This user must also own the server process.\n\n\
            initdb: error: invalid locale name \"xx_XX.UTF-8\"\n\
            initdb: hint: If the locale name is specific to ICU, use --icu-locale.\n";
        assert_eq!(
            diagnosis(initdb),
            "initdb: error: invalid locale name \"xx_XX.UTF-8\"\ninitdb: hint: If the locale name is specific to ICU, use --icu-locale."
        );
        // Without such a line, nothing is dropped.
        assert_eq!(diagnosis("  something odd\n"), "something odd");
    }

    #[test]
    fn initdb_options_follow_the_bootstrap_spec() {
        assert_eq!(
            initdb_options("UTF8", "C", true),
            ["--encoding=UTF8", "--locale=C", "--data-checksums"]
        );
        assert_eq!(
            initdb_options("LATIN1", "en_US", false),
            ["--encoding=LATIN1", "--locale=en_US", "--no-data-checksums"]
        );
    }
}
