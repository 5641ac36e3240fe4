//! The test step of `cargo xtask test`: every test binary of the workspace built once, then run in
//! parallel lanes.
//!
//! `cargo test --workspace` runs one test binary after the other. Ours spend most of their time
//! waiting on PostgreSQL, the API server and timeouts, not on the CPU, so a sequential run took
//! about 34 minutes of the 45 we allow. Here the binaries run `XTASK_TEST_JOBS` at a time (3 by
//! default), the longest first, with two limits that keep a two-core machine from timing out:
//! - at most one end-to-end binary (`nodeagent/tests/e2e*`: a control plane, a node agent and
//!   several PostgreSQL pods each) at a time;
//! - at most two heavy binaries at a time: the end-to-end ones and the instance manager's backup,
//!   HA and partition suites (a dozen PostgreSQL servers each). The third slot takes the light
//!   ones.
//!
//! The delivery test signs the binaries built for the end-to-end tests (`release --profile dev`)
//! rather than building optimised ones: beside the end-to-end tests that build took 52 minutes
//! and held a heavy slot throughout, which queued every other heavy binary behind one lane.
//!
//! Each binary's output goes to `target/test-logs/<package>-<target>.log`; its `test result:` line
//! is printed as `cargo test` prints it (a failed binary's after its second run, below), and a
//! last line adds up each binary's last attempt (a run in which no test passed fails: it would
//! say nothing). A failure prints the tail of its log. A binary that failed runs once more, alone, at the end: the step fails when it
//! fails again, and names it FLAKY when it passes alone (both logs are kept).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Test binaries that start a whole Kubernetes stack with pods: one at a time.
const E2E_PREFIX: &str = "nodeagent/e2e";

/// Other binaries that load the machine for minutes (see the module comment).
const HEAVY: &[&str] = &[
    "instance/backup_job",
    "instance/backup",
    "instance/high_availability",
    "instance/partitions",
];

/// Most heavy binaries (end-to-end ones included) running at once.
const MAX_HEAVY: usize = 2;

/// Binaries known to run for minutes, started first so that they do not end the run alone.
/// The end-to-end binaries come first: one at a time, they are the longest chain of the run
/// (2026-12-07, in parallel lanes, seconds: e2e 580, e2e_operations 456, e2e_backup about 400,
/// e2e_clients 251, e2e_backup_store 115, e2e_sharding 72; backup 157, backup_job 155, tpch 141).
const LONG_FIRST: &[&str] = &[
    "nodeagent/e2e",
    "instance/backup",
    "nodeagent/e2e_operations",
    "instance/backup_job",
    "nodeagent/e2e_backup",
    "instance/high_availability",
    "nodeagent/e2e_clients",
    "instance/partitions",
    "nodeagent/e2e_backup_store",
    "nodeagent/e2e_sharding",
    "router/tpch",
    "xtask/delivery",
];

/// One test executable and where cargo would run it.
#[derive(Debug, Clone)]
struct TestBinary {
    /// `<package folder>/<target>`, e.g. `nodeagent/e2e_backup`, or `<package folder>/lib`.
    label: String,
    executable: PathBuf,
    /// The package's folder: cargo runs tests there, and some read files relative to it.
    package_dir: PathBuf,
}

impl TestBinary {
    fn e2e(&self) -> bool {
        self.label.starts_with(E2E_PREFIX)
    }

    fn heavy(&self) -> bool {
        self.e2e() || HEAVY.contains(&self.label.as_str())
    }

    fn rank(&self) -> usize {
        LONG_FIRST
            .iter()
            .position(|long| *long == self.label)
            .unwrap_or(LONG_FIRST.len())
    }
}

/// The outcome of one binary.
struct Outcome {
    label: String,
    binary: TestBinary,
    passed: bool,
    elapsed: Duration,
    log: PathBuf,
    /// What the binary's `test result:` lines counted.
    counts: Counts,
}

/// The numbers of a libtest `test result:` line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    measured: u64,
    filtered_out: u64,
}

