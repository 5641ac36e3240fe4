//! The archiver's long-lived WAL uploader: one Python process (barman's own argument parser,
//! cloud interface and `CloudWalUploader`, as `barman-cloud-wal-archive` builds them) uploads
//! file after file, one path a line on its stdin and one answer a line on its stdout. A WAL
//! segment then costs its upload only, where a `barman-cloud-wal-archive` per file paid a Python
//! start-up and a new boto3 session (a few hundred ms of CPU) each time, which made a busy
//! primary fall behind on a loaded machine. The archiver keeps one uploader per slot; an
//! uploader is dropped (its process killed) after a failure or a timeout, so a stuck or broken
//! process never serves a second file.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::backup::barman::BarmanCloud;
use crate::backup::store::Store;
use crate::error::{Error, Result};

/// Lines of the process's stderr kept for the error when it dies.
const STDERR_LINES: usize = 12;
/// The command the errors name (what the process runs, file after file).
const PROGRAM: &str = "barman-cloud-wal-archive";

/// Uploads WAL files to one store, through one long-lived process started on first use (or one
/// `barman-cloud-wal-archive` per file when the engine folder has no `barman-cloud-python`).
#[derive(Debug)]
pub struct WalUploader {
    barman: BarmanCloud,
    store: Store,
    process: Option<Process>,
}

#[derive(Debug)]
struct Process {
    // Held so that dropping the uploader kills the process (kill_on_drop).
    _child: Child,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl WalUploader {
    /// An uploader to `store`; its process starts with the first file.
    pub fn new(barman: BarmanCloud, store: Store) -> Self {
        Self {
            barman,
            store,
            process: None,
        }
    }

    /// Uploads `wal` (segment, `.partial` or `.history`); `Ok` once the store confirmed it.
    /// After an error the uploader is spent: drop it and take a new one.
    pub async fn upload(&mut self, wal: &Path) -> Result<()> {
        if self.process.is_none() {
            match self.barman.wal_uploader_command(&self.store) {
                Some(mut command) => self.process = Some(self.spawn(&mut command)?),
                None => return self.barman.archive_wal(&self.store, wal).await,
            }
        }
        let Some(process) = self.process.as_mut() else {
            return Err(Error::Invalid("the WAL uploader has no process".into()));
        };
        let line = format!("{}\n", wal.display());
        let answer = match process.stdin.write_all(line.as_bytes()).await {
            Ok(()) => process.answers.next_line().await.ok().flatten(),
            Err(_) => None,
        };
        match answer.as_deref() {
            Some("ok") => Ok(()),
            Some(answer) => {
                let why = answer.strip_prefix("error ").unwrap_or(answer);
                self.process = None;
                Err(self.failure("the upload failed", why))
            }
            None => {
                let stderr = process
                    .stderr
                    .lock()
                    .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default();
                self.process = None;
                Err(self.failure("the uploader process ended", &stderr))
            }
        }
    }

    fn failure(&self, status: &str, output: &str) -> Error {
        Error::Program {
            program: PROGRAM.to_string(),
            status: status.to_string(),
            output: self.barman.redact(output, &self.store),
        }
    }

    fn spawn(&self, command: &mut tokio::process::Command) -> Result<Process> {
        let mut child = command
            .spawn()
            .map_err(Error::io("starting the WAL uploader (barman-cloud-python)"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(Error::Invalid(
                "the WAL uploader started without its pipes".into(),
            ));
        };
        // Read stderr as it comes (a full pipe would block the process) and keep its end.
        let kept = Arc::new(Mutex::new(VecDeque::new()));
        let sink = kept.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut kept) = sink.lock() {
                    if kept.len() == STDERR_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            }
        });
        Ok(Process {
            _child: child,
            stdin,
            answers: BufReader::new(stdout).lines(),
            stderr: kept,
        })
    }
}
