//! OpenTelemetry traces: a `pg-router` process pointed at an OTLP/HTTP receiver exports one
//! `routed_query` span per statement, with the plan, the shards it touched, the query text
//! without its literals, and the SQLSTATE of a failure; the queued spans are flushed on SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use common::{SCHEMA_TOML, config_toml, connect, process, shard_options, start_shards};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use prost::Message;
use testbed::process::{ChildGuard, die_with_parent};

/// A literal no exported byte may contain.
const SECRET: &str = "s3cr3t";

/// What the receiver got: every request body as sent, and the decoded requests.
#[derive(Default)]
struct Received {
    bodies: Vec<Vec<u8>>,
    requests: Vec<ExportTraceServiceRequest>,
}

/// An OTLP/HTTP traces endpoint (`POST /v1/traces`, protobuf) on 127.0.0.1.
async fn start_receiver() -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), received)
}

async fn export(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body.as_ref()) else {
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    let mut received = received.lock().unwrap();
    received.bodies.push(body.to_vec());
    received.requests.push(request);
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// One exported span, flattened for assertions.
#[derive(Debug)]
struct ExportedSpan {
    name: String,
    kind: i32,
    status: i32,
    attributes: BTreeMap<String, String>,
}

fn value_text(attribute: &KeyValue) -> String {
    match attribute.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        Some(any_value::Value::BoolValue(flag)) => flag.to_string(),
        Some(any_value::Value::DoubleValue(number)) => number.to_string(),
        other => format!("{other:?}"),
    }
}

fn service_names(received: &Received) -> Vec<String> {
    received
        .requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .filter(|a| a.key == "service.name")
        .map(value_text)
        .collect()
}

fn spans(received: &Received) -> Vec<ExportedSpan> {
    received
        .requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .map(|span| ExportedSpan {
            name: span.name.clone(),
            kind: span.kind,
            status: span.status.as_ref().map_or(0, |s| s.code),
            attributes: span
                .attributes
                .iter()
                .map(|a| (a.key.clone(), value_text(a)))
                .collect(),
        })
        .collect()
}

fn span_with_text<'a>(spans: &'a [ExportedSpan], text: &str) -> &'a ExportedSpan {
    spans
        .iter()
        .find(|s| s.attributes.get("db.query.text").map(String::as_str) == Some(text))
        .unwrap_or_else(|| panic!("no span with db.query.text {text:?} in {spans:#?}"))
}

/// The span whose query text contains `fragment` (for statements the planner re-renders).
fn span_containing<'a>(spans: &'a [ExportedSpan], fragment: &str) -> &'a ExportedSpan {
    spans
        .iter()
        .find(|s| {
            s.attributes
                .get("db.query.text")
                .is_some_and(|t| t.contains(fragment))
        })
        .unwrap_or_else(|| panic!("no span with {fragment:?} in its db.query.text: {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_queries_are_exported_as_spans_without_literals() {
    // Arrange: two shards, an OTLP receiver, and a pg-router process exporting to it.
    let shards = tokio::task::block_in_place(|| start_shards(2, shard_options()));
    let (endpoint, received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(&config, config_toml(&shards, SCHEMA_TOML)).unwrap();
    let log = dir.path().join("router.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pg-router"));
    command
        .arg("--config")
        .arg(&config)
        .env("LOG_LEVEL", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME");
    process::log_to(&mut command, &log);
    die_with_parent(&mut command);
    let mut child = command.spawn().expect("spawning pg-router");
    let port = process::listening(&mut child, &log).await.port;
    let mut router = ChildGuard::new(child, Signal::SIGTERM, Duration::from_secs(20));

    // Act: DDL, a single-shard insert and read, a parameterized read, a scatter read and a
    // failing statement, all through the router; then stop it.
    let client = connect(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres"
    ))
    .await;
    client
        .batch_execute("CREATE TABLE customers (id bigint PRIMARY KEY, name text, region text)")
        .await
        .unwrap();
    client
        .simple_query("INSERT INTO customers (id, name, region) VALUES (1, 's3cr3t', 'north')")
        .await
        .unwrap();
    client
        .simple_query("SELECT name FROM customers WHERE id = 1 AND name = 's3cr3t'")
        .await
        .unwrap();
    client
        .query("SELECT name FROM customers WHERE id = $1", &[&1i64])
        .await
        .unwrap();
    client
        .simple_query("SELECT count(*) FROM customers WHERE region = 's3cr3t'")
        .await
        .unwrap();
    let failure = client
        .simple_query("SELECT 1 / 0 FROM customers WHERE id = 1 AND name = 's3cr3t'")
        .await
        .expect_err("division by zero");
    assert_eq!(
        failure.code().map(|c| c.code()),
        Some("22012"),
        "{failure:?}"
    );
    drop(client);
    // The batch processor holds spans for seconds: what arrives now is the flush on exit.
    tokio::task::block_in_place(|| router.stop());

    // Assert: every statement's span arrived, named and attributed, with no literal anywhere.
    let received = received.lock().unwrap();
    assert!(
        !received.bodies.is_empty(),
        "no OTLP export request arrived"
    );
    for body in &received.bodies {
        assert!(
            !body.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "an exported payload contains the literal {SECRET:?}"
        );
    }
    assert!(
        service_names(&received).iter().all(|n| n == "pg-router")
            && !service_names(&received).is_empty(),
        "service.name: {:?}",
        service_names(&received)
    );
    let spans = spans(&received);
    assert!(
        spans.iter().all(|s| s.name == "routed_query"),
        "only routed_query spans are exported: {spans:#?}"
    );
    for span in &spans {
        assert_eq!(span.kind, SpanKind::Server as i32, "{span:#?}");
        assert_eq!(
            span.attributes.get("db.system.name").map(String::as_str),
            Some("postgresql"),
            "{span:#?}"
        );
    }

    let create = span_containing(&spans, "CREATE TABLE customers");
    assert_eq!(create.attributes["pg_router.plan"], "broadcast");
    assert_eq!(create.attributes["pg_router.shards"], "2");

    // Auto-prepared statements (their literals are plain values) carry the shape the shard ran,
    // with the literals as bind parameters; the others have their literals replaced by `?`.
    let insert = span_with_text(
        &spans,
        "INSERT INTO customers (id, name, region) VALUES ($1, $2, $3)",
    );
    assert_eq!(insert.attributes["pg_router.plan"], "single_shard");
    assert_eq!(insert.attributes["pg_router.shards"], "1");

    let single = span_with_text(
        &spans,
        "SELECT name FROM customers WHERE id = $1 AND name = $2",
    );
    assert_eq!(single.attributes["pg_router.plan"], "single_shard");
    assert_eq!(single.attributes["pg_router.shards"], "1");
    assert_eq!(single.status, SpanStatus::Unset as i32);
    assert!(!single.attributes.contains_key("db.response.status_code"));

    let parameterized = span_containing(&spans, "WHERE id = $1");
    assert_eq!(parameterized.attributes["pg_router.plan"], "single_shard");

    // The scatter's text is the planner's rendering (names bound: `customers.region`).
    let scatter = span_containing(&spans, "region = ?");
    assert_eq!(scatter.attributes["pg_router.plan"], "scatter_gather");
    assert_eq!(scatter.attributes["pg_router.shards"], "2");

    let failed = span_with_text(
        &spans,
        "SELECT ? / ? FROM customers WHERE id = ? AND name = ?",
    );
    assert_eq!(failed.status, SpanStatus::Error as i32, "{failed:#?}");
    assert_eq!(failed.attributes["db.response.status_code"], "22012");
    assert_eq!(failed.attributes["error.type"], "22012");
}
