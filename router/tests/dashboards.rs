//! The router's Grafana dashboard (`deploy/grafana/dashboards/router.json`) reads only metrics a
//! real pg-router serves on `/metrics`, scraped after routed statements on two PostgreSQL 18
//! shards.

mod common;

use common::Cluster;
use testbed::dashboards;

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
    let exposition = cluster.metrics().await;
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
