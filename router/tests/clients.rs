//! Real clients through the router: psql, pgbench (standard scripts), tokio-postgres, psycopg,
//! asyncpg and the PostgreSQL JDBC driver, each with a small workload including prepared
//! statements.

mod common;

use std::process::Command;

use common::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_tokio_postgres_psycopg_asyncpg_and_jdbc_work_through_the_router() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let port = cluster.router.address().port().to_string();

    // psql: simple protocol, a multi-statement string, a transaction, \bind (extended protocol).
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bind.sql");
    std::fs::write(
        &script,
        "SELECT name FROM customers WHERE id = $1 \\bind 3 \\g\n",
    )
    .unwrap();
    let out = common::run_ok(
        common::psql(&port)
            .args(["-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", "INSERT INTO customers (id, name, score) VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30)"])
            .args(["-c", "BEGIN; UPDATE customers SET score = score + 1 WHERE id = 1; UPDATE customers SET score = score + 1 WHERE id = 2; COMMIT;"])
            .args(["-c", "SELECT sum(score) FROM customers"])
            .arg("-f")
            .arg(&script),
        "psql",
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.contains(&"62"), "psql output: {out}");
    assert!(lines.contains(&"three"), "psql output: {out}");
    // psql reports unsupported SQL with its SQLSTATE and goes on.
    let output = common::psql(&port)
        .args(["-A", "-t", "-v", "VERBOSITY=verbose"])
        .args([
            "-c",
            "SELECT * FROM customers c WHERE c.score > (SELECT count(*) FROM customers x WHERE x.region <> c.region)",
            "-c",
            "SELECT 'still here'",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("0A000"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("still here"),
        "{}{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    // Notices from the shards reach the client.
    let output = common::psql(&port)
        .args(["-A", "-t"])
        .args(["-c", "DROP TABLE IF EXISTS no_such_table_here"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NOTICE") && stderr.contains("no_such_table_here"),
        "{stderr}"
    );

    // tokio-postgres: prepared statements, binary parameters and results, transactions.
    let client = cluster.client().await;
    let insert = client.prepare("INSERT INTO orders (id, customer_id, total, qty) VALUES ($1, $2, CAST($3::text AS numeric), $4)").await.unwrap();
    for i in 0..30i64 {
        client
            .execute(
                &insert,
                &[&i, &(i % 3 + 1), &format!("{i}.50"), &(i as i32)],
            )
            .await
            .unwrap();
    }
    let by_customer = client
        .prepare("SELECT count(*), sum(qty) FROM orders WHERE customer_id = $1")
        .await
        .unwrap();
    let row = client.query_one(&by_customer, &[&2i64]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 10);
    let row = client
        .query_one("SELECT count(*), sum(qty) FROM orders", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 30);
    assert_eq!(row.get::<_, i64>(1), (0..30).sum::<i64>());

    // psycopg 3 (server-side parameter binding, prepared statements) and asyncpg.
    let pythonpath = testbed::clients::python_clients().expect("installing psycopg and asyncpg");
    let script = format!(
        r#"
import asyncio, psycopg, asyncpg
with psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres") as conn:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO customers (id, name, score) VALUES (%s, %s, %s)", [(100 + i, f"py {{i}}", i) for i in range(20)])
        for i in range(10):
            cur.execute("SELECT name FROM customers WHERE id = %s", (100 + i,), prepare=True)
            assert cur.fetchone()[0] == f"py {{i}}"
        cur.execute("SELECT count(*), sum(score) FROM customers WHERE id >= 100 AND id < 120")
        assert cur.fetchone() == (20, 190), "psycopg aggregate"
    with conn.transaction():
        conn.execute("UPDATE customers SET score = 0 WHERE id = 100")
        conn.execute("UPDATE customers SET score = 0 WHERE id = 101")
    try:
        conn.execute("SELECT * FROM customers c WHERE c.score > (SELECT count(*) FROM customers x WHERE x.region <> c.region)")
        raise SystemExit("unsupported SQL succeeded")
    except psycopg.errors.FeatureNotSupported:
        pass
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    # Settings the client library tracks reach it as ParameterStatus, as from PostgreSQL.
    conn.rollback()
    conn.autocommit = True
    conn.execute("SET TimeZone = 'Asia/Tokyo'")
    assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo", conn.info.parameter_status("TimeZone")
    assert str(conn.info.timezone) == "Asia/Tokyo", conn.info.timezone
    conn.execute("SET application_name = 'router clients'")
    assert conn.info.parameter_status("application_name") == "router clients"
    conn.execute("RESET ALL")
    assert conn.info.parameter_status("TimeZone") != "Asia/Tokyo", "RESET ALL is reported too"
    assert conn.info.parameter_status("application_name") == "", conn.info.parameter_status("application_name")
print("psycopg ok")

async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port={port}, user="postgres", database="postgres")
    await conn.executemany("INSERT INTO customers (id, name, score) VALUES ($1, $2, $3)", [(200 + i, f"apg {{i}}", i) for i in range(20)])
    stmt = await conn.prepare("SELECT name, score FROM customers WHERE id = $1")
    for i in range(20):
        row = await stmt.fetchrow(200 + i)
        assert row["name"] == f"apg {{i}}" and row["score"] == i
    rows = await conn.fetch("SELECT id FROM customers WHERE id >= 200 ORDER BY id DESC LIMIT 3")
    assert [r["id"] for r in rows] == [219, 218, 217], rows
    async with conn.transaction():
        await conn.execute("UPDATE customers SET score = -1 WHERE id = 200")
        await conn.execute("UPDATE customers SET score = -1 WHERE id = 201")
    assert await conn.fetchval("SELECT count(*) FROM customers WHERE score = -1") == 2
    try:
        await conn.fetch("SELECT * FROM customers c WHERE c.score > (SELECT count(*) FROM customers x WHERE x.region <> c.region)")
        raise SystemExit("unsupported SQL succeeded")
    except asyncpg.exceptions.FeatureNotSupportedError:
        pass
    assert await conn.fetchval("SELECT 1") == 1
    # Bulk load with binary COPY, each row to its key's shard.
    result = await conn.copy_records_to_table(
        "customers", records=[(300 + i, f"bulk {{i}}", i) for i in range(50)], columns=["id", "name", "score"])
    assert result == "COPY 50", result
    assert await conn.fetchval("SELECT count(*) FROM customers WHERE id >= 300 AND id < 350") == 50
    assert await conn.fetchval("SELECT name FROM customers WHERE id = 342") == "bulk 42"
    await conn.close()
    print("asyncpg ok")
asyncio.run(main())
"#
    );
    let out = common::run_ok(
        Command::new("python3")
            .env("PYTHONPATH", &pythonpath)
            .arg("-c")
            .arg(&script),
        "python clients",
    );
    assert!(
        out.contains("psycopg ok") && out.contains("asyncpg ok"),
        "{out}"
    );

    // JDBC (source-file mode of the JDK's java launcher).
    let jar = testbed::clients::jdbc_jar().expect("fetching the PostgreSQL JDBC driver");
    let source =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/JdbcWorkload.java");
    let url = format!("jdbc:postgresql://127.0.0.1:{port}/postgres?sslmode=disable");
    let out = common::run_ok(
        Command::new("java")
            .arg("-cp")
            .arg(&jar)
            .arg(&source)
            .arg(&url),
        "JDBC workload",
    );
    assert!(out.contains("jdbc ok"), "{out}");
}

const PGBENCH_TOML: &str = r#"
[[table_groups]]
name = "accounts"
[[table_groups]]
name = "tellers"
[[table_groups]]
name = "branches"
[[sharded_tables]]
name = "pgbench_accounts"
table_group = "accounts"
shard_key = "aid"
[[sharded_tables]]
name = "pgbench_history"
table_group = "accounts"
shard_key = "aid"
[[sharded_tables]]
name = "pgbench_tellers"
table_group = "tellers"
shard_key = "tid"
[[sharded_tables]]
name = "pgbench_branches"
table_group = "branches"
shard_key = "bid"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_standard_scripts_run_through_the_router() {
    let cluster = Cluster::start_with(2, common::shard_options(), PGBENCH_TOML).await;
    let client = cluster.client().await;
    let port = cluster.router.address().port().to_string();
    let bin = testbed::paths::pg_bin();
    // pgbench's own initialization through the router: DROP/CREATE (broadcast), COPY FREEZE
    // of every table inside BEGIN ... COMMIT (rows routed by key, 2PC), VACUUM, primary keys.
    common::run_ok(
        Command::new(bin.join("pgbench"))
            .args([
                "-i",
                "-q",
                "-s",
                "1",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
            ])
            .arg("postgres"),
        "pgbench -i through the router",
    );
    let accounts: i64 = client
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(accounts, 100_000);
    for shard in &cluster.shards {
        let n: i64 = shard
            .client()
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM pgbench_accounts", &[])
            .await
            .unwrap()
            .get(0);
        assert!(n > 0 && n < 100_000, "a shard holds {n} accounts");
    }

    for (mode, script) in [
        ("simple", "-S"),
        ("prepared", "-S"),
        ("extended", "-b"),
        ("prepared", "-b"),
    ] {
        let mut command = Command::new(bin.join("pgbench"));
        command
            .args([
                "-n",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-c",
                "4",
                "-j",
                "2",
                "-t",
                "40",
                "-M",
                mode,
            ])
            .arg(script);
        if script == "-b" {
            command.arg("tpcb-like");
        }
        let out = common::run_ok(&mut command, &format!("pgbench {mode} {script}"));
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    // Every tpcb transaction wrote one history row: 2 runs x 4 clients x 40 transactions.
    let history: i64 = client
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 320);
    // Money is conserved across shards: the deltas added to accounts equal those added to tellers.
    let row = client
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint",
            &[],
        )
        .await;
    // (A scalar subquery over a sharded table is not supported: a clear error, not a wrong answer.)
    assert!(row.is_err());
    let tellers: i64 = client
        .query_one("SELECT sum(tbalance) FROM pgbench_tellers", &[])
        .await
        .unwrap()
        .get(0);
    let history_delta: i64 = client
        .query_one("SELECT sum(delta) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tellers, history_delta);
    // Every transaction's delta landed on an account too.
    assert_eq!(accounts_sum(&client).await, history_delta);
    let prepared: i64 = {
        let mut total = 0;
        for shard in &cluster.shards {
            let n: i64 = shard
                .client()
                .await
                .unwrap()
                .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
                .await
                .unwrap()
                .get(0);
            total += n;
        }
        total
    };
    assert_eq!(prepared, 0, "no orphan prepared transactions");
}

async fn accounts_sum(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT sum(abalance) FROM pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0)
}
