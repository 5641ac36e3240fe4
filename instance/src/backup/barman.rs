//! barman-cloud, the engine: each operation is one `barman-cloud-*` command from the folder
//! `--barman-bin`, run as the PostgreSQL user (the files it reads and writes are PostgreSQL's),
//! with the store's keys in its environment only.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::{Gid, Uid};
use tokio::process::Command;

use crate::backup::engine::{BackupInfo, LocalServer};
use crate::backup::store::{Store, Target};
use crate::error::{Error, Result};

/// Lines of a failed command's output kept in the error (the end says what went wrong).
const OUTPUT_LINES: usize = 12;
/// Compression of base backups and WAL in the store. lz4 compresses at several hundred MB/s per
/// core, so it costs less CPU than it saves in upload (tables and WAL often shrink 3 to 10
/// times): without it the base backup ran at 0.17 x pg_basebackup's throughput, the Python
/// tar and upload path being the bottleneck. `barman-cloud-restore` and
/// `barman-cloud-wal-restore` read the compression from the file names, so backups and WAL
/// archived before (uncompressed) stay restorable.
const COMPRESSION: &str = "--lz4";
/// Segments a bootstrap recovery's `restore_command` fetches at once (the requested one and
/// those after it).
const PREFETCH: u32 = 8;
/// The launcher of a Python that imports barman (beside the commands).
const PYTHON: &str = "barman-cloud-python";
/// The long-lived WAL uploader (see `wal_uploader.rs`).
const UPLOADER_SCRIPT: &str = include_str!("wal_uploader.py");
/// barman-cloud-backup and the listing of its result in one process.
const BACKUP_SCRIPT: &str = include_str!("backup_and_list.py");
/// The WAL an archive holds past a segment (see `source_lag.rs`).
const ARCHIVE_TAIL_SCRIPT: &str = include_str!("archive_tail.py");

/// The barman-cloud commands in one folder.
#[derive(Clone, Debug)]
pub struct BarmanCloud {
    bin: PathBuf,
    ids: Option<(u32, u32)>,
    home: PathBuf,
}

impl BarmanCloud {
    /// Commands from `bin`, run as `ids` (uid, gid) when set, with `home` as HOME (boto3 looks
    /// for its configuration there; the PostgreSQL user may not read ours).
    pub fn new(bin: PathBuf, ids: Option<(u32, u32)>, home: PathBuf) -> Self {
        Self { bin, ids, home }
    }

    fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn command(&self, name: &str, store: &Store) -> Command {
        let mut command = self.environment(name, store);
        command.args(store_args(store));
        command
    }

