//! The instance manager's own WAL archiver. It watches `pg_wal/archive_status/*.ready` (on the
//! primary, and on replicas, which archive what they receive with `archive_mode = always`) and
//! uploads up to [`PARALLEL`] files at once (each slot through a long-lived uploader process,
//! [`crate::backup::wal_uploader`]), leaving a marker per uploaded file in a
//! spool folder; PostgreSQL's `archive_command` only waits for that marker. So a busy primary
//! does not fall behind one upload at a time, and every failure is counted here, where the
//! metrics and the status live. A new primary (after a failover or a switchover) archives its
//! history file, the old timeline's `.partial` and its new timeline with no manual step, and the
//! segments it received that the old primary had not uploaded yet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::backup::BackupSetup;
use crate::backup::barman::shell_quote;
use crate::backup::metrics::{BackupMetrics, segment_number};
use crate::backup::wal_uploader::WalUploader;

/// Uploads at once while the store answers.
pub const PARALLEL: usize = 4;
/// How often the archive status folder is read.
const SCAN_PERIOD: Duration = Duration::from_millis(200);
/// Wait before the first retry after a failed upload; it doubles with each failure in a row, up
/// to [`MAX_RETRY_AFTER`], so that a store that is down is probed by one upload now and then
/// instead of four Python processes every two seconds (which starved a loaded 2-core machine).
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Longest wait between two attempts while the store fails (also the longest delay before
/// archiving resumes once the store is back).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Longest an upload may take before it is killed and counted as a failure: an upload stuck on
/// a half-open connection (a store that vanished without closing it) would otherwise hold its
/// slot, and the segment, for as long as the engine's own timeouts and retries allow (minutes).
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an uploader (a Python process) may wait for its next file before it is stopped: more
/// than `archive_timeout` (60 s), so a quiet primary keeps one, and a burst's extra ones go.
const IDLE_UPLOADER: Duration = Duration::from_secs(90);
/// How long `archive_command` waits for a marker before it reports a failure (PostgreSQL then
/// retries).
const ARCHIVE_COMMAND_WAIT_TENTHS: u32 = 600;

/// `archive_command`: succeeds once the archiver left the file's marker in `spool` (and removes
/// it), fails after a minute.
pub fn archive_command(spool: &Path) -> String {
    let marker = format!("{}/%f", shell_quote(&spool.display().to_string()));
    format!(
        "i=0; while [ $i -lt {ARCHIVE_COMMAND_WAIT_TENTHS} ]; do if [ -f {marker} ]; then rm -f {marker}; exit 0; fi; sleep 0.1; i=$((i+1)); done; exit 1"
    )
}

/// What the archiver publishes (`/status` → `walArchive`, and the operator's
/// `ContinuousArchiving` condition).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveStatus {
    /// Repository (`s3://bucket/path`).
    #[serde(default)]
    pub destination: String,
    /// Last WAL file archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    /// When (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_time: Option<String>,
    /// Files archived since the instance manager started.
    #[serde(default)]
    pub archived_count: u64,
    /// Failed uploads since the instance manager started.
    #[serde(default)]
    pub failed_count: u64,
    /// Last file that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_wal: Option<String>,
    /// Why (the engine's last lines; never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// When (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_time: Option<String>,
    /// Files waiting.
    #[serde(default)]
    pub pending: u64,
    /// Whether the newest attempt succeeded (false while uploads fail).
    #[serde(default)]
    pub healthy: bool,
    /// Set while this instance refuses to bootstrap a new cluster because the repository
    /// already holds backups or WAL (another cluster's: archiving there would mix them); the
    /// text says what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Shared between the archiver, the run loop (which says whether PostgreSQL serves) and the HTTP
/// endpoints.
#[derive(Debug, Default)]
pub struct ArchiveState {
    status: Mutex<ArchiveStatus>,
    active: AtomicBool,
}

impl ArchiveState {
    /// Whether PostgreSQL serves as primary or replica (a fenced or stopped instance, or a
    /// former primary waiting for pg_rewind, does not archive).
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// A copy of the status.
    pub fn status(&self) -> ArchiveStatus {
        self.status
            .lock()
            .map(|status| status.clone())
            .unwrap_or_default()
    }

    /// Records (or clears) the refusal to bootstrap into a repository that is in use.
    pub fn set_refused(&self, refusal: Option<String>) {
        self.update(|status| {
            if refusal.is_some() {
                status.healthy = false;
                status.last_failure = refusal.clone();
            }
            status.refused = refusal;
        });
    }

    fn update(&self, change: impl FnOnce(&mut ArchiveStatus)) {
        if let Ok(mut status) = self.status.lock() {
            change(&mut status);
        }
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// WAL files marked ready, history files first (a restore needs them before the segments of
/// their timeline), then by name.
fn ready_files(status_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(status_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_suffix(".ready"))
                .map(str::to_string)
        })
        .collect();
    names.sort_by_key(|name| (!name.ends_with(".history"), name.clone()));
    names
}

/// Runs the archiver until the process ends.
pub async fn run(
    setup: Arc<BackupSetup>,
    wal_dir: PathBuf,
    state: Arc<ArchiveState>,
    metrics: BackupMetrics,
    ids: Option<(u32, u32)>,
) {
    let Some(store) = setup.repository.clone().filter(|_| setup.wal_archiving) else {
        return;
    };
    state.update(|status| {
        status.destination = store.destination();
        status.healthy = true;
    });
    if let Err(error) = prepare_spool(&setup.spool, ids) {
        warn!(%error, spool = %setup.spool.display(), "cannot prepare the archive spool folder");
    }
    let status_dir = wal_dir.join("archive_status");
    let mut uploads: JoinSet<Upload> = JoinSet::new();
    let mut in_flight: BTreeSet<String> = BTreeSet::new();
    // Uploaders between two files, each with when it last served.
    let mut idle: Vec<(WalUploader, Instant)> = Vec::new();
    let mut retry = Retry::default();
    loop {
        tokio::time::sleep(SCAN_PERIOD).await;
        while let Some(joined) = uploads.try_join_next() {
            let Ok(Upload {
                name,
                result,
                uploader,
            }) = joined
            else {
                continue;
            };
            in_flight.remove(&name);
            if let Some(uploader) = uploader {
                idle.push((uploader, Instant::now()));
            }
            match result {
                Ok(()) => {
                    retry.succeeded();
                    if let Err(error) = std::fs::write(setup.spool.join(&name), b"") {
                        warn!(%error, wal = %name, "cannot write the archive marker");
                    }
                    metrics.archived.inc();
                    metrics
                        .last_archived_time
                        .set(k8s_openapi::jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
                    if let Some(number) = segment_number(&name) {
                        metrics.last_archived_segment.set(number);
                    }
                    state.update(|status| {
                        status.last_archived_wal = Some(name.clone());
                        status.last_archived_time = Some(now_rfc3339());
                        status.archived_count += 1;
                        status.healthy = true;
                    });
                }
                Err(error) => {
                    let message = error.to_string();
                    let wait = retry.failed(Instant::now());
                    warn!(wal = %name, error = %message, retry_in_seconds = wait.as_secs(), "archiving a WAL file failed; retrying");
                    metrics.failures.inc();
                    state.update(|status| {
                        status.failed_count += 1;
                        status.last_failed_wal = Some(name.clone());
                        status.last_failure = Some(message);
                        status.last_failed_time = Some(now_rfc3339());
                        status.healthy = false;
                    });
                }
            }
        }
        idle.retain(|(_, since)| since.elapsed() < IDLE_UPLOADER);
        if !state.is_active() {
            continue;
        }
        let ready = ready_files(&status_dir);
        let waiting: Vec<&String> = ready
            .iter()
            .filter(|name| !setup.spool.join(name.as_str()).exists())
            .collect();
        metrics.pending.set(waiting.len() as i64);
        state.update(|status| status.pending = waiting.len() as u64);
        remove_stale_markers(&setup.spool, &ready, &in_flight);
        let slots = retry.slots(Instant::now());
        for name in waiting {
            if in_flight.len() >= slots {
                break;
            }
            if in_flight.contains(name) {
                continue;
            }
            in_flight.insert(name.clone());
            let mut uploader = idle
                .pop()
                .map(|(uploader, _)| uploader)
                .unwrap_or_else(|| setup.engine.wal_uploader(&store));
            let path = wal_dir.join(name);
            let name = name.clone();
            uploads.spawn(async move {
                // Dropping the uploader on timeout kills the engine's process (kill_on_drop).
                match tokio::time::timeout(UPLOAD_TIMEOUT, uploader.upload(&path)).await {
                    // A spent uploader (after an error) is dropped; a fresh one takes the retry.
                    Ok(Ok(())) => Upload {
                        name,
                        result: Ok(()),
                        uploader: Some(uploader),
                    },
                    Ok(Err(error)) => Upload {
                        name,
                        result: Err(error),
                        uploader: None,
                    },
                    Err(_) => Upload {
                        result: Err(crate::error::Error::Invalid(format!(
                            "uploading {name} took longer than {} s (the store is unreachable or too slow); it was stopped and is retried",
                            UPLOAD_TIMEOUT.as_secs()
                        ))),
                        name,
                        uploader: None,
                    },
                }
            });
        }
    }
}

/// One finished upload: the file, how it went, and the uploader when it may serve again.
struct Upload {
    name: String,
    result: crate::error::Result<()>,
    uploader: Option<WalUploader>,
}

/// When uploads may start: all [`PARALLEL`] slots while the store answers; after a failure,
/// one upload at a time, each after a growing wait, until one succeeds.
#[derive(Debug)]
struct Retry {
    failing: bool,
    wait: Duration,
    next_attempt: Option<Instant>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            failing: false,
            wait: RETRY_AFTER,
            next_attempt: None,
        }
    }
}

