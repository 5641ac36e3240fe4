//! TLS from the router to its shards (`backend.ssl_root_cert`, libpq's `verify-full`), against
//! real PostgreSQL 18 shards that take TCP clients over TLS only (`hostssl`), as the operator's
//! clusters do: the router's connections are encrypted and verified; a foreign CA, a certificate
//! for another name, or a router without TLS get an error the client sees, and the client's
//! connection stays usable.

mod common;

use common::Cluster;
use router::{Router, RouterConfig};
use testbed::pg_tls::TestCa;
use testbed::{Postgres, PostgresOptions};

/// A router config for `shards`: with TLS when `ca_file` is set, each shard expected to be
/// `names[i]`.
fn config(shards: &[Postgres], ca_file: Option<&std::path::Path>, names: &[&str]) -> RouterConfig {
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n{}\n[backend]\npool_size = 4\n",
        common::SCHEMA_TOML
    );
    if let Some(ca_file) = ca_file {
        toml.push_str(&format!("ssl_root_cert = \"{}\"\n", ca_file.display()));
    }
    for (i, shard) in shards.iter().enumerate() {
        toml.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\nport = {}\ntls_server_name = \"{}\"\n",
            shard.port(),
            names[i]
        ));
    }
    RouterConfig::from_toml(&toml).expect("router config")
}

/// The error a query through a router configured with `config` gets, and proof that the
/// client's connection still answers afterwards.
async fn refused(config: RouterConfig) -> String {
    let router = Router::start(config, None).await.expect("router");
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        router.address().port()
    );
    let client = common::connect(&url).await;
    let error = client
        .simple_query("SELECT count(*) FROM customers")
        .await
        .expect_err("a query through a router that cannot reach the shards safely");
    let again = client
        .simple_query("SELECT count(*) FROM customers")
        .await
        .expect_err("the same refusal");
    assert!(!client.is_closed(), "the client connection stays usable");
    assert_eq!(error.code(), again.code());
    let db = error.as_db_error().map(|e| e.message().to_string());
    db.unwrap_or_else(|| error.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_speaks_verified_tls_to_shards_that_take_tls_only() {
    let ca = TestCa::new("shards CA").unwrap();
    let names = ["shard-0.db.test", "shard-1.db.test"];
    let shards: Vec<Postgres> = tokio::task::block_in_place(|| {
        names
            .iter()
            .map(|name| {
                Postgres::start_with(PostgresOptions {
                    tls: Some(ca.issue(&[name]).unwrap()),
                    ..common::shard_options()
                })
                .expect("a TLS shard")
            })
            .collect()
    });
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let foreign_file = dir.path().join("foreign.crt");
    std::fs::write(&foreign_file, TestCa::new("another CA").unwrap().pem()).unwrap();

    // Verified TLS: rows go to both shards, over encrypted connections only.
    let config = config(&shards, Some(&ca_file), &names);
    let router = Router::start(config.clone(), None).await.expect("router");
    let cluster = Cluster {
        shards,
        router,
        config,
    };
    cluster.create_schema().await;
    let client = cluster.client().await;
    for id in 1..=40i64 {
        client
            .execute("INSERT INTO customers (id, name) VALUES ($1, 'c')", &[&id])
            .await
            .expect("an insert through the router over TLS");
    }
    let counts = cluster
        .count_on_each_shard("SELECT count(*) FROM customers")
        .await;
    assert_eq!(counts.iter().sum::<i64>(), 40);
    assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
    let connections = cluster
        .count_on_each_shard(
            "SELECT count(*) FILTER (WHERE NOT s.ssl) * 1000 + count(*) FILTER (WHERE s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.backend_type = 'client backend' AND a.client_addr IS NOT NULL",
        )
        .await;
    // Encoded as plain * 1000 + tls: no plain connection, some TLS ones, on each shard.
    assert!(
        connections.iter().all(|c| *c > 0 && *c < 1000),
        "{connections:?}"
    );

    // A CA the shards' certificates do not chain to.
    let foreign = refused(config_for(&cluster, Some(&foreign_file), &names)).await;
    assert!(foreign.contains("certificate"), "{foreign}");
    // The right CA, but the shards are expected under another name.
    let renamed = refused(config_for(
        &cluster,
        Some(&ca_file),
        &["elsewhere.test", "elsewhere.test"],
    ))
    .await;
    assert!(renamed.contains("certificate"), "{renamed}");
    // No TLS: the shards refuse the router (hostssl only), and the client hears why.
    let plain = refused(config_for(&cluster, None, &names)).await;
    assert!(
        plain.contains("pg_hba.conf") || plain.contains("encryption"),
        "{plain}"
    );
}

fn config_for(
    cluster: &Cluster,
    ca_file: Option<&std::path::Path>,
    names: &[&str],
) -> RouterConfig {
    config(&cluster.shards, ca_file, names)
}
