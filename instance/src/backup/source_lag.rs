//! How far a replica cluster is behind its source: its designated primary lists what the
//! source's WAL archive holds past the segment it replayed last, every
//! [`Config::source_archive_check_seconds`](crate::config::Config), and publishes the distance in
//! its status and metrics (`pg_instance_source_archive_lag_{bytes,seconds}`).
//!
//! PostgreSQL alone cannot say it: a standby restoring from an archive knows nothing of what it
//! has not fetched yet (no WAL receiver, so no received position and no lag by the usual
//! measures), and `pg_last_xact_replay_timestamp` only says when the source last committed,
//! which is old for a quiet source that is followed perfectly. The archive's listing answers
//! both "how much" (bytes up to the end of the newest archived segment) and "since when" (how
//! long the oldest archived segment not replayed here has been waiting).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::backup::metrics::segment_number;
use crate::backup::service::BackupService;
use crate::http::Shared;

/// Bytes in a WAL segment: clusters are initialised with PostgreSQL's default (the operator
/// passes no `--wal-segsize`), and a replica cluster's data is a copy of its source's.
pub const WAL_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// What the source's archive holds past a segment (the listing's answer).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveTail {
    /// Whole segments archived after it (its timeline or a later one).
    pub segments: u64,
    /// The oldest of them.
    pub oldest: Option<String>,
    /// When the oldest was archived (seconds since the epoch, the store's clock).
    pub oldest_archived_at: Option<f64>,
    /// The newest of them.
    pub newest: Option<String>,
}

/// A replica cluster's distance to its source's archive, as the designated primary publishes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceArchiveLag {
    /// The source cluster (`bootstrap.recovery.sourceCluster`).
    pub source: String,
    /// WAL segments in the source's archive past the one replayed last (0: caught up).
    pub segments: u64,
    /// Bytes from the replay position to the end of the newest archived segment.
    pub bytes: u64,
    /// How long the oldest archived segment not replayed yet has been in the archive.
    pub seconds: f64,
    /// The newest segment in the source's archive, when it is past the replayed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_segment: Option<String>,
    /// When the archive was last listed (RFC 3339).
    pub checked_at: String,
    /// Why the last listing failed (the figures are the last good ones then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The name of the segment holding the byte just before `lsn` on timeline `timeline`: the last
/// segment replay reached into (a replay position at a segment's first byte has replayed all of
/// the previous one and nothing of its own).
pub fn last_replayed_segment(timeline: u32, lsn: u64) -> String {
    let segment = lsn.saturating_sub(1) / WAL_SEGMENT_BYTES;
    let per_log = 0x1_0000_0000 / WAL_SEGMENT_BYTES;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segment / per_log,
        segment % per_log
    )
}

/// The distance from `replay_lsn` to `tail`, checked at `now` (seconds since the epoch).
pub fn distance(source: &str, replay_lsn: u64, tail: &ArchiveTail, now: f64) -> SourceArchiveLag {
    let end = tail
        .newest
        .as_deref()
        .and_then(segment_number)
        .map_or(0, |newest| (newest as u64 + 1) * WAL_SEGMENT_BYTES);
    SourceArchiveLag {
        source: source.to_string(),
        segments: tail.segments,
        bytes: end.saturating_sub(replay_lsn),
        seconds: tail
            .oldest_archived_at
            .map_or(0.0, |archived| (now - archived).max(0.0)),
        newest_segment: tail.newest.clone(),
        checked_at: String::new(),
        error: None,
    }
}

/// Lists the source's archive every `period` while this instance is a replica cluster's
/// designated primary (`designated`), and keeps the answer in `service`; forgets it when the
/// instance stops being one (promoted, or another instance took the role).
pub async fn run(
    service: Arc<BackupService>,
    shared: Arc<Shared>,
    mut designated: tokio::sync::watch::Receiver<bool>,
    period: Duration,
) {
    let Some(recovery) = service.setup.recovery.clone() else {
        return;
    };
    let source = recovery.store.server_name.clone();
    loop {
        if !*designated.borrow_and_update() {
            service.set_source_lag(None);
            if designated.changed().await.is_err() {
                return;
            }
            continue;
        }
        let status = shared.status();
        let replay = status
            .replay_lsn
            .as_deref()
            .and_then(crate::decision::parse_lsn);
        if let (Some(replay), Some(timeline)) = (replay, status.timeline) {
            let after = last_replayed_segment(timeline, replay);
            let checked_at = k8s_openapi::jiff::Timestamp::now();
            let lag = match service
                .setup
                .engine
                .archive_tail(&recovery.store, &after)
                .await
            {
                Ok(tail) => {
                    let now = checked_at.as_millisecond() as f64 / 1000.0;
                    let lag = distance(&source, replay, &tail, now);
                    debug!(
                        after,
                        segments = lag.segments,
                        bytes = lag.bytes,
                        seconds = lag.seconds,
                        "listed the source's WAL archive"
                    );
                    lag
                }
                Err(error) => {
                    warn!(%error, "cannot list the source's WAL archive to measure the replica cluster's lag");
                    SourceArchiveLag {
                        error: Some(error.to_string()),
                        ..service.source_lag().unwrap_or_else(|| SourceArchiveLag {
                            source: source.clone(),
                            ..SourceArchiveLag::default()
                        })
                    }
                }
            };
            service.set_source_lag(Some(SourceArchiveLag {
                checked_at: checked_at.to_string(),
                ..lag
            }));
        }
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            changed = designated.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_replayed_segment_is_the_one_before_a_segment_boundary() {
        // 0/3000028: inside segment 3.
        assert_eq!(
            last_replayed_segment(1, 0x300_0028),
            "000000010000000000000003"
        );
        // 0/4000000: all of segment 3 replayed, nothing of 4.
        assert_eq!(
            last_replayed_segment(2, 0x400_0000),
            "000000020000000000000003"
        );
        // 1/00000010: the first segment of the second log, 256 segments of 16 MiB a log.
        assert_eq!(
            last_replayed_segment(1, 0x1_0000_0010),
            "000000010000000100000000"
        );
    }

    #[test]
    fn the_distance_runs_to_the_end_of_the_newest_segment_and_ages_from_the_oldest() {
        let tail = ArchiveTail {
            segments: 2,
            oldest: Some("000000010000000000000004".into()),
            oldest_archived_at: Some(1_000.0),
            newest: Some("000000010000000000000005".into()),
        };
        // Replayed up to 0/3800000: half of segment 3 and all of 4 and 5 to go.
        let lag = distance("main", 0x380_0000, &tail, 1_030.5);
        assert_eq!(lag.segments, 2);
        assert_eq!(lag.bytes, 0x600_0000 - 0x380_0000);
        assert_eq!(lag.seconds, 30.5);
        assert_eq!(lag.source, "main");
        assert_eq!(
            lag.newest_segment.as_deref(),
            Some("000000010000000000000005")
        );
    }

    #[test]
    fn caught_up_is_zero_whatever_the_replay_position() {
        let lag = distance("main", 0x380_0000, &ArchiveTail::default(), 1_030.5);
        assert_eq!((lag.segments, lag.bytes, lag.seconds), (0, 0, 0.0));
        assert_eq!(lag.newest_segment, None);
        // A store clock ahead of ours ages nothing below zero.
        let ahead = ArchiveTail {
            segments: 1,
            oldest: Some("000000010000000000000004".into()),
            oldest_archived_at: Some(2_000.0),
            newest: Some("000000010000000000000004".into()),
        };
        assert_eq!(distance("main", 0x400_0000, &ahead, 1_030.5).seconds, 0.0);
    }
}
