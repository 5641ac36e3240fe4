//! The WAL a base backup needs when nothing archives WAL continuously
//! (`spec.backup.walArchiving: false`): the segments from the backup's first to its last, and the
//! history file of its timeline. Uploaded with the backup, they make it restorable on its own (as
//! `pg_basebackup -X stream` makes a self-contained copy); no other WAL goes to the store.

use std::path::Path;

use crate::backup::metrics::segment_number;
use crate::error::{Error, Result};

/// The files in `wal_dir` that a backup from segment `begin` to segment `end` needs, in upload
/// order (history file first); an error naming what to do when one of them is gone (recycled
/// by a checkpoint during a long backup).
pub fn files_for_backup(wal_dir: &Path, begin: &str, end: &str) -> Result<Vec<String>> {
    let (Some(first), Some(last)) = (segment_number(begin), segment_number(end)) else {
        return Err(Error::Invalid(format!(
            "the backup's WAL range {begin}..{end} is not made of segment names"
        )));
    };
    let timeline = &begin[..8];
    let present: std::collections::BTreeSet<String> = std::fs::read_dir(wal_dir)
        .map_err(Error::io(format!("reading {}", wal_dir.display())))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    let mut files = Vec::new();
    let history = format!("{timeline}.history");
    if present.contains(&history) {
        files.push(history);
    }
    for number in first..=last {
        let name = format!("{timeline}{:08X}{:08X}", number / 256, number % 256);
        if !present.contains(&name) {
            return Err(Error::Invalid(format!(
                "the WAL segment {name} that the backup needs is no longer in pg_wal (a checkpoint recycled it during the backup), and spec.backup.walArchiving is off: turn walArchiving on, or raise wal_keep_size, and take a new backup"
            )));
        }
        files.push(name);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backups_segments_and_history_are_picked() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "0000000200000000000000FE",
            "0000000200000000000000FF",
            "000000020000000100000000",
            "000000020000000100000001",
            "00000002.history",
            "000000010000000000000010",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(
            files_for_backup(
                dir.path(),
                "0000000200000000000000FF",
                "000000020000000100000000"
            )
            .unwrap(),
            vec![
                "00000002.history",
                "0000000200000000000000FF",
                "000000020000000100000000"
            ]
        );
        let missing = files_for_backup(
            dir.path(),
            "0000000200000000000000FD",
            "0000000200000000000000FE",
        )
        .unwrap_err()
        .to_string();
        assert!(
            missing.contains("0000000200000000000000FD") && missing.contains("walArchiving"),
            "{missing}"
        );
    }
}
