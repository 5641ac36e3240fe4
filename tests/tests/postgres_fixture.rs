//! The PostgreSQL fixture runs a real PostgreSQL 18 server, never as root, and cleans up.

use testbed::{Postgres, PostgresOptions};

#[tokio::test]
async fn fixture_runs_postgresql_18_as_an_unprivileged_user() {
    let postgres = Postgres::start().expect("PostgreSQL starts");
    let client = postgres.client().await.expect("client connects");

    let version: String = client
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    let version: i32 = version.parse().unwrap();
    assert!(
        version >= 180000,
        "server_version_num {version} is PostgreSQL 18+"
    );

    let checksums: String = client
        .query_one("SHOW data_checksums", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checksums, "on", "initdb enables data checksums");

    // The postmaster must not run as root: PostgreSQL refuses to, and so do we.
    let status = std::fs::read_to_string(format!("/proc/{}/status", postgres.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let real_uid: u32 = uid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(
        real_uid, 0,
        "postgres runs as an unprivileged user ({uid_line})"
    );

    client
        .batch_execute("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    assert_eq!(postgres.psql("SELECT count(*) FROM t").unwrap(), "2");
}

#[tokio::test]
async fn fixture_deletes_its_data_directory_and_stops_the_server_on_drop() {
    let postgres = Postgres::start_with(PostgresOptions::default().setting("max_connections", 42))
        .expect("PostgreSQL starts");
    let client = postgres.client().await.unwrap();
    let max: String = client
        .query_one("SHOW max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "42", "extra settings reach the server");
    let data_dir = postgres.data_dir();
    let pid = postgres.pid();
    drop(client);
    drop(postgres);
    assert!(!data_dir.exists(), "data directory removed");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| s.contains("State:\tZ"))
                .unwrap_or(true),
        "postmaster {pid} stopped"
    );
}

#[tokio::test]
async fn two_servers_run_side_by_side_without_sharing_state() {
    let first = Postgres::start().unwrap();
    let second = Postgres::start().unwrap();
    assert_ne!(first.port(), second.port());
    first.psql("CREATE TABLE only_here (x int)").unwrap();
    assert_eq!(
        second
            .psql("SELECT count(*) FROM pg_class WHERE relname = 'only_here'")
            .unwrap(),
        "0"
    );
}