impl Counts {
    /// Adds up the `test result:` lines of a test binary's output (one per binary; none when it
    /// crashed before its summary).
    fn read(output: &str) -> Counts {
        let mut counts = Counts::default();
        for line in output.lines() {
            let Some(summary) = line.strip_prefix("test result: ") else {
                continue;
            };
            for part in summary.split(['.', ';']) {
                let mut words = part.split_whitespace();
                let (Some(number), Some(name)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(number) = number.parse::<u64>() else {
                    continue;
                };
                match name {
                    "passed" => counts.passed += number,
                    "failed" => counts.failed += number,
                    "ignored" => counts.ignored += number,
                    "measured" => counts.measured += number,
                    "filtered" => counts.filtered_out += number,
                    _ => {}
                }
            }
        }
        counts
    }

    fn add(self, other: Counts) -> Counts {
        Counts {
            passed: self.passed + other.passed,
            failed: self.failed + other.failed,
            ignored: self.ignored + other.ignored,
            measured: self.measured + other.measured,
            filtered_out: self.filtered_out + other.filtered_out,
        }
    }

    /// The line libtest prints, so that whoever reads a `cargo test` log reads this one alike.
    fn summary(&self, ok: bool, elapsed: Duration) -> String {
        format!(
            "test result: {}. {} passed; {} failed; {} ignored; {} measured; {} filtered out; finished in {:.2}s",
            if ok { "ok" } else { "FAILED" },
            self.passed,
            self.failed,
            self.ignored,
            self.measured,
            self.filtered_out,
            elapsed.as_secs_f64()
        )
    }
}

/// Builds all test targets of the workspace, runs the doc tests, then every test binary in
/// parallel lanes; fails naming each binary that failed.
pub fn run(root: &Path) -> anyhow::Result<()> {
    let binaries = build(root)?;
    // A renamed binary would silently leave the limits above: say so instead.
    let unknown: Vec<&str> = HEAVY
        .iter()
        .chain(LONG_FIRST)
        .filter(|label| !binaries.iter().any(|binary| binary.label == **label))
        .copied()
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "xtask/src/test_runner.rs names test binaries that do not exist (renamed?): {unknown:?}"
    );
    // The end-to-end tests (nodeagent) run the workspace's binaries as the pods' images, and
    // kubectl-pg; the delivery test signs them (`release --profile dev`). They are built after the
    // test targets, with the release's own arguments: `cargo test --workspace` unifies features
    // over the whole workspace and links `target/debug/<binary>` from its own build, and the
    // release would then link them again, under end-to-end tests that start pods from them.
    crate::cargo(&crate::release::build_args("dev"))?;
    crate::cargo(&["test", "--workspace", "--doc"])?;
    let jobs = std::env::var("XTASK_TEST_JOBS")
        .ok()
        .and_then(|value| value.parse::<usize>().ok())
        .filter(|jobs| *jobs > 0)
        .unwrap_or(3);
    let logs = root.join("target").join("test-logs");
    std::fs::create_dir_all(&logs)?;
    crate::step(&format!(
        "running {} test binaries, {jobs} at a time (logs in {})",
        binaries.len(),
        logs.display()
    ));
    let started = Instant::now();
    let outcomes = run_lanes(binaries, jobs, &logs);
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed).collect();
    for outcome in &failed {
        print_tail(outcome);
    }
    crate::step(&format!(
        "{} test binaries in {:.0} s, {} failed",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    ));
    // A binary that failed beside others runs once more, alone: on two cores a scenario with a
    // dozen PostgreSQL servers can miss a timeout because of its neighbours. It counts as passed
    // only if it passes alone, and it is named as flaky either way so that nobody mistakes it
    // for a clean run; its first log is kept beside the second.
    let again = run_again_alone(&failed, &logs);
    let (flaky, still_failing) = labels_by_outcome(&again);
    // The last line adds up each binary's last attempt (a binary that passed alone counts as
    // its second run; the FLAKY line above names it).
    let total = outcomes
        .iter()
        .filter(|o| o.passed)
        .chain(&again)
        .fold(Counts::default(), |total, o| total.add(o.counts));
    println!(
        "{}",
        total.summary(still_failing.is_empty(), started.elapsed())
    );
    anyhow::ensure!(
        total.passed > 0,
        "{} test binaries ran and not one test passed: the run checked nothing",
        outcomes.len()
    );
    if !flaky.is_empty() {
        crate::step(&format!(
            "FLAKY under load (failed beside others, passed alone): {}",
            flaky.join(", ")
        ));
    }
    anyhow::ensure!(
        still_failing.is_empty(),
        "test binaries failed, also when run alone: {}",
        still_failing.join(", ")
    );
    Ok(())
}

