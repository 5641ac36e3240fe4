//! Placement: the hash vindex is PostgreSQL's partition hash, rows land on the shard the vindex
//! names, reads by shard key hit one shard, and a reload changes routing without a restart.

mod common;

use common::{Cluster, SCHEMA_TOML, config_toml, shard_options};
use router::RouterConfig;
use router::vindex::{KeyValue, key_hash};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_vindex_agrees_with_satisfies_hash_partition() {
    let pg = testbed::Postgres::start().expect("postgres");
    let client = pg.client().await.expect("client");
    client
        .batch_execute(
            "CREATE TABLE pi (k bigint) PARTITION BY HASH (k);
             CREATE TABLE pi4 (k int) PARTITION BY HASH (k);
             CREATE TABLE pt (k text) PARTITION BY HASH (k);",
        )
        .await
        .unwrap();
    let mut keys: Vec<i64> = (-50..200).collect();
    keys.extend([
        i64::MIN,
        i64::MAX,
        1 << 40,
        -(1 << 40),
        4_294_967_296,
        123_456_789_012,
    ]);
    for modulus in [2u64, 7, 16] {
        for key in &keys {
            let remainder = key_hash(&KeyValue::Int(*key)) % modulus;
            let row = client
                .query_one(
                    "SELECT satisfies_hash_partition('pi'::regclass, $1::int, $2::int, $3::bigint)",
                    &[&(modulus as i32), &(remainder as i32), key],
                )
                .await
                .unwrap();
            assert!(row.get::<_, bool>(0), "bigint key {key} modulus {modulus}");
            if let Ok(small) = i32::try_from(*key) {
                let row = client
                    .query_one(
                        "SELECT satisfies_hash_partition('pi4'::regclass, $1::int, $2::int, $3::int)",
                        &[&(modulus as i32), &(remainder as i32), &small],
                    )
                    .await
                    .unwrap();
                assert!(row.get::<_, bool>(0), "int key {key} modulus {modulus}");
            }
        }
        for text in [
            "",
            "a",
            "abc",
            "hello world",
            "x".repeat(11).as_str(),
            "y".repeat(12).as_str(),
            "z".repeat(25).as_str(),
            "héllo ünïcode",
        ] {
            let remainder = key_hash(&KeyValue::Text(text.to_string())) % modulus;
            let row = client
                .query_one(
                    "SELECT satisfies_hash_partition('pt'::regclass, $1::int, $2::int, $3::text)",
                    &[&(modulus as i32), &(remainder as i32), &text],
                )
                .await
                .unwrap();
            assert!(row.get::<_, bool>(0), "text key {text:?} modulus {modulus}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_where_the_vindex_says_and_keyed_reads_hit_one_shard() {
    let options = shard_options().setting("log_statement", "all");
    let cluster = Cluster::start_with(3, options, SCHEMA_TOML).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    let values: Vec<String> = (1..=120)
        .map(|i| format!("({i}, 'c{i}', 'r{}', {i})", i % 4))
        .collect();
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO customers (id, name, region, score) VALUES {}",
                values.join(", ")
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 120);
    for i in 0..40 {
        client
            .execute(
                "INSERT INTO accounts (owner, balance) VALUES ($1, $2)",
                &[&format!("owner-{i}"), &(i as i64)],
            )
            .await
            .unwrap();
    }
    let topology = cluster.router.state().runtime().topology.clone();
    let mut total = 0;
    for (index, shard) in cluster.shards.iter().enumerate() {
        let direct = shard.client().await.unwrap();
        for row in direct.query("SELECT id FROM customers", &[]).await.unwrap() {
            let id: i64 = row.get(0);
            let expected = topology.groups[0]
                .vindex
                .shard_for(&KeyValue::Int(id))
                .unwrap();
            assert_eq!(
                expected, index,
                "customer {id} is on shard {index}, the vindex says {expected}"
            );
            total += 1;
        }
        for row in direct
            .query("SELECT owner FROM accounts", &[])
            .await
            .unwrap()
        {
            let owner: String = row.get(0);
            let expected = topology.groups[1]
                .vindex
                .shard_for(&KeyValue::Text(owner.clone()))
                .unwrap();
            assert_eq!(expected, index, "account {owner} misplaced");
        }
    }
    assert_eq!(total, 120, "every row is on exactly one shard");
    // Each shard got some rows (the hash spreads them).
    for count in cluster
        .count_on_each_shard("SELECT count(*) FROM customers")
        .await
    {
        assert!(count > 10, "a shard has only {count} rows");
    }

    // Reads by shard key (literal and parameter) run on exactly one shard: count the marker in
    // each shard's statement log.
    let rows = client
        .simple_query("SELECT /* marker_literal */ name FROM customers WHERE id = 77")
        .await
        .unwrap();
    assert!(
        rows.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    );
    let statement = client
        .prepare("SELECT /* marker_param */ name FROM customers WHERE id = $1")
        .await
        .unwrap();
    let row = client.query_one(&statement, &[&78i64]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "c78");
    client
        .simple_query("SELECT count(*) FROM customers WHERE name <> 'marker_scatter'")
        .await
        .unwrap();
    let count_in_logs = |marker: &str| -> Vec<usize> {
        cluster
            .shards
            .iter()
            .map(|s| {
                std::fs::read_to_string(s.log_path())
                    .unwrap_or_default()
                    .matches(marker)
                    .count()
            })
            .collect()
    };
    let literal = count_in_logs("marker_literal");
    assert_eq!(
        literal.iter().filter(|c| **c > 0).count(),
        1,
        "literal key read hit {literal:?}"
    );
    let owner = topology.groups[0]
        .vindex
        .shard_for(&KeyValue::Int(77))
        .unwrap();
    assert!(literal[owner] > 0);
    let param = count_in_logs("marker_param");
    let executed_on: Vec<usize> = (0..3).filter(|i| param[*i] > 0).collect();
    // Describe goes to shard 0; execution only to the key's shard.
    let owner78 = topology.groups[0]
        .vindex
        .shard_for(&KeyValue::Int(78))
        .unwrap();
    assert!(
        executed_on.contains(&owner78),
        "param read not on its shard: {param:?}"
    );
    assert!(
        executed_on.iter().all(|s| *s == owner78 || *s == 0),
        "param read hit {param:?}"
    );
    let scatter = count_in_logs("marker_scatter");
    assert!(scatter.iter().all(|c| *c > 0), "scatter hit {scatter:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_routing_without_restart() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    client
        .execute(
            "INSERT INTO countries (code, name) VALUES ('fr', 'France')",
            &[],
        )
        .await
        .unwrap();
    // Before: `countries` is a reference table, so it is on both shards.
    assert_eq!(
        cluster
            .count_on_each_shard("SELECT count(*) FROM countries")
            .await,
        vec![1; cluster.shards.len()]
    );
    // Reload with a range vindex for customers: ids < 1000 on s1, the rest on s0.
    let extra = r#"
[[table_groups]]
name = "customers"
vindex = "range"
ranges = [[-9223372036854775808, "s1"], [1000, "s0"]]
[[sharded_tables]]
name = "customers"
table_group = "customers"
shard_key = "id"
"#;
    let config = RouterConfig::from_toml(&config_toml(&cluster.shards, extra)).unwrap();
    cluster.router.reload(&config).unwrap();
    client
        .execute(
            "INSERT INTO customers (id, name) VALUES (5, 'low'), (5000, 'high')",
            &[],
        )
        .await
        .unwrap();
    let on = |i: usize, id: i64| {
        let shard = &cluster.shards[i];
        async move {
            shard
                .client()
                .await
                .unwrap()
                .query("SELECT 1 FROM customers WHERE id = $1", &[&id])
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(on(1, 5).await, 1);
    assert_eq!(on(0, 5000).await, 1);
    assert_eq!(on(0, 5).await, 0);
    // After the reload `countries` is no longer a reference table: writes go to one shard.
    client
        .execute(
            "INSERT INTO countries (code, name) VALUES ('de', 'Germany')",
            &[],
        )
        .await
        .unwrap();
    let mut copies = 0;
    for shard in &cluster.shards {
        copies += shard
            .client()
            .await
            .unwrap()
            .query("SELECT 1 FROM countries WHERE code = 'de'", &[])
            .await
            .unwrap()
            .len();
    }
    assert_eq!(copies, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_vindex_routes_by_a_secondary_column() {
    let extra = r#"
[[table_groups]]
name = "users"
[[sharded_tables]]
name = "users"
table_group = "users"
shard_key = "id"
lookups = { email = "users_email_lookup" }
"#;
    let options = shard_options().setting("log_statement", "all");
    let cluster = Cluster::start_with(3, options, extra).await;
    let client = cluster.client().await;
    client
        .batch_execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, name text);
             CREATE TABLE users_email_lookup (value text PRIMARY KEY, key bigint NOT NULL);",
        )
        .await
        .unwrap();
    let values: Vec<String> = (1..=30)
        .map(|i| format!("({i}, 'user{i}@example.com', 'user {i}')"))
        .collect();
    client
        .execute(
            &format!(
                "INSERT INTO users (id, email, name) VALUES {}",
                values.join(", ")
            ),
            &[],
        )
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO users (id, email, name) VALUES ($1, $2, $3)")
        .await
        .unwrap();
    client
        .execute(&insert, &[&31i64, &"user31@example.com", &"user 31"])
        .await
        .unwrap();
    // The lookup table (on shard 0) maps every email to its key.
    let mapped: i64 = cluster.shards[0]
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM users_email_lookup", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mapped, 31);
    let topology = cluster.router.state().runtime().topology.clone();
    for id in [7i64, 19, 31] {
        let email = format!("user{id}@example.com");
        let marker = format!("marker_lookup_{id}");
        let sql = format!("SELECT /* {marker} */ id, name FROM users WHERE email = $1");
        let rows = client.query(&sql, &[&email]).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i64>(0), id);
        let owner = topology.groups[0]
            .vindex
            .shard_for(&KeyValue::Int(id))
            .unwrap();
        for (index, shard) in cluster.shards.iter().enumerate() {
            let log = std::fs::read_to_string(shard.log_path()).unwrap();
            let executed = log
                .lines()
                .any(|l| l.contains("execute") && l.contains(&marker));
            assert_eq!(
                executed,
                index == owner,
                "lookup read of {id} on shard {index} (owner {owner})"
            );
        }
    }
    // Literal lookups and writes by lookup column.
    let updated = client
        .execute(
            "UPDATE users SET name = 'renamed' WHERE email = 'user3@example.com'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1);
    let rows = text_rows_simple(
        &client,
        "SELECT name FROM users WHERE email = 'user3@example.com'",
    )
    .await;
    assert_eq!(rows, vec!["renamed".to_string()]);
}

async fn text_rows_simple(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_vindex_places_rows_on_its_ring() {
    let extra = r#"
[[table_groups]]
name = "events"
vindex = "consistent_hash"
points_per_shard = 32
[[sharded_tables]]
name = "events"
table_group = "events"
shard_key = "device"
"#;
    let cluster = Cluster::start_with(3, shard_options(), extra).await;
    let client = cluster.client().await;
    client
        .batch_execute("CREATE TABLE events (device bigint, seq int, PRIMARY KEY (device, seq))")
        .await
        .unwrap();
    let values: Vec<String> = (1..=90).map(|i| format!("({}, {i})", i % 30)).collect();
    client
        .execute(
            &format!(
                "INSERT INTO events (device, seq) VALUES {}",
                values.join(", ")
            ),
            &[],
        )
        .await
        .unwrap();
    let topology = cluster.router.state().runtime().topology.clone();
    let mut total = 0;
    for (index, shard) in cluster.shards.iter().enumerate() {
        for row in shard
            .client()
            .await
            .unwrap()
            .query("SELECT device FROM events", &[])
            .await
            .unwrap()
        {
            let device: i64 = row.get(0);
            assert_eq!(
                topology.groups[0]
                    .vindex
                    .shard_for(&KeyValue::Int(device))
                    .unwrap(),
                index
            );
            total += 1;
        }
    }
    assert_eq!(total, 90);
    let count: i64 = client
        .query_one("SELECT count(*) FROM events WHERE device = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_routes_rows_by_shard_key() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let port = cluster.router.address().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("copy.sql");
    let mut text = String::from("COPY customers (id, name, region, score) FROM STDIN;\n");
    for i in 1..=200 {
        text.push_str(&format!("{i}\tname\\t{i}\tr{}\t\\N\n", i % 3));
    }
    text.push_str("\\.\nCOPY countries (code, name) FROM STDIN;\nfr\tFrance\nde\tGermany\n\\.\n");
    std::fs::write(&script, text).unwrap();
    let stdout = common::run_ok(
        common::psql(&port)
            .args(["-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&script),
        "psql COPY script",
    );
    assert!(stdout.contains("COPY 200"), "{stdout}");
    assert!(stdout.contains("COPY 2"), "{stdout}");
    let placed = assert_customers_placed(&cluster).await;
    assert_eq!(placed.len(), 200);
    for (id, name) in &placed {
        assert_eq!(*name, format!("name\t{id}"));
    }
    assert_eq!(
        cluster
            .count_on_each_shard("SELECT count(*) FROM countries")
            .await,
        vec![2; cluster.shards.len()],
        "reference rows on every shard"
    );

    // tokio-postgres (extended protocol); a bad key aborts the whole COPY on every shard.
    let client = cluster.client().await;
    let sink = client
        .copy_in("COPY customers (id, name) FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    use futures::SinkExt;
    sink.send(bytes::Bytes::from_static(
        b"1001\ta\n1002\tb\nnot-a-number\tc\n",
    ))
    .await
    .unwrap();
    let error = sink.finish().await.unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("22P02"), "{error:?}");
    let none: i64 = client
        .query_one("SELECT count(*) FROM customers WHERE id > 1000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(none, 0);
    let sink = client
        .copy_in("COPY customers (id, name) FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1001\ta\n1002\tb\n1003\tc\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 3);
    let three: i64 = client
        .query_one("SELECT count(*) FROM customers WHERE id > 1000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(three, 3);
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// Every customer row of the shards (id, name), each checked to be on its vindex's shard.
async fn assert_customers_placed(cluster: &Cluster) -> Vec<(i64, String)> {
    let topology = cluster.router.state().runtime().topology.clone();
    let mut all = Vec::new();
    for (index, shard) in cluster.shards.iter().enumerate() {
        let direct = shard.client().await.unwrap();
        for row in direct
            .query("SELECT id, name FROM customers ORDER BY id", &[])
            .await
            .unwrap()
        {
            let id: i64 = row.get(0);
            assert_eq!(
                topology.groups[0]
                    .vindex
                    .shard_for(&KeyValue::Int(id))
                    .unwrap(),
                index,
                "customer {id} on the wrong shard"
            );
            all.push((id, row.get(1)));
        }
    }
    all.sort();
    all
}

/// A binary COPY of customers (id bigint, name text) through `client`.
async fn binary_copy_of_customers(
    client: &tokio_postgres::Client,
) -> tokio_postgres::binary_copy::BinaryCopyInWriter {
    let sink = client
        .copy_in("COPY customers (id, name) FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[
            tokio_postgres::types::Type::INT8,
            tokio_postgres::types::Type::TEXT,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_in_csv_and_binary_routes_rows_by_shard_key() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let port = cluster.router.address().port().to_string();

    // CSV with a header, quoted delimiters, quotes and newlines, through psql's \copy.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("customers.csv");
    let mut csv = String::from("id,name,region\n");
    for i in 1..=60 {
        csv.push_str(&format!(
            "{i},\"name, \"\"{i}\"\"\nsecond line\",r{}\n",
            i % 3
        ));
    }
    std::fs::write(&file, csv).unwrap();
    let stdout = common::run_ok(
        common::psql(&port)
            .args(["-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!(
                "\\copy customers (id, name, region) FROM '{}' WITH (FORMAT csv, HEADER)",
                file.display()
            )),
        "psql \\copy csv",
    );
    assert!(stdout.contains("COPY 60"), "{stdout}");
    let placed = assert_customers_placed(&cluster).await;
    assert_eq!(placed.len(), 60);
    assert_eq!(placed[6], (7, "name, \"7\"\nsecond line".to_string()));

    // Binary, as drivers bulk-load (tokio-postgres' binary copy writer).
    let client = cluster.client().await;
    let writer = binary_copy_of_customers(&client).await;
    futures::pin_mut!(writer);
    for i in 1001..=1100i64 {
        let name = format!("binary {i}");
        writer.as_mut().write(&[&i, &name]).await.unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), 100);
    let placed = assert_customers_placed(&cluster).await;
    assert_eq!(placed.len(), 160);
    assert!(placed.contains(&(1042, "binary 1042".to_string())));

    // A NULL key in binary rows, and a bad key in CSV, abort the whole COPY everywhere.
    let writer = binary_copy_of_customers(&client).await;
    futures::pin_mut!(writer);
    writer.as_mut().write(&[&2001i64, &"fine"]).await.unwrap();
    writer
        .as_mut()
        .write(&[&None::<i64>, &"no key"])
        .await
        .unwrap();
    let error = writer.finish().await.unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("22004"), "{error:?}");
    let sink = client
        .copy_in("COPY customers (id, name) FROM STDIN WITH (FORMAT csv)")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    use futures::SinkExt;
    sink.send(bytes::Bytes::from_static(b"3001,a\n\"x\",b\n"))
        .await
        .unwrap();
    let error = sink.finish().await.unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("22P02"), "{error:?}");
    let message = error.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("invalid shard key \"x\""), "{message}");
    assert_eq!(assert_customers_placed(&cluster).await.len(), 160);
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// Everything a `COPY ... TO STDOUT` sends, as text.
async fn copy_out(client: &tokio_postgres::Client, sql: &str) -> String {
    use futures::TryStreamExt;
    let chunks: Vec<bytes::Bytes> = client
        .copy_out(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .try_collect()
        .await
        .unwrap();
    String::from_utf8(chunks.concat()).unwrap()
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_stdout_reads_every_shard_once() {
    let cluster = Cluster::start(3).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    for id in 1..=60i64 {
        client
            .execute(
                "INSERT INTO customers (id, name, region, score) VALUES ($1, $2, 'eu', $3)",
                &[&id, &format!("c,{id}"), &((id % 7) as i32)],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "INSERT INTO countries (code, name) VALUES ('fr', 'France'), ('jp', 'Japan')",
        )
        .await
        .unwrap();

    // A sharded table: the union of the shards, each row once.
    let mut direct = String::new();
    for shard in &cluster.shards {
        let shard_client = shard.client().await.unwrap();
        direct.push_str(&copy_out(&shard_client, "COPY customers TO STDOUT").await);
    }
    assert_eq!(direct.lines().count(), 60, "rows spread over the shards");
    let routed = copy_out(&client, "COPY customers TO STDOUT").await;
    assert_eq!(sorted_lines(&routed), sorted_lines(&direct));

    // CSV with a header: one header line, first.
    let csv = copy_out(
        &client,
        "COPY customers (id, name) TO STDOUT WITH (FORMAT csv, HEADER)",
    )
    .await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "id,name");
    assert_eq!(lines.len(), 61);
    assert!(lines.contains(&"7,\"c,7\""), "CSV quoting kept: {csv}");

    // A reference table is read from one shard only; a keyed query from its shard.
    let countries = copy_out(&client, "COPY countries TO STDOUT").await;
    assert_eq!(sorted_lines(&countries), vec!["fr\tFrance", "jp\tJapan"]);
    let one = copy_out(
        &client,
        "COPY (SELECT id, name FROM customers WHERE id = 42) TO STDOUT",
    )
    .await;
    assert_eq!(one, "42\tc,42\n");

    // A query that needs a merge is run by the router and written out in order.
    let ordered = copy_out(
        &client,
        "COPY (SELECT id FROM customers ORDER BY id DESC LIMIT 3) TO STDOUT",
    )
    .await;
    assert_eq!(ordered, "60\n59\n58\n");

    // Binary across shards is refused with a clear error; the session goes on.
    let error = client
        .copy_out("COPY customers TO STDOUT (FORMAT binary)")
        .await
        .err()
        .expect("binary COPY across shards is refused");
    assert_eq!(error.code().unwrap().code(), "0A000", "{error:?}");
    let count: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_raised_while_rows_stream_reach_the_client() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION noisy(i int) RETURNS int LANGUAGE plpgsql AS \
             $$ BEGIN RAISE NOTICE 'row %', i; RETURN i; END $$;
             INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd'), (5, 'e')",
        )
        .await
        .unwrap();
    let port = cluster.router.address().port().to_string();
    for (sql, count) in [
        // One shard.
        ("SELECT noisy(g) FROM generate_series(1, 4) g", 4),
        // Every shard, merged in order.
        ("SELECT noisy(id::int) FROM customers ORDER BY id", 5),
    ] {
        let output = common::psql(&port)
            .args(["-A", "-t", "-c", sql])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{sql}: {stderr}");
        for i in 1..=count {
            assert!(
                stderr.contains(&format!("NOTICE:  row {i}\n")),
                "{sql}: notice {i} missing from {stderr:?}"
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(stdout.lines().count(), count, "{stdout}");
    }
}

/// Sequences of sharded tables (bigserial, bigint identity) get a range per shard: ids drawn
/// on different shards never collide. Integer sequences get a NOTICE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_of_sharded_tables_get_a_range_per_shard() {
    let cluster = Cluster::start(2).await;
    let client = cluster.client().await;
    client
        .batch_execute(
            "CREATE TABLE orders (id bigserial, customer_id bigint NOT NULL, total numeric,
                 qty int, note text, PRIMARY KEY (customer_id, id));
             CREATE TABLE accounts (owner text PRIMARY KEY,
                 number bigint GENERATED ALWAYS AS IDENTITY, balance bigint NOT NULL)",
        )
        .await
        .unwrap();
    for customer in 1..=20i64 {
        client
            .execute(
                "INSERT INTO orders (customer_id, total) VALUES ($1, 1)",
                &[&customer],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO accounts (owner, balance) VALUES ($1, 0)",
                &[&format!("owner {customer}")],
            )
            .await
            .unwrap();
    }
    for (table, column) in [("orders", "id"), ("accounts", "number")] {
        let distinct: i64 = client
            .query_one(
                &format!("SELECT count(DISTINCT {column}) FROM {table}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            distinct, 20,
            "{table}.{column} values collide across shards"
        );
        // Each shard draws from its own range.
        for (index, shard) in cluster.shards.iter().enumerate() {
            let (low, high): (Option<i64>, Option<i64>) = shard
                .client()
                .await
                .unwrap()
                .query_one(
                    &format!("SELECT min({column}), max({column}) FROM {table}"),
                    &[],
                )
                .await
                .map(|r| (r.get(0), r.get(1)))
                .unwrap();
            let base = (index as i64) << 48;
            assert!(
                low.is_some_and(|l| l > base) && high.is_some_and(|h| h < base + (1 << 48)),
                "{table} on shard {index}: {low:?}..{high:?}"
            );
        }
    }
    // An integer serial cannot be spread: the client is told.
    let port = cluster.router.address().port().to_string();
    let output = common::psql(&port)
        .args([
            "-c",
            "CREATE TABLE customers (id bigserial PRIMARY KEY, visit serial, name text)",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("NOTICE") && stderr.contains("customers_visit_seq"),
        "{stderr}"
    );

    // An INSERT without the shard key: the router draws the keys from its sequence and routes
    // each row by its key.
    let inserted = client
        .execute(
            "INSERT INTO customers (name) VALUES ('a'), ('b'), ('c'), ('d'), ('e'), ('f')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 6);
    let id: i64 = client
        .query_one(
            "INSERT INTO customers (name) VALUES ($1) RETURNING id",
            &[&"g"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 7);
    for id in 1..=7i64 {
        // A read by key goes to the one shard the vindex names: the row is there.
        let rows = client
            .query("SELECT name FROM customers WHERE id = $1", &[&id])
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "customer {id} is not on its shard");
    }
    let spread = cluster
        .count_on_each_shard("SELECT count(*) FROM customers")
        .await;
    assert_eq!(spread.iter().sum::<i64>(), 7);
    // A key without a sequence cannot be drawn: a clear error, nothing written.
    let error = client
        .execute("INSERT INTO accounts (balance) VALUES (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error:?}");
}

/// EXPLAIN of a multi-shard statement: the router's part, then one shard's plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_routers_plan_and_a_shards_plan() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    let lines = text_rows_simple(
        &client,
        "EXPLAIN SELECT region, count(*) FROM customers GROUP BY region ORDER BY 2 DESC LIMIT 2",
    )
    .await;
    assert!(
        lines[0].starts_with("pg-router: scatter-gather, merged: GROUP BY / aggregates"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("Plan on shard s0")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("Aggregate")), "{lines:?}");
    // Through the extended protocol (binary results) too.
    let rows = client
        .query(
            "EXPLAIN (COSTS OFF) SELECT * FROM orders WHERE qty > $1",
            &[&3i32],
        )
        .await
        .unwrap();
    let first: String = rows[0].get(0);
    assert_eq!(
        first,
        "pg-router: scatter-gather, rows concatenated on every shard"
    );
    // One shard: PostgreSQL's own EXPLAIN.
    let lines = text_rows_simple(
        &client,
        "EXPLAIN SELECT * FROM orders WHERE customer_id = 7",
    )
    .await;
    assert!(!lines[0].starts_with("pg-router"), "{lines:?}");
    // EXPLAIN ANALYZE would run a multi-shard write outside two-phase commit.
    let error = client
        .simple_query("EXPLAIN ANALYZE DELETE FROM orders WHERE qty = 1")
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error:?}");
}