    /// `name` as the PostgreSQL user, with the store's environment (keys, region, CA), no
    /// argument yet.
    fn environment(&self, name: &str, store: &Store) -> Command {
        let mut command = Command::new(self.program(name));
        if let Some((uid, gid)) = self.ids {
            command
                .uid(Uid::from_raw(uid).as_raw())
                .gid(Gid::from_raw(gid).as_raw());
        }
        for inherited in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CA_BUNDLE",
        ] {
            command.env_remove(inherited);
        }
        // boto3 verifies the store's certificate against this bundle.
        if let Some(ca) = &store.ca_bundle {
            command.env("AWS_CA_BUNDLE", ca);
        }
        if let Some((id, secret)) = store.credentials() {
            command
                .env("AWS_ACCESS_KEY_ID", id)
                .env("AWS_SECRET_ACCESS_KEY", secret);
        }
        command
            .env("HOME", &self.home)
            .env("AWS_DEFAULT_REGION", &store.region)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn run(&self, name: &str, store: &Store, command: &mut Command) -> Result<String> {
        let output = command.output().await.map_err(Error::io(format!(
            "running {}",
            self.program(name).display()
        )))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            return Ok(stdout);
        }
        let text = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
        Err(Error::Program {
            program: name.to_string(),
            status: output.status.to_string(),
            output: redact(&last_lines(&text, OUTPUT_LINES), store),
        })
    }

    /// `restore_command`: environment first (keys from the variables named by the store, so the
    /// secret itself never lands in the configuration), then the command. With `spool` (a
    /// bootstrap recovery), each call downloads the requested segment and the next
    /// [`PREFETCH`] - 1 in parallel into `spool` (`--parallel`, barman's own prefetch), and a
    /// segment found there is moved into place by the shell, without starting Python: replay
    /// otherwise paid a Python and boto3 start-up (one to three seconds on a loaded machine)
    /// per segment. Without the folder (not prepared) it fetches one file at a time.
    pub fn restore_command(&self, store: &Store, spool: Option<&Path>) -> String {
        let mut words = vec![
            format!("HOME={}", shell_quote(&self.home.display().to_string())),
            format!("AWS_DEFAULT_REGION={}", shell_quote(&store.region)),
            format!("AWS_ACCESS_KEY_ID=\"${}\"", store.access_key_env),
            format!("AWS_SECRET_ACCESS_KEY=\"${}\"", store.secret_key_env),
        ];
        if let Some(ca) = &store.ca_bundle {
            words.push(format!(
                "AWS_CA_BUNDLE={}",
                shell_quote(&ca.display().to_string())
            ));
        }
        words.push(shell_quote(
            &self
                .program("barman-cloud-wal-restore")
                .display()
                .to_string(),
        ));
        words.extend(store_args(store).iter().map(|arg| shell_quote(arg)));
        let tail = [
            shell_quote(&store.destination()),
            shell_quote(&store.server_name),
            "%f".into(),
            "%p".into(),
        ]
        .join(" ");
        let command = words.join(" ");
        let Some(spool) = spool else {
            return format!("{command} {tail}");
        };
        let spool = shell_quote(&spool.display().to_string());
        format!(
            "if [ -f {spool}/%f ]; then mv -f {spool}/%f %p; elif [ -d {spool} ]; then {command} --parallel {PREFETCH} --spool-dir {spool} {tail}; else {command} {tail}; fi"
        )
    }

    /// Uploads one WAL file (one `barman-cloud-wal-archive` process).
    pub async fn archive_wal(&self, store: &Store, wal: &Path) -> Result<()> {
        let mut command = self.command("barman-cloud-wal-archive", store);
        fail_fast(&mut command);
        command.args(wal_archive_args(store)).arg(wal);
        self.run("barman-cloud-wal-archive", store, &mut command)
            .await?;
        Ok(())
    }

    /// The long-lived WAL uploader's process (`barman-cloud-python` running
    /// [`UPLOADER_SCRIPT`] with `barman-cloud-wal-archive`'s arguments), stdin and stdout piped;
    /// `None` when the folder has no `barman-cloud-python` (then each file is one
    /// `barman-cloud-wal-archive`).
    pub fn wal_uploader_command(&self, store: &Store) -> Option<Command> {
        if !self.program(PYTHON).exists() {
            return None;
        }
        let mut command = self.environment(PYTHON, store);
        fail_fast(&mut command);
        command
            .arg("-c")
            .arg(UPLOADER_SCRIPT)
            .args(store_args(store))
            .args(wal_archive_args(store))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Some(command)
    }

    /// What `store`'s WAL archive holds past the segment `after`: [`ARCHIVE_TAIL_SCRIPT`] on
    /// barman's Python, which lists only the keys after that segment's.
    pub async fn archive_tail(
        &self,
        store: &Store,
        after: &str,
    ) -> Result<crate::backup::source_lag::ArchiveTail> {
        let mut command = self.environment(PYTHON, store);
        fail_fast(&mut command);
        command
            .arg("-c")
            .arg(ARCHIVE_TAIL_SCRIPT)
            .args(store_args(store))
            .arg(store.destination())
            .arg(&store.server_name)
            .arg(after);
        let output = self.run("archive listing", store, &mut command).await?;
        serde_json::from_str(output.lines().last().unwrap_or_default()).map_err(|error| {
            Error::Invalid(format!(
                "the archive listing printed no JSON ({error}): {}",
                redact(&last_lines(&output, OUTPUT_LINES), store)
            ))
        })
    }

    /// Removes the store's secret from a text the engine printed.
    pub fn redact(&self, text: &str, store: &Store) -> String {
        redact(text, store)
    }

    /// Takes a base backup labelled `job-<name>`, then reads its details back.
    pub async fn backup(
        &self,
        store: &Store,
        server: &LocalServer,
        name: &str,
    ) -> Result<BackupInfo> {
        // barman reserves some names (first, latest, ...) and anything shaped like a backup id.
        let label = format!("job-{name}");
        let arguments = [
            "--immediate-checkpoint",
            "--jobs",
            "4",
            COMPRESSION,
            "--name",
            &label,
            "--host",
            &server.socket_dir,
            "--port",
            &server.port.to_string(),
            "--user",
            &server.user,
            "--dbname",
            "postgres",
            &store.destination(),
            &store.server_name,
        ]
        .map(str::to_string);
        let backups = if self.program(PYTHON).exists() {
            // One Python for the backup and the listing that reads its details back.
            let mut command = self.environment(PYTHON, store);
            command
                .arg("-c")
                .arg(BACKUP_SCRIPT)
                .args(store_args(store))
                .args(&arguments);
            let output = self.run("barman-cloud-backup", store, &mut command).await?;
            parse_backup_list(output.lines().last().unwrap_or_default())?
        } else {
            let mut command = self.command("barman-cloud-backup", store);
            command.args(&arguments);
            self.run("barman-cloud-backup", store, &mut command).await?;
            self.list(store).await?
        };
        backups
            .into_iter()
            .rev()
            .find(|backup| backup.name.as_deref() == Some(label.as_str()))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "barman-cloud-backup succeeded but no backup named {label} is listed in {}",
                    store.destination()
                ))
            })
    }

    /// Backups in the store, oldest first.
    pub async fn list(&self, store: &Store) -> Result<Vec<BackupInfo>> {
        let mut command = self.command("barman-cloud-backup-list", store);
        command
            .args(["--format", "json"])
            .arg(store.destination())
            .arg(&store.server_name);
        let output = self
            .run("barman-cloud-backup-list", store, &mut command)
            .await?;
        parse_backup_list(&output)
    }

    /// Downloads a backup into `pgdata`.
    pub async fn restore(
        &self,
        store: &Store,
        backup_id: Option<&str>,
        target: Option<&Target>,
        pgdata: &Path,
    ) -> Result<()> {
        let mut command = self.command("barman-cloud-restore", store);
        match (backup_id, target) {
            (Some(_), _) => {}
            (None, Some(Target::Time(time))) => {
                command.args(["--target-time", time]);
            }
            (None, Some(Target::Lsn(lsn))) => {
                command.args(["--target-lsn", lsn]);
            }
            // An xid or a restore point cannot be placed in time without reading WAL: the
            // latest backup (give backupId for an older one).
            _ => {}
        }
        command
            .arg(store.destination())
            .arg(&store.server_name)
            .arg(backup_id.unwrap_or("auto"))
            .arg(pgdata);
        self.run("barman-cloud-restore", store, &mut command)
            .await?;
        Ok(())
    }

    /// barman-cloud-backup-delete with a retention policy.
    pub async fn delete_expired(&self, store: &Store, policy: &str) -> Result<String> {
        let mut command = self.command("barman-cloud-backup-delete", store);
        command
            .args(["--retention-policy", policy])
            .arg(store.destination())
            .arg(&store.server_name);
        self.run("barman-cloud-backup-delete", store, &mut command)
            .await
    }

    /// Whether the cluster's folder holds no WAL (`barman-cloud-check-wal-archive`, which exits
    /// 1 when it finds some). Only for a bucket known to exist: the command creates a missing
    /// one.
    pub async fn wal_archive_empty(&self, store: &Store) -> Result<bool> {
        let name = "barman-cloud-check-wal-archive";
        let mut command = self.command(name, store);
        command.arg(store.destination()).arg(&store.server_name);
        match self.run(name, store, &mut command).await {
            Ok(_) => Ok(true),
            Err(Error::Program { output, .. }) if output.contains("WAL archive check failed") => {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Connectivity and bucket check (`barman-cloud-backup-list --test`).
    pub async fn check(&self, store: &Store) -> Result<()> {
        let mut command = self.command("barman-cloud-backup-list", store);
        command
            .arg("--test")
            .arg(store.destination())
            .arg(&store.server_name);
        self.run("barman-cloud-backup-list", store, &mut command)
            .await?;
        Ok(())
    }
}

/// Fails a WAL upload fast and lets the archiver retry (it backs off and keeps the status):
/// boto3's default (5 attempts with backoff, a 60 s read timeout) hid an outage for 15 s or more
/// per file.
fn fail_fast(command: &mut Command) {
    command
        .env("AWS_RETRY_MODE", "standard")
        .env("AWS_MAX_ATTEMPTS", "2");
}

/// `barman-cloud-wal-archive`'s arguments but the file: the store (with a 30 s read timeout)
/// and the compression.
fn wal_archive_args(store: &Store) -> Vec<String> {
    vec![
        "--read-timeout".into(),
        "30".into(),
        COMPRESSION.into(),
        store.destination(),
        store.server_name.clone(),
    ]
}

/// Arguments every command takes to reach the store.
fn store_args(store: &Store) -> Vec<String> {
    vec![
        "--cloud-provider".into(),
        "aws-s3".into(),
        "--endpoint-url".into(),
        store.endpoint.clone(),
        "--addressing-style".into(),
        // Not `auto` for false: with an endpoint URL, boto3's `auto` addresses by path too.
        if store.force_path_style {
            "path"
        } else {
            "virtual"
        }
        .into(),
    ]
}

/// One word for /bin/sh, safe inside a PostgreSQL `%`-expanded command.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''").replace('%', "%%"))
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Removes the store's secret key from engine output, should a library ever echo it.
fn redact(text: &str, store: &Store) -> String {
    match store.credentials() {
        Some((_, secret)) if !secret.is_empty() => text.replace(&secret, "<redacted>"),
        _ => text.to_string(),
    }
}

/// Parses `barman-cloud-backup-list --format json`.
fn parse_backup_list(output: &str) -> Result<Vec<BackupInfo>> {
    let value: serde_json::Value = serde_json::from_str(output).map_err(|error| {
        Error::Invalid(format!("barman-cloud-backup-list printed no JSON: {error}"))
    })?;
    let text = |entry: &serde_json::Value, key: &str| {
        entry
            .get(key)
            .and_then(|value| value.as_str())
            .map(str::to_string)
    };
    let mut backups: Vec<BackupInfo> = value
        .get("backups_list")
        .and_then(|list| list.as_array())
        .into_iter()
        .flatten()
        .map(|entry| BackupInfo {
            backup_id: text(entry, "backup_id").unwrap_or_default(),
            name: text(entry, "backup_name"),
            begin_lsn: text(entry, "begin_xlog"),
            end_lsn: text(entry, "end_xlog"),
            begin_wal: text(entry, "begin_wal"),
            end_wal: text(entry, "end_wal"),
            begin_time: text(entry, "begin_time_iso"),
            end_time: text(entry, "end_time_iso"),
            size_bytes: entry.get("cluster_size").and_then(|size| size.as_u64()),
            timeline: entry
                .get("timeline")
                .and_then(|timeline| timeline.as_u64())
                .map(|timeline| timeline as u32),
            status: text(entry, "status").unwrap_or_default(),
        })
        .collect();
    backups.sort_by(|a, b| a.backup_id.cmp(&b.backup_id));
    Ok(backups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_list_json_is_read() {
        let output = r#"{"backups_list": [{"backup_id": "20261204T033927", "backup_name": "nightly",
            "begin_xlog": "0/3000028", "end_xlog": "0/3000120", "begin_wal": "000000010000000000000003", "end_wal": "000000010000000000000003", "begin_time_iso": "2026-12-04T03:39:27+00:00",
            "end_time_iso": "2026-12-04T03:39:30+00:00", "cluster_size": 23059553, "timeline": 1, "status": "DONE"}]}"#;
        let backups = parse_backup_list(output).unwrap();
        assert_eq!(backups.len(), 1);
        assert_eq!(backups[0].backup_id, "20261204T033927");
        assert_eq!(backups[0].name.as_deref(), Some("nightly"));
        assert_eq!(backups[0].end_lsn.as_deref(), Some("0/3000120"));
        assert_eq!(backups[0].size_bytes, Some(23059553));
        assert_eq!(
            backups[0].end_wal.as_deref(),
            Some("000000010000000000000003")
        );
    }

    #[test]
    fn restore_command_names_variables_not_secrets() {
        let barman = BarmanCloud::new("/opt/barman/bin".into(), None, "/run/pg".into());
        let store = Store {
            endpoint: "http://127.0.0.1:9000".into(),
            bucket: "backups".into(),
            path: "main".into(),
            region: "us-east-1".into(),
            force_path_style: true,
            server_name: "main".into(),
            access_key_env: "AWS_ACCESS_KEY_ID".into(),
            secret_key_env: "AWS_SECRET_ACCESS_KEY".into(),
            ca_bundle: None,
        };
        let command = barman.restore_command(&store, None);
        assert!(
            command.contains("AWS_SECRET_ACCESS_KEY=\"$AWS_SECRET_ACCESS_KEY\""),
            "{command}"
        );
        assert!(
            command.ends_with("'s3://backups/main' 'main' %f %p"),
            "{command}"
        );
        // spec.backup.s3.region and forcePathStyle reach the WAL restores too.
        assert!(
            command.starts_with("HOME='/run/pg' AWS_DEFAULT_REGION='us-east-1' "),
            "{command}"
        );
        assert!(command.contains("'--addressing-style' 'path'"), "{command}");
        let virtual_hosted = Store {
            force_path_style: false,
            ..store.clone()
        };
        assert!(
            barman
                .restore_command(&virtual_hosted, None)
                .contains("'--addressing-style' 'virtual'")
        );
        assert_eq!(shell_quote("it's 100%"), "'it'\\''s 100%%'");
        // A bootstrap recovery fetches ahead into its spool and serves from there.
        let prefetch = barman.restore_command(&store, Some(Path::new("/run/pg/spool")));
        assert!(
            prefetch.starts_with("if [ -f '/run/pg/spool'/%f ]; then mv -f '/run/pg/spool'/%f %p; elif [ -d '/run/pg/spool' ]; then HOME="),
            "{prefetch}"
        );
        assert!(
            prefetch.contains("--parallel 8 --spool-dir '/run/pg/spool' 's3://backups/main' 'main' %f %p; else HOME="),
            "{prefetch}"
        );
        let with_ca = Store {
            ca_bundle: Some("/run/pg/backup-ca.crt".into()),
            ..store
        };
        assert!(
            barman
                .restore_command(&with_ca, None)
                .contains("AWS_CA_BUNDLE='/run/pg/backup-ca.crt' "),
            "the CA bundle reaches barman-cloud-wal-restore"
        );
    }
}