/// Runs each failed binary once more, one at a time; the second attempts.
fn run_again_alone(failed: &[&Outcome], logs: &Path) -> Vec<Outcome> {
    let mut again_all = Vec::new();
    for outcome in failed {
        let first = outcome.log.with_extension("first-attempt.log");
        let _ = std::fs::rename(&outcome.log, &first);
        crate::step(&format!(
            "re-running {} alone (first attempt's log: {})",
            outcome.label,
            first.display()
        ));
        let again = run_one(&outcome.binary, logs);
        println!("{}", again.counts.summary(again.passed, again.elapsed));
        if !again.passed {
            print_tail(&again);
        }
        again_all.push(again);
    }
    again_all
}

/// The labels of `outcomes` that passed and of those that failed.
fn labels_by_outcome(outcomes: &[Outcome]) -> (Vec<String>, Vec<String>) {
    let (passed, failed): (Vec<&Outcome>, Vec<&Outcome>) =
        outcomes.iter().partition(|outcome| outcome.passed);
    let labels = |outcomes: Vec<&Outcome>| outcomes.into_iter().map(|o| o.label.clone()).collect();
    (labels(passed), labels(failed))
}

/// Prints the end of a failed binary's log.
fn print_tail(outcome: &Outcome) {
    let text = std::fs::read_to_string(&outcome.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    // Quoted with "| ": the binary's own `test result:` line in it is not the run's.
    let tail: Vec<String> = lines[lines.len().saturating_sub(200)..]
        .iter()
        .map(|line| format!("| {line}"))
        .collect();
    let tail = tail.join("\n");
    eprintln!(
        "\n==> FAILED {} (last 200 lines of {}):\n{tail}",
        outcome.label,
        outcome.log.display()
    );
}

/// `cargo test --workspace --no-run`, reading the executables from cargo's JSON messages.
fn build(root: &Path) -> anyhow::Result<Vec<TestBinary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    crate::step("cargo test --workspace --no-run");
    let output = Command::new(cargo)
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    anyhow::ensure!(
        output.status.success(),
        "building the tests failed ({})",
        output.status
    );
    let mut binaries = parse_artifacts(&String::from_utf8_lossy(&output.stdout), root)?;
    binaries.sort_by(|a, b| a.rank().cmp(&b.rank()).then(a.label.cmp(&b.label)));
    Ok(binaries)
}

/// The test executables among cargo's `compiler-artifact` messages.
fn parse_artifacts(messages: &str, root: &Path) -> anyhow::Result<Vec<TestBinary>> {
    let mut binaries = Vec::new();
    for line in messages.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let manifest = message["manifest_path"]
            .as_str()
            .context("a compiler-artifact message without manifest_path")?;
        let package_dir = Path::new(manifest)
            .parent()
            .context("manifest_path without a folder")?
            .to_path_buf();
        let folder = package_dir
            .strip_prefix(root)
            .unwrap_or(&package_dir)
            .display()
            .to_string();
        let folder = if folder.is_empty() { "." } else { &folder };
        let kinds = &message["target"]["kind"];
        let target = if kinds.as_array().is_some_and(|k| {
            k.iter()
                .any(|k| k == "test" || k == "bench" || k == "example")
        }) {
            message["target"]["name"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        } else {
            // Unit tests of a lib or bin target.
            format!(
                "{}:{}",
                kinds[0].as_str().unwrap_or("?"),
                message["target"]["name"].as_str().unwrap_or("?")
            )
        };
        binaries.push(TestBinary {
            label: format!("{folder}/{target}"),
            executable: PathBuf::from(executable),
            package_dir,
        });
    }
    Ok(binaries)
}

