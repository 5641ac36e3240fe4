//! PostgreSQL's own log on the instance manager's stdout, so that `kubectl logs` shows one
//! stream: PostgreSQL writes JSON lines (`log_destination = jsonlog`, through its logging
//! collector) into one file under the run folder; the instance manager follows that file and
//! writes each line to stdout with the cluster, namespace, instance and current role added.
//!
//! The file is not rotated by PostgreSQL (one fixed name); once it is larger than
//! [`TRUNCATE_AFTER_BYTES`] and read to its end, it is truncated (the collector opens it in append
//! mode, so its next line lands at the new start).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::http::Shared;

/// Folder of the log file, under the run folder.
pub const LOG_DIRECTORY: &str = "log";

/// `log_filename`; with `jsonlog` PostgreSQL writes `postgresql.json`.
const LOG_FILENAME: &str = "postgresql.log";

/// The file PostgreSQL writes its JSON lines into.
const JSON_FILENAME: &str = "postgresql.json";

/// Size past which the followed file is truncated once read.
pub const TRUNCATE_AFTER_BYTES: u64 = 64 * 1024 * 1024;

/// How often the file is read.
const POLL: Duration = Duration::from_millis(200);

/// The settings that send PostgreSQL's log, as JSON lines, into the followed file (the user's
/// own settings, written after them, still win).
pub fn settings(run_dir: &Path) -> Vec<(String, String)> {
    let directory = run_dir.join(LOG_DIRECTORY).display().to_string();
    [
        ("logging_collector", "on"),
        ("log_destination", "jsonlog"),
        ("log_directory", directory.as_str()),
        ("log_filename", LOG_FILENAME),
        ("log_rotation_age", "0"),
        ("log_rotation_size", "0"),
        ("log_file_mode", "0600"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect()
}

/// The file PostgreSQL writes its JSON lines into.
pub fn file(run_dir: &Path) -> PathBuf {
    run_dir.join(LOG_DIRECTORY).join(JSON_FILENAME)
}

/// What every line is tagged with, besides the role of the moment.
#[derive(Clone, Debug)]
pub struct Tags {
    /// The PostgresCluster.
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
    /// This instance (its pod name).
    pub instance: String,
}

/// One line of PostgreSQL's JSON log with the tags first (`"logger":"postgres"`, cluster,
/// namespace, instance, role); the line itself is kept byte for byte. A line that is not a JSON
/// object is carried as the `message` of one.
pub fn tag_line(line: &str, tags: &Tags, role: &str) -> String {
    let quoted = |value: &str| serde_json::Value::from(value).to_string();
    let head = format!(
        "{{\"logger\":\"postgres\",\"cluster\":{},\"namespace\":{},\"instance\":{},\"role\":{}",
        quoted(&tags.cluster),
        quoted(&tags.namespace),
        quoted(&tags.instance),
        quoted(role)
    );
    let line = line.trim_end_matches(['\r', '\n']);
    match line.strip_prefix('{') {
        Some(rest) if line.ends_with('}') && rest.trim_start().starts_with('}') => {
            format!("{head}}}")
        }
        Some(rest) if line.ends_with('}') => format!("{head},{rest}"),
        _ => format!("{head},\"message\":{}}}", quoted(line)),
    }
}

/// Follows the log file of `run_dir` on a thread of its own (blocking reads), from its current
/// end, until the process exits.
pub fn spawn(run_dir: &Path, tags: Tags, shared: Arc<Shared>) {
    let path = file(run_dir);
    let spawned = std::thread::Builder::new()
        .name("postgres-log".into())
        .spawn(move || {
            let role = || {
                shared
                    .status
                    .read()
                    .map(|status| status.role.clone())
                    .unwrap_or_default()
            };
            follow(&path, &tags, role, &mut std::io::stdout(), None);
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "starting the PostgreSQL log follower failed");
    }
}

/// Copies the lines appended to `path` into `out`, tagged; `rounds` bounds the polls (tests),
/// `None` follows forever. The file may not exist yet, be truncated or be recreated.
pub fn follow(
    path: &Path,
    tags: &Tags,
    role: impl Fn() -> String,
    out: &mut impl Write,
    rounds: Option<usize>,
) {
    let mut offset = std::fs::metadata(path).map(|meta| meta.len()).unwrap_or(0);
    let mut partial = Vec::new();
    let mut round = 0;
    loop {
        if let Err(error) = read_new_lines(path, &mut offset, &mut partial, tags, &role, out) {
            tracing::debug!(%error, path = %path.display(), "reading the PostgreSQL log");
        }
        round += 1;
        if rounds.is_some_and(|rounds| round >= rounds) {
            return;
        }
        std::thread::sleep(POLL);
    }
}

fn read_new_lines(
    path: &Path,
    offset: &mut u64,
    partial: &mut Vec<u8>,
    tags: &Tags,
    role: &impl Fn() -> String,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let length = file.metadata()?.len();
    if length < *offset {
        // Truncated or recreated: start over.
        *offset = 0;
        partial.clear();
    }
    file.seek(SeekFrom::Start(*offset))?;
    let mut buffer = Vec::new();
    file.read_to_end(&mut buffer)?;
    *offset += buffer.len() as u64;
    partial.extend_from_slice(&buffer);
    let complete = partial.iter().rposition(|byte| *byte == b'\n');
    if let Some(end) = complete {
        let role = role();
        let mut text = String::new();
        for line in String::from_utf8_lossy(&partial[..end]).lines() {
            if !line.trim().is_empty() {
                text.push_str(&tag_line(line, tags, &role));
                text.push('\n');
            }
        }
        partial.drain(..=end);
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    if *offset > TRUNCATE_AFTER_BYTES && partial.is_empty() {
        file.set_len(0)?;
        *offset = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Tags {
        Tags {
            cluster: "db".into(),
            namespace: "prod".into(),
            instance: "db-0".into(),
        }
    }

    #[test]
    fn a_json_line_gets_the_tags_first_and_keeps_its_fields() {
        let line = r#"{"timestamp":"2026-12-04 07:00:00.000 UTC","error_severity":"ERROR","message":"x \"y\""}"#;
        let tagged = tag_line(line, &tags(), "primary");
        let value: serde_json::Value = serde_json::from_str(&tagged).unwrap();
        assert_eq!(value["cluster"], "db");
        assert_eq!(value["instance"], "db-0");
        assert_eq!(value["role"], "primary");
        assert_eq!(value["logger"], "postgres");
        assert_eq!(value["message"], "x \"y\"");
        assert!(tagged.ends_with(&line[1..]));
    }

    #[test]
    fn other_lines_become_the_message_of_a_json_object() {
        let value: serde_json::Value =
            serde_json::from_str(&tag_line("plain \"text\"", &tags(), "replica")).unwrap();
        assert_eq!(value["message"], "plain \"text\"");
        let empty: serde_json::Value =
            serde_json::from_str(&tag_line("{}", &tags(), "replica")).unwrap();
        assert_eq!(empty["role"], "replica");
    }

    #[test]
    fn follow_copies_complete_lines_after_the_start_and_survives_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postgresql.json");
        std::fs::write(&path, "{\"message\":\"before\"}\n").unwrap();
        let mut offset = std::fs::metadata(&path).unwrap().len();
        let mut partial = Vec::new();
        let mut out = Vec::new();
        let role = || "primary".to_string();
        let append = |text: &str| {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            file.write_all(text.as_bytes()).unwrap();
        };
        append("{\"message\":\"one\"}\n{\"message\":\"tw");
        read_new_lines(&path, &mut offset, &mut partial, &tags(), &role, &mut out).unwrap();
        append("o\"}\n");
        read_new_lines(&path, &mut offset, &mut partial, &tags(), &role, &mut out).unwrap();
        std::fs::write(&path, "{\"message\":\"three\"}\n").unwrap();
        read_new_lines(&path, &mut offset, &mut partial, &tags(), &role, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let messages: Vec<String> = text
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["message"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(messages, ["one", "two", "three"]);
    }
}
