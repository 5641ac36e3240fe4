//! Session settings through the router read as they would on PostgreSQL itself: a client that
//! names no application has an empty `application_name` (not the router's), and `RESET name`
//! goes back to the value the client started with.

mod common;

use common::Cluster;
use tokio_postgres::{NoTls, SimpleQueryMessage};

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    let messages = client
        .simple_query(&format!("SHOW {name}"))
        .await
        .unwrap_or_else(|e| panic!("SHOW {name}: {e:?}"));
    messages
        .into_iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

/// A client through the router with `application_name` and `options` as startup parameters.
async fn connect_with(
    cluster: &Cluster,
    application_name: Option<&str>,
    options: Option<&str>,
) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = cluster.router_url().parse().expect("url");
    if let Some(name) = application_name {
        config.application_name(name);
    }
    if let Some(options) = options {
        config.options(options);
    }
    let (client, connection) = config.connect(NoTls).await.expect("connecting");
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_without_an_application_name_sees_an_empty_one_as_on_postgresql() {
    let cluster = Cluster::start(1).await;
    let named = connect_with(&cluster, Some("orders-api"), None).await;
    let unnamed = connect_with(&cluster, None, None).await;
    // Interleaved on the same pooled backends: neither sees the other's, nor the router's.
    for _ in 0..3 {
        assert_eq!(show(&unnamed, "application_name").await, "");
        assert_eq!(show(&named, "application_name").await, "orders-api");
    }
    let direct = cluster.shards[0].client().await.unwrap();
    let direct_value = show(&direct, "application_name").await;
    assert_eq!(
        show(&unnamed, "application_name").await,
        "",
        "PostgreSQL itself shows {direct_value:?} to a client that named none"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_goes_back_to_the_value_the_client_started_with() {
    let cluster = Cluster::start(1).await;
    let client = connect_with(
        &cluster,
        Some("orders-api"),
        Some("-c statement_timeout=4321"),
    )
    .await;
    assert_eq!(show(&client, "statement_timeout").await, "4321ms");
    client
        .batch_execute("SET application_name = 'batch'; SET statement_timeout = 5000")
        .await
        .unwrap();
    assert_eq!(show(&client, "application_name").await, "batch");
    assert_eq!(show(&client, "statement_timeout").await, "5s");

    client
        .batch_execute("RESET application_name")
        .await
        .unwrap();
    client
        .batch_execute("RESET \"statement_timeout\"")
        .await
        .unwrap();
    assert_eq!(show(&client, "application_name").await, "orders-api");
    assert_eq!(show(&client, "statement_timeout").await, "4321ms");

    // A setting the client did not start with goes back to the server's default.
    client.batch_execute("SET work_mem = '7MB'").await.unwrap();
    client.batch_execute("RESET work_mem").await.unwrap();
    let direct = cluster.shards[0].client().await.unwrap();
    assert_eq!(
        show(&client, "work_mem").await,
        show(&direct, "work_mem").await
    );
    // And the startup values hold across pooled backends.
    let other = connect_with(&cluster, None, None).await;
    other
        .batch_execute("SET statement_timeout = 100")
        .await
        .unwrap();
    assert_eq!(show(&client, "statement_timeout").await, "4321ms");
    assert_eq!(show(&client, "application_name").await, "orders-api");
}
