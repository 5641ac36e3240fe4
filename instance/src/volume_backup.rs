//! Base backups to and from a volume, run by the operator's Jobs in the PostgreSQL image:
//! `pg-instance volume-backup` (a BackupJob's `spec.volume`) copies an instance with
//! pg_basebackup into the mounted claim and reports the backup in its termination message;
//! `pg-instance volume-restore` (a cluster's `spec.bootstrap.volume`) copies that backup into the
//! first instance's volumes before the instance exists, and leaves the marker that lets its
//! instance manager start the data as the new cluster's primary.
//!
//! pg_basebackup runs with `-X stream`: the copy holds the WAL from its start to its end, so it
//! starts consistent on its own (no archive needed); the backup_label it writes makes that first
//! start replay that WAL.

use std::path::{Path, PathBuf};

use api::contract::{REPLICATION_USER, tls_keys, volume_backup};
use clap::Parser;

use crate::quote;

/// `pg-instance volume-backup`: pg_basebackup of one instance into a mounted claim.
#[derive(Parser, Debug, Clone)]
#[command(name = "pg-instance volume-backup")]
pub struct BackupConfig {
    /// Folder with the PostgreSQL binaries.
    #[arg(long, env = api::contract::env::PG_BIN, default_value = "/usr/lib/postgresql/18/bin")]
    pub pg_bin: PathBuf,
    /// Address of the instance to copy (a pod IP: TLS is verified against the cluster's CA).
    #[arg(long)]
    pub host: String,
    /// Its PostgreSQL port.
    #[arg(long, default_value_t = api::contract::POSTGRES_PORT)]
    pub port: u16,
    /// Replication role.
    #[arg(long, default_value = REPLICATION_USER)]
    pub user: String,
    /// File with the role's password (the `<cluster>-replication` Secret's `password`); used
    /// when the cluster runs without TLS.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Folder of the mounted TLS Secrets (`server/ca.crt`, `replication/tls.crt`,
    /// `replication/tls.key`): with TLS the role logs in with its client certificate.
    #[arg(long, env = api::contract::ENV_TLS_DIR)]
    pub tls_dir: Option<PathBuf>,
    /// The mounted claim.
    #[arg(long, default_value = volume_backup::MOUNT_PATH)]
    pub target: PathBuf,
    /// Backup label (the BackupJob's name).
    #[arg(long)]
    pub label: String,
    /// Where the report goes for the operator (the container's `terminationMessagePath`).
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// Private folder for the key copies libpq accepts (mode 0600).
    #[arg(long, default_value = "/tmp/volume-backup")]
    pub private_dir: PathBuf,
}

/// `pg-instance volume-restore`: a claim's backup into the first instance's volumes.
#[derive(Parser, Debug, Clone)]
#[command(name = "pg-instance volume-restore")]
pub struct RestoreConfig {
    /// The mounted claim with the backup.
    #[arg(long, default_value = volume_backup::MOUNT_PATH)]
    pub from: PathBuf,
    /// The new instance's data directory.
    #[arg(long, env = api::contract::env::PGDATA)]
    pub pgdata: PathBuf,
    /// Its WAL directory on a volume of its own (`spec.walStorage`).
    #[arg(long, env = api::contract::env::PGWAL)]
    pub pgwal: Option<PathBuf>,
}

/// Runs the backup and writes its report (or its error) where the operator reads it.
pub async fn backup(config: BackupConfig) -> anyhow::Result<()> {
    let begin_time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let outcome = take_backup(&config).await;
    let report = match &outcome {
        Ok(report) => volume_backup::Report {
            begin_time: Some(begin_time),
            end_time: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            ..report.clone()
        },
        Err(error) => volume_backup::Report {
            error: Some(format!("{error:#}")),
            ..Default::default()
        },
    };
    let text = serde_json::to_string(&report)?;
    println!("{text}");
    if outcome.is_ok() {
        std::fs::write(config.target.join(volume_backup::REPORT_FILE), &text)?;
    }
    // The kubelet keeps 4096 bytes of the message.
    if let Err(error) = std::fs::write(&config.termination_log, truncated(&text, 4096)) {
        eprintln!(
            "writing {} failed: {error}",
            config.termination_log.display()
        );
    }
    outcome.map(|_| ())
}

