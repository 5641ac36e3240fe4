//! PostgreSQL's log in the instance manager's output stream: a real `pg-instance` running
//! PostgreSQL 18 with `log_destination = jsonlog` and the logging collector; an error statement
//! shows up as one JSON line tagged with the cluster, namespace, instance and role, beside the
//! manager's own log lines, JSON too with `--log-json` (as the operator runs it; the fixture sends the process's stdout and stderr to one file, as
//! `kubectl logs` shows them).

mod support;

use std::time::{Duration, Instant};

use support::TestCluster;

const STARTUP: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_statement_appears_as_a_tagged_json_line_in_the_instance_output() {
    // Arrange
    let cluster = TestCluster::start_with_args("pglog", 1, 0, &["--log-json"])
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    let client = cluster.connect(primary).await.unwrap();

    // Act
    let error = client
        .batch_execute("SELECT * FROM table_missing_for_the_log_test")
        .await
        .unwrap_err();
    assert_eq!(error.code().unwrap().code(), "42P01");

    // Assert: one JSON line with PostgreSQL's fields and our tags.
    let instance = &cluster.instances[primary];
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let log = instance.log();
        let found = log
            .lines()
            .find(|line| line.starts_with('{') && line.contains("table_missing_for_the_log_test"))
            .map(str::to_string);
        if let Some(line) = found {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no JSON line of the error in the instance's output:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["logger"], "postgres", "{line}");
    assert_eq!(entry["cluster"], "pglog", "{line}");
    assert_eq!(entry["namespace"], cluster.namespace.as_str(), "{line}");
    assert_eq!(entry["instance"], instance.name.as_str(), "{line}");
    assert_eq!(entry["role"], "primary", "{line}");
    assert_eq!(entry["error_severity"], "ERROR", "{line}");
    assert_eq!(entry["state_code"], "42P01", "{line}");
    assert_eq!(
        entry["message"], "relation \"table_missing_for_the_log_test\" does not exist",
        "{line}"
    );
    assert_eq!(
        entry["statement"],
        "SELECT * FROM table_missing_for_the_log_test"
    );
    // The manager's own lines are in the same stream, as JSON with the run's span.
    let log = instance.log();
    let started = log
        .lines()
        .find(|line| line.contains("postgres started"))
        .unwrap_or_else(|| panic!("no `postgres started` line:\n{log}"));
    let entry: serde_json::Value = serde_json::from_str(started)
        .unwrap_or_else(|e| panic!("the manager's line is not JSON ({e}): {started}"));
    assert_eq!(entry["level"], "INFO", "{started}");
    assert_eq!(entry["span"]["cluster"], "pglog", "{started}");
    assert_eq!(
        entry["span"]["instance"],
        instance.name.as_str(),
        "{started}"
    );
}