impl Retry {
    /// How many uploads may run now.
    fn slots(&self, now: Instant) -> usize {
        match (self.failing, self.next_attempt) {
            (false, _) => PARALLEL,
            (true, Some(at)) if now < at => 0,
            (true, _) => 1,
        }
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// Records a failure; returns the wait before the next attempt.
    fn failed(&mut self, now: Instant) -> Duration {
        let wait = if self.failing { self.wait } else { RETRY_AFTER };
        self.failing = true;
        self.next_attempt = Some(now + wait);
        self.wait = (wait * 2).min(MAX_RETRY_AFTER);
        wait
    }
}

fn prepare_spool(spool: &Path, ids: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(spool)?;
    std::fs::set_permissions(spool, std::fs::Permissions::from_mode(0o700))?;
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(spool, Some(uid), Some(gid))?;
    }
    info!(spool = %spool.display(), "WAL archiver ready");
    Ok(())
}

/// Markers whose file PostgreSQL no longer waits for (archived, or gone with a rewind).
fn remove_stale_markers(spool: &Path, ready: &[String], in_flight: &BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(spool) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !ready.contains(&name) && !in_flight.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_files_go_first() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "000000020000000000000005.ready",
            "000000010000000000000004.partial.ready",
            "00000002.history.ready",
            "000000010000000000000003.done",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(
            ready_files(dir.path()),
            vec![
                "00000002.history",
                "000000010000000000000004.partial",
                "000000020000000000000005"
            ]
        );
    }

    #[test]
    fn a_failing_store_is_probed_by_one_upload_with_a_growing_wait() {
        let start = Instant::now();
        let mut retry = Retry::default();
        assert_eq!(retry.slots(start), PARALLEL);
        assert_eq!(retry.failed(start), Duration::from_secs(2));
        assert_eq!(retry.slots(start), 0);
        assert_eq!(retry.slots(start + Duration::from_secs(2)), 1);
        assert_eq!(retry.failed(start), Duration::from_secs(4));
        assert_eq!(retry.failed(start), Duration::from_secs(8));
        assert_eq!(retry.failed(start), MAX_RETRY_AFTER);
        assert_eq!(retry.failed(start), MAX_RETRY_AFTER);
        retry.succeeded();
        assert_eq!(retry.slots(start), PARALLEL);
        assert_eq!(retry.failed(start), RETRY_AFTER);
    }

    #[test]
    fn archive_command_waits_for_the_marker() {
        let command = archive_command(Path::new("/run/pg/archived"));
        assert!(
            command.contains("[ -f '/run/pg/archived'/%f ]"),
            "{command}"
        );
        assert!(command.contains("rm -f '/run/pg/archived'/%f"), "{command}");
    }
}