async fn take_backup(config: &BackupConfig) -> anyhow::Result<volume_backup::Report> {
    let data = config.target.join(volume_backup::DATA_FOLDER);
    if data.join("PG_VERSION").exists() {
        anyhow::bail!(
            "the claim already holds a backup ({} exists): a BackupJob takes its backup into a new claim",
            data.display()
        );
    }
    if data.exists() {
        // What an interrupted run of this Job left.
        std::fs::remove_dir_all(&data)?;
    }
    let mut conninfo = format!(
        "host={} port={} user={} application_name={} connect_timeout=10",
        quote::conninfo_value(&config.host),
        config.port,
        quote::conninfo_value(&config.user),
        quote::conninfo_value(&format!("backup-{}", config.label)),
    );
    if let Some(tls_dir) = &config.tls_dir {
        for (name, value) in private_tls(tls_dir, &config.private_dir)? {
            conninfo.push_str(&format!(" {name}={}", quote::conninfo_value(&value)));
        }
    }
    let mut command = tokio::process::Command::new(config.pg_bin.join("pg_basebackup"));
    command
        .arg("-D")
        .arg(&data)
        .arg("-d")
        .arg(&conninfo)
        .args(["-X", "stream", "-c", "fast", "--no-password", "-l"])
        .arg(&config.label)
        .stdin(std::process::Stdio::null());
    if let Some(file) = &config.password_file
        && config.tls_dir.is_none()
    {
        let password = std::fs::read_to_string(file)
            .map_err(|error| anyhow::anyhow!("reading {}: {error}", file.display()))?;
        command.env("PGPASSWORD", password.trim_end_matches(['\r', '\n']));
    }
    let output = command
        .output()
        .await
        .map_err(|error| anyhow::anyhow!("running pg_basebackup: {error}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        anyhow::bail!(
            "pg_basebackup from {}:{} failed ({}): {}",
            config.host,
            config.port,
            output.status,
            stderr.trim()
        );
    }
    let manifest = std::fs::read_to_string(data.join("backup_manifest"))?;
    let mut report = parse_manifest(&manifest)?;
    report.backup_id = Some(config.label.clone());
    report.size_bytes = Some(i64::try_from(folder_size(&data)?).unwrap_or(i64::MAX));
    Ok(report)
}

/// The WAL range of a backup from its `backup_manifest` (JSON: `WAL-Ranges`, one per timeline
/// the backup spans; the last one ends the backup).
pub fn parse_manifest(manifest: &str) -> anyhow::Result<volume_backup::Report> {
    let value: serde_json::Value = serde_json::from_str(manifest)?;
    let ranges = value["WAL-Ranges"]
        .as_array()
        .filter(|ranges| !ranges.is_empty())
        .ok_or_else(|| anyhow::anyhow!("backup_manifest has no WAL-Ranges"))?;
    let text = |range: &serde_json::Value, key: &str| range[key].as_str().map(str::to_string);
    let (first, last) = (&ranges[0], &ranges[ranges.len() - 1]);
    Ok(volume_backup::Report {
        begin_lsn: text(first, "Start-LSN"),
        end_lsn: text(last, "End-LSN"),
        timeline: last["Timeline"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok()),
        ..Default::default()
    })
}

/// The libpq options for a connection with the replication client certificate, after copying
/// the mounted files to `private` with the mode libpq demands of a key it does not see root own.
fn private_tls(tls_dir: &Path, private: &Path) -> anyhow::Result<Vec<(&'static str, String)>> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(private)?;
    std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700))?;
    let copy = |folder: &str, key: &str| -> anyhow::Result<String> {
        let source = tls_dir.join(folder).join(key);
        let content = std::fs::read(&source)
            .map_err(|error| anyhow::anyhow!("reading {}: {error}", source.display()))?;
        let target = private.join(format!("{folder}-{key}"));
        std::fs::write(&target, content)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
        Ok(target.display().to_string())
    };
    Ok(vec![
        // The instance is reached by pod IP, which no certificate names: the cluster's own CA
        // is what only this cluster's servers pass (as between instances).
        ("sslmode", "verify-ca".to_string()),
        ("sslrootcert", copy("server", tls_keys::CA)?),
        ("sslcert", copy("replication", tls_keys::CERTIFICATE)?),
        ("sslkey", copy("replication", tls_keys::KEY)?),
    ])
}

/// Copies the backup in `config.from` into the data directory (and WAL directory), then leaves
/// the marker for the instance manager. Run again after an interruption, it starts over.
pub fn restore(config: &RestoreConfig) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let backup = config.from.join(volume_backup::DATA_FOLDER);
    if !backup.join("PG_VERSION").exists() {
        anyhow::bail!(
            "the claim holds no backup ({} has no PG_VERSION): name the claim of a completed BackupJob (its status.volumeClaim)",
            backup.display()
        );
    }
    let marker = restored_marker(&config.pgdata);
    let _ = std::fs::remove_file(&marker);
    for folder in std::iter::once(&config.pgdata).chain(config.pgwal.as_ref()) {
        if folder.exists() {
            std::fs::remove_dir_all(folder)?;
        }
        std::fs::create_dir_all(folder)?;
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))?;
    }
    copy_tree(&backup, &config.pgdata)?;
    if let Some(pgwal) = &config.pgwal {
        // The WAL goes onto its own volume, pg_wal becoming the link initdb --waldir makes.
        let pg_wal = config.pgdata.join("pg_wal");
        copy_tree(&pg_wal, pgwal)?;
        std::fs::remove_dir_all(&pg_wal)?;
        std::os::unix::fs::symlink(pgwal, &pg_wal)?;
    }
    // What the copied server left that a new cluster must not see.
    for stale in ["postmaster.pid", "standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(config.pgdata.join(stale));
    }
    std::fs::write(&marker, b"")?;
    println!(
        "restored {} into {}",
        backup.display(),
        config.pgdata.display()
    );
    Ok(())
}