/// Runs `binaries` on `jobs` threads, within the limits of the module comment.
fn run_lanes(binaries: Vec<TestBinary>, jobs: usize, logs: &Path) -> Vec<Outcome> {
    struct Queue {
        waiting: VecDeque<TestBinary>,
        e2e_running: bool,
        heavy_running: usize,
    }
    impl Queue {
        fn allows(&self, binary: &TestBinary) -> bool {
            let e2e_blocked = binary.e2e() && self.e2e_running;
            let heavy_blocked = binary.heavy() && self.heavy_running >= MAX_HEAVY;
            !(e2e_blocked || heavy_blocked)
        }
    }
    let queue = Arc::new(Mutex::new(Queue {
        waiting: binaries.into(),
        e2e_running: false,
        heavy_running: 0,
    }));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let queue = queue.clone();
            let outcomes = outcomes.clone();
            let logs = logs.to_path_buf();
            std::thread::spawn(move || {
                loop {
                    let next = {
                        let mut queue = queue.lock().expect("queue lock");
                        if queue.waiting.is_empty() {
                            return;
                        }
                        let pick = queue.waiting.iter().position(|binary| queue.allows(binary));
                        let next = pick.and_then(|index| queue.waiting.remove(index));
                        if let Some(binary) = &next {
                            queue.e2e_running |= binary.e2e();
                            queue.heavy_running += usize::from(binary.heavy());
                        }
                        next
                    };
                    let Some(binary) = next else {
                        // Only binaries over a limit are left: wait for a running one to end.
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    };
                    let outcome = run_one(&binary, &logs);
                    {
                        let mut queue = queue.lock().expect("queue lock");
                        queue.e2e_running &= !binary.e2e();
                        queue.heavy_running -= usize::from(binary.heavy());
                    }
                    eprintln!(
                        "==> {} {:>6.1} s  {} ({} passed, {} failed, {} ignored)",
                        if outcome.passed { "ok    " } else { "FAILED" },
                        outcome.elapsed.as_secs_f64(),
                        outcome.label,
                        outcome.counts.passed,
                        outcome.counts.failed,
                        outcome.counts.ignored
                    );
                    // A failed binary's line waits for its second run (`run_again_alone`).
                    if outcome.passed {
                        println!(
                            "{}",
                            outcome.counts.summary(outcome.passed, outcome.elapsed)
                        );
                    }
                    outcomes.lock().expect("outcomes lock").push(outcome);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let mut outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes lock"));
    outcomes.sort_by(|a, b| a.label.cmp(&b.label));
    outcomes
}

/// Runs one test binary the way `cargo test` does (in its package's folder), output to a log.
fn run_one(binary: &TestBinary, logs: &Path) -> Outcome {
    let log = logs.join(format!("{}.log", binary.label.replace(['/', ':'], "-")));
    let started = Instant::now();
    let passed = std::fs::File::create(&log)
        .and_then(|file| {
            let stderr = file.try_clone()?;
            Command::new(&binary.executable)
                .current_dir(&binary.package_dir)
                .env("CARGO_MANIFEST_DIR", &binary.package_dir)
                .stdin(Stdio::null())
                .stdout(file)
                .stderr(stderr)
                .status()
        })
        .map(|status| status.success())
        .unwrap_or(false);
    let counts = Counts::read(&std::fs::read_to_string(&log).unwrap_or_default());
    Outcome {
        label: binary.label.clone(),
        binary: binary.clone(),
        passed,
        elapsed: started.elapsed(),
        log,
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_are_read_from_cargo_messages_with_their_package_folder() {
        let root = Path::new("/w");
        let messages = [
            r#"{"reason":"compiler-artifact","manifest_path":"/w/nodeagent/Cargo.toml","target":{"kind":["test"],"name":"e2e_backup"},"profile":{"test":true},"executable":"/w/target/debug/deps/e2e_backup-1"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/api/Cargo.toml","target":{"kind":["lib"],"name":"api"},"profile":{"test":true},"executable":"/w/target/debug/deps/api-2"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/w/api/Cargo.toml","target":{"kind":["lib"],"name":"api"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"build-finished","success":true}"#,
            "not json",
        ]
        .join("\n");
        let binaries = parse_artifacts(&messages, root).unwrap();
        let labels: Vec<&str> = binaries.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, ["nodeagent/e2e_backup", "api/lib:api"]);
        assert!(binaries[0].e2e() && binaries[0].heavy());
        assert!(!binaries[1].heavy());
        assert_eq!(binaries[0].package_dir, Path::new("/w/nodeagent"));
    }

    #[test]
    fn test_result_lines_are_counted_and_added_up() {
        let output = "running 3 tests\ntest a ... ok\n\
            test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 4 filtered out; finished in 0.01s\n";
        let one = Counts::read(output);
        assert_eq!(
            one,
            Counts {
                passed: 2,
                ignored: 1,
                filtered_out: 4,
                ..Counts::default()
            }
        );
        let failed = Counts::read(
            "test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
        );
        let total = one.add(failed).add(Counts::read("thread 'main' panicked"));
        assert_eq!((total.passed, total.failed, total.ignored), (7, 2, 1));
        assert_eq!(
            total.summary(false, Duration::from_millis(1500)),
            "test result: FAILED. 7 passed; 2 failed; 1 ignored; 0 measured; 4 filtered out; finished in 1.50s"
        );
    }

    #[test]
    fn only_one_end_to_end_binary_runs_at_a_time_and_failures_are_reported() {
        // Two end-to-end binaries that each hold a marker file while they run: the second fails when
        // it finds the first one's marker.
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("running");
        let script = dir.path().join("heavy.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ -e {m} ] && exit 3\ntouch {m}; sleep 0.3; rm {m}\n\
                 echo 'test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.30s'\n",
                m = marker.display()
            ),
        )
        .unwrap();
        let failing = dir.path().join("failing.sh");
        std::fs::write(&failing, "#!/bin/sh\necho broken\nexit 1\n").unwrap();
        for file in [&script, &failing] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let binary = |label: &str, executable: &Path| TestBinary {
            label: label.into(),
            executable: executable.to_path_buf(),
            package_dir: dir.path().to_path_buf(),
        };
        let outcomes = run_lanes(
            vec![
                binary("nodeagent/e2e_a", &script),
                binary("nodeagent/e2e_b", &script),
                binary("api/failing", &failing),
            ],
            3,
            dir.path(),
        );
        let passed: Vec<(&str, bool)> = outcomes
            .iter()
            .map(|o| (o.label.as_str(), o.passed))
            .collect();
        assert_eq!(
            passed,
            [
                ("api/failing", false),
                ("nodeagent/e2e_a", true),
                ("nodeagent/e2e_b", true)
            ]
        );
        let log = std::fs::read_to_string(&outcomes[0].log).unwrap();
        assert_eq!(log.trim(), "broken");
        let passed_tests: Vec<u64> = outcomes.iter().map(|o| o.counts.passed).collect();
        assert_eq!(passed_tests, [0, 1, 1]);
    }

    #[test]
    fn a_failed_binary_runs_again_alone_and_only_a_second_failure_counts() {
        let dir = tempfile::tempdir().unwrap();
        // Fails on its first run only (a timeout under load), then passes.
        let flaky = dir.path().join("flaky.sh");
        std::fs::write(
            &flaky,
            format!(
                "#!/bin/sh\nif [ -e {m} ]; then echo second; exit 0; fi\ntouch {m}; echo first; exit 1\n",
                m = dir.path().join("ran-once").display()
            ),
        )
        .unwrap();
        let broken = dir.path().join("broken.sh");
        std::fs::write(&broken, "#!/bin/sh\necho broken\nexit 1\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        for script in [&flaky, &broken] {
            std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let binary = |label: &str, script: &Path| TestBinary {
            label: label.to_string(),
            executable: script.to_path_buf(),
            package_dir: dir.path().to_path_buf(),
        };
        let outcomes = run_lanes(
            vec![binary("api/flaky", &flaky), binary("api/broken", &broken)],
            2,
            dir.path(),
        );
        let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed).collect();
        assert_eq!(failed.len(), 2);
        let again = run_again_alone(&failed, dir.path());
        assert_eq!(again.len(), 2, "both second attempts are returned");
        let (passed_alone, failed_again) = labels_by_outcome(&again);
        assert_eq!(passed_alone, ["api/flaky"]);
        assert_eq!(failed_again, ["api/broken"]);
        // Both attempts' logs are kept.
        let first =
            std::fs::read_to_string(dir.path().join("api-flaky.first-attempt.log")).unwrap();
        let second = std::fs::read_to_string(dir.path().join("api-flaky.log")).unwrap();
        assert_eq!((first.trim(), second.trim()), ("first", "second"));
    }

    #[test]
    fn at_most_two_heavy_binaries_run_at_once() {
        // Each heavy binary leaves a file while it runs and fails when it sees more than two.
        let dir = tempfile::tempdir().unwrap();
        let running = dir.path().join("running");
        std::fs::create_dir(&running).unwrap();
        let script = dir.path().join("heavy.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ntouch {r}/$$\n[ $(ls {r} | wc -l) -le 2 ] || exit 3\nsleep 0.4\nrm {r}/$$\n",
                r = running.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let binaries = HEAVY
            .iter()
            .map(|label| TestBinary {
                label: label.to_string(),
                executable: script.clone(),
                package_dir: dir.path().to_path_buf(),
            })
            .collect();
        let outcomes = run_lanes(binaries, 3, dir.path());
        assert_eq!(outcomes.len(), HEAVY.len());
        assert!(
            outcomes.iter().all(|o| o.passed),
            "a third heavy binary ran beside two"
        );
    }
}
