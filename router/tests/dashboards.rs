//! The router's Grafana dashboard (`deploy/grafana/dashboards/router.json`) reads only metrics a
//! real pg-router serves on `/metrics`, scraped after routed statements on two PostgreSQL 18
//! shards.

mod common;

use common::Cluster;
use testbed::dashboards;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(cluster: &Cluster) -> String {
    let address = cluster.router.metrics_address().expect("metrics enabled");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_dashboard_queries_only_metrics_pg_router_exports() {
    // Arrange: a router in front of two shards, with single-shard, scatter and failing statements.
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    client
        .batch_execute("INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b')")
        .await
        .unwrap();
    client
        .query("SELECT name FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    client
        .query("SELECT count(*) FROM customers", &[])
        .await
        .unwrap();
    assert!(
        client
            .batch_execute("SELECT * FROM no_such_table")
            .await
            .is_err()
    );

    // Act
    let exposition = scrape(&cluster).await;
    let exported = dashboards::exported_names(&exposition);

    // Assert
    assert!(exported.contains("pg_router_queries_total"), "{exposition}");
    let dashboard = dashboards::load("router");
    assert!(dashboards::queries(&dashboard).len() >= 6);
    let missing = dashboards::unexported(&dashboard, &exported);
    assert!(
        missing.is_empty(),
        "the router dashboard queries metrics pg-router does not export: {missing:?}\n{exposition}"
    );
}