/// Whether the archive recovery of data restored from a volume has ended in a promotion: the
/// copy's `backup_label` was consumed and PostgreSQL removed `recovery.signal` as it promoted
/// (and no `standby.signal` says it follows a source). Read when the manager restarts before it
/// removed its marker: such data must not be put back into recovery.
pub fn recovery_finished(pgdata: &Path) -> bool {
    ["backup_label", "recovery.signal", "standby.signal"]
        .iter()
        .all(|file| !pgdata.join(file).exists())
}

/// The marker beside `pgdata` (see [`volume_backup::RESTORED_MARKER`]).
pub fn restored_marker(pgdata: &Path) -> PathBuf {
    pgdata
        .parent()
        .unwrap_or(pgdata)
        .join(volume_backup::RESTORED_MARKER)
}

/// Copies `from` into the existing folder `to`, recursively, keeping modes and links.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
            std::fs::set_permissions(&target, entry.metadata()?.permissions())?;
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn folder_size(folder: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += folder_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// At most `limit` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_promoted_volume_recovery_is_told_from_one_to_start_or_resume() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pgdata = dir.path();
        std::fs::write(pgdata.join("backup_label"), "START WAL LOCATION").unwrap();
        assert!(!recovery_finished(pgdata), "a fresh copy");
        std::fs::remove_file(pgdata.join("backup_label")).unwrap();
        std::fs::write(pgdata.join("recovery.signal"), "").unwrap();
        assert!(!recovery_finished(pgdata), "in the middle of the replay");
        std::fs::remove_file(pgdata.join("recovery.signal")).unwrap();
        std::fs::write(pgdata.join("standby.signal"), "").unwrap();
        assert!(!recovery_finished(pgdata), "a replica cluster's standby");
        std::fs::remove_file(pgdata.join("standby.signal")).unwrap();
        assert!(recovery_finished(pgdata), "promoted");
    }

    #[test]
    fn the_manifest_gives_the_first_start_and_the_last_end() {
        let manifest = r#"{ "PostgreSQL-Backup-Manifest-Version": 2, "Files": [],
            "WAL-Ranges": [
                { "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/3000000" },
                { "Timeline": 2, "Start-LSN": "0/3000000", "End-LSN": "0/3000158" }
            ], "Manifest-Checksum": "x" }"#;
        let report = parse_manifest(manifest).unwrap();
        assert_eq!(report.begin_lsn.as_deref(), Some("0/2000028"));
        assert_eq!(report.end_lsn.as_deref(), Some("0/3000158"));
        assert_eq!(report.timeline, Some(2));
        assert!(parse_manifest(r#"{"WAL-Ranges": []}"#).is_err());
    }

    #[test]
    fn a_restore_copies_the_data_moves_the_wal_and_leaves_the_marker() {
        let root = tempfile::tempdir().unwrap();
        let backup = root.path().join("backup/data");
        std::fs::create_dir_all(backup.join("pg_wal")).unwrap();
        std::fs::create_dir_all(backup.join("base/1")).unwrap();
        std::fs::write(backup.join("PG_VERSION"), "18\n").unwrap();
        std::fs::write(backup.join("standby.signal"), "").unwrap();
        std::fs::write(backup.join("base/1/1259"), "table").unwrap();
        std::fs::write(backup.join("pg_wal/000000010000000000000002"), "wal").unwrap();
        let config = RestoreConfig {
            from: root.path().join("backup"),
            pgdata: root.path().join("data/pgdata"),
            pgwal: Some(root.path().join("wal/pg_wal")),
        };
        // Left over from an interrupted run: gone afterwards.
        std::fs::create_dir_all(&config.pgdata).unwrap();
        std::fs::write(config.pgdata.join("half-copied"), "").unwrap();
        restore(&config).unwrap();
        let pgdata = &config.pgdata;
        assert_eq!(
            std::fs::read_to_string(pgdata.join("base/1/1259")).unwrap(),
            "table"
        );
        assert!(!pgdata.join("half-copied").exists());
        assert!(!pgdata.join("standby.signal").exists());
        assert_eq!(
            std::fs::read_link(pgdata.join("pg_wal")).unwrap(),
            root.path().join("wal/pg_wal")
        );
        assert!(
            root.path()
                .join("wal/pg_wal/000000010000000000000002")
                .exists()
        );
        assert!(
            root.path()
                .join("data")
                .join(volume_backup::RESTORED_MARKER)
                .exists()
        );
    }

    #[test]
    fn a_claim_without_a_backup_is_refused_with_what_to_name() {
        let root = tempfile::tempdir().unwrap();
        let config = RestoreConfig {
            from: root.path().to_path_buf(),
            pgdata: root.path().join("pgdata"),
            pgwal: None,
        };
        let error = restore(&config).unwrap_err().to_string();
        assert!(error.contains("status.volumeClaim"), "{error}");
        assert!(!config.pgdata.exists());
    }

    #[test]
    fn the_termination_message_is_cut_at_a_character_boundary() {
        assert_eq!(truncated("aé", 2), "a");
        assert_eq!(truncated("abc", 10), "abc");
    }
}
