//! Operator telemetry end to end: the `postgres-operator` binary against a real API server, with
//! its OTLP endpoint pointed at a real OpenTelemetry Collector (built by `cargo xtask setup` from
//! the collector's Go modules, OTLP/HTTP receiver and debug exporter). Reconciles show up on
//! `/metrics` (duration histogram and error counter per kind) and as spans the collector
//! receives, with the object's kind, namespace and name, a failed one marked as an error.

mod common;

use std::process::{Child, Command, Stdio};

use common::{Env, spec};

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The collector on a free loopback port; its debug exporter prints every span it receives.
fn start_collector(env: &Env) -> (Process, u16, std::path::PathBuf) {
    let binary = testbed::paths::otelcol();
    assert!(
        binary.exists(),
        "otelcol not found at {} (run `cargo xtask setup`, or set OTELCOL)",
        binary.display()
    );
    let port = testbed::free_port();
    let config = env.server.dir().join("otelcol.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
             exporters:\n  debug:\n    verbosity: detailed\n\
             service:\n  telemetry:\n    metrics:\n      level: none\n  \
             pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n"
        ),
    )
    .unwrap();
    let log_path = env.server.dir().join("otelcol.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(format!("file:{}", config.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    testbed::process::die_with_parent(&mut command);
    (
        Process(command.spawn().expect("starting otelcol")),
        port,
        log_path,
    )
}

fn start_operator(env: &Env, otlp_port: u16) -> (Process, u16) {
    let port = testbed::free_port();
    let log = std::fs::File::create(env.server.dir().join("operator.log")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_postgres-operator"));
    command
        .env("KUBECONFIG", env.server.kubeconfig_path())
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{otlp_port}"),
        )
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--leader-elect", "false"])
        .args(["--watch-namespace", &env.namespace])
        .arg("--log-json")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    testbed::process::die_with_parent(&mut command);
    (
        Process(command.spawn().expect("starting postgres-operator")),
        port,
    )
}

async fn metrics(port: u16) -> Option<String> {
    let (_, body) = testbed::http::request(port, "GET", "/metrics").await.ok()?;
    Some(body)
}

/// The value of the sample `series` (name and labels, exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The spans the debug exporter printed: each block from `Span #` to the next.
fn spans(log: &str) -> Vec<String> {
    log.split("Span #")
        .skip(1)
        .map(|block| block.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_are_measured_on_metrics_and_traced_to_a_real_otlp_collector() {
    // Arrange: the API server, the collector, the operator exporting to it.
    let env = Env::without_controller("apps").await;
    let (_collector, otlp_port, collector_log) = start_collector(&env);
    let (_operator, port) = start_operator(&env, otlp_port);

    // Act: a cluster that reconciles, and one whose Services cannot exist (a 62-character name
    // makes `<name>-rw` longer than a Service name may be), so its reconcile fails.
    env.create_cluster("traced", spec(1, "pg:18.1")).await;
    let failing = "f".repeat(62);
    env.create_cluster(&failing, spec(1, "pg:18.1")).await;

    // Assert: the duration histogram and the error counter per kind on /metrics.
    let text = env
        .eventually("a successful and a failed reconcile on /metrics", || async {
            let text = metrics(port).await?;
            let errors = sample(
                &text,
                "postgres_operator_reconcile_errors_total{controller=\"postgrescluster\"}",
            )?;
            let successes = sample(
                &text,
                "postgres_operator_reconciles_total{controller=\"postgrescluster\",result=\"success\"}",
            )?;
            (errors >= 1.0 && successes >= 1.0).then_some(text)
        })
        .await;
    let count = sample(
        &text,
        "postgres_operator_reconcile_duration_seconds_count{controller=\"postgrescluster\"}",
    )
    .unwrap();
    assert!(count >= 2.0, "{text}");
    assert!(
        sample(
            &text,
            "postgres_operator_reconcile_duration_seconds_bucket{le=\"+Inf\",controller=\"postgrescluster\"}"
        )
        .or_else(|| sample(
            &text,
            "postgres_operator_reconcile_duration_seconds_bucket{controller=\"postgrescluster\",le=\"+Inf\"}"
        ))
            == Some(count),
        "{text}"
    );

    // Assert: the collector received a reconcile span of each object, with kind, namespace and
    // name; the failed one carries the error status.
    let (ok_span, failed_span) = env
        .eventually("the collector prints both reconcile spans", || async {
            let log = std::fs::read_to_string(&collector_log).ok()?;
            let spans = spans(&log);
            let find = |name: &str, status: &str| {
                spans
                    .iter()
                    .find(|span| {
                        span.contains(&format!("-> name: Str({name})"))
                            && span.contains(&format!("Status code    : {status}"))
                    })
                    .cloned()
            };
            // The first reconcile of the failing cluster only adds the finalizer and succeeds.
            Some((find("traced", "Unset")?, find(&failing, "Error")?))
        })
        .await;
    for span in [&ok_span, &failed_span] {
        assert!(
            span.contains("Name           : reconcile PostgresCluster"),
            "{span}"
        );
        assert!(span.contains("-> kind: Str(PostgresCluster)"), "{span}");
        assert!(span.contains("-> namespace: Str(apps)"), "{span}");
    }
    assert!(
        failed_span.contains(&format!(
            "Status message : finalizer of PostgresCluster {failing}"
        )),
        "{failed_span}"
    );
    let log = std::fs::read_to_string(&collector_log).unwrap();
    assert!(
        log.contains("service.name: Str(postgres-operator)"),
        "{log}"
    );
}
