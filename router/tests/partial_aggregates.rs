//! Partial aggregation: a co-located join with reference tables, grouped by a column of a
//! reference table (not the shard key), is aggregated on each shard (avg as sum and count,
//! variances as count, sum and sum of squares, count(DISTINCT) grouped by its argument) and the partial groups merged by the router. The
//! shards' `pg_stat_statements` shows the statement they ran and how few rows it returned;
//! the answers equal one PostgreSQL's over the same rows.

mod common;

use common::{Cluster, SCHEMA_TOML, shard_options, text_rows};

const SCHEMA: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, region text, score int);
CREATE TABLE orders (id bigint, customer_id bigint NOT NULL, total numeric(12,2), qty int, note text, PRIMARY KEY (customer_id, id));
CREATE TABLE countries (code text PRIMARY KEY, name text);
CREATE TABLE accounts (owner text PRIMARY KEY, balance bigint NOT NULL)";

/// The rows: 5 countries, 300 customers spread over 4 of them (and none), 3,000 orders.
fn data() -> Vec<String> {
    let mut statements = vec![
        "INSERT INTO countries VALUES ('n', 'North'), ('s', 'South'), ('e', 'East'), ('w', 'West'), ('x', 'Nowhere')"
            .to_string(),
    ];
    let regions = ["'n'", "'s'", "'e'", "'w'", "NULL"];
    let customers: Vec<String> = (1..=300)
        .map(|id| {
            format!(
                "({id}, 'c{id}', {}, {})",
                regions[id % regions.len()],
                (id * 37) % 101
            )
        })
        .collect();
    statements.push(format!(
        "INSERT INTO customers (id, name, region, score) VALUES {}",
        customers.join(", ")
    ));
    for chunk in (1..=3000).collect::<Vec<usize>>().chunks(500) {
        let orders: Vec<String> = chunk
            .iter()
            .map(|id| {
                let total = if id % 13 == 0 {
                    "NULL".to_string()
                } else {
                    format!("{}.{:02}", (id * 7919) % 1000, id % 100)
                };
                format!(
                    "({id}, {}, {total}, {}, 'n{}')",
                    (id * 31) % 300 + 1,
                    id % 9,
                    id % 4
                )
            })
            .collect();
        statements.push(format!(
            "INSERT INTO orders (id, customer_id, total, qty, note) VALUES {}",
            orders.join(", ")
        ));
    }
    statements
}

/// The statements the shards ran that contain `needle`, with the rows each returned.
async fn shard_statements(cluster: &Cluster, needle: &str) -> Vec<Vec<(String, i64)>> {
    let mut all = Vec::new();
    for shard in &cluster.shards {
        let client = shard.client().await.unwrap();
        let rows = client
            .query(
                "SELECT query, rows FROM pg_stat_statements WHERE strpos(query, $1) > 0",
                &[&needle],
            )
            .await
            .unwrap();
        all.push(rows.iter().map(|row| (row.get(0), row.get(1))).collect());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_joins_with_reference_tables_aggregate_on_the_shards() {
    let options = shard_options().setting("shared_preload_libraries", "pg_stat_statements");
    let cluster = Cluster::start_with(2, options, SCHEMA_TOML).await;
    let reference =
        tokio::task::block_in_place(|| testbed::Postgres::start().expect("reference postgres"));
    let direct = reference.client().await.unwrap();
    let routed = cluster.client().await;
    direct.batch_execute(SCHEMA).await.unwrap();
    routed.batch_execute(SCHEMA).await.unwrap();
    for statement in data() {
        direct.batch_execute(&statement).await.unwrap();
        routed.batch_execute(&statement).await.unwrap();
    }
    for shard in &cluster.shards {
        let client = shard.client().await.unwrap();
        client
            .batch_execute("CREATE EXTENSION pg_stat_statements; SELECT pg_stat_statements_reset()")
            .await
            .unwrap();
    }

    let cases = [
        (
            "SELECT k.name, count(*), count(o.total), sum(o.total), avg(o.total), min(o.qty), max(o.qty) \
             FROM orders o JOIN customers c ON c.id = o.customer_id JOIN countries k ON k.code = c.region \
             GROUP BY k.name ORDER BY k.name",
            // avg goes to the shards as sum and count; each shard sends one row per country.
            vec!["sum(o.total) AS \"avg\"", "count(o.total) AS __pgr_"],
        ),
        (
            "SELECT k.name, count(DISTINCT qty) AS kinds, count(*) FROM orders, customers c, countries k \
             WHERE customer_id = c.id AND code = region GROUP BY k.name HAVING count(*) > 10 ORDER BY kinds DESC, k.name",
            // count(DISTINCT x): the shards group by x too and the router counts the values.
            vec!["GROUP BY k.name, orders.qty"],
        ),
        (
            "SELECT k.name, count(DISTINCT o.customer_id) AS buyers, count(*) FROM orders o \
             JOIN customers c ON c.id = o.customer_id JOIN countries k ON k.code = c.region \
             GROUP BY k.name ORDER BY buyers DESC, k.name",
            // count(DISTINCT shard key): each key lives on one shard, the shards' counts add up.
            vec!["count(DISTINCT o.customer_id)"],
        ),
        (
            "SELECT k.name, round(avg(o.qty), 3) AS mean, sum(o.total) / count(*) AS per_order \
             FROM orders o, customers c, countries k WHERE c.id = o.customer_id AND k.code = c.region AND o.qty > 2 \
             GROUP BY k.name ORDER BY mean DESC LIMIT 2",
            // Expressions over aggregates, ORDER BY and LIMIT after the merge.
            vec!["sum(o.qty)", "count(o.qty)"],
        ),
        (
            "SELECT k.name, count(*), variance(o.total), var_samp(o.total), var_pop(o.total), \
             stddev(o.total), stddev_samp(o.qty), stddev_pop(o.qty), var_pop(c.score) \
             FROM orders o JOIN customers c ON c.id = o.customer_id JOIN countries k ON k.code = c.region \
             GROUP BY k.name HAVING stddev(o.total) > 1 ORDER BY var_samp(o.qty) DESC, k.name LIMIT 3",
            // Variances as count, sum and sum of squares per group, in numeric.
            vec!["::NUMERIC * ((o.total) +", "var_samp(o.qty) FILTER"],
        ),
        (
            "SELECT region, stddev_samp(total) AS sd, var_pop(qty) FROM orders, customers \
             WHERE customer_id = customers.id GROUP BY region ORDER BY sd DESC NULLS LAST",
            vec!["FILTER (WHERE"],
        ),
        (
            // NULL totals, groups of one row (the sample variances are NULL), HAVING on them.
            "SELECT o.qty, var_samp(o.total), stddev_samp(o.qty), var_pop(o.total), stddev(c.score), count(*) \
             FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id <= 14 GROUP BY o.qty ORDER BY o.qty",
            vec![],
        ),
        (
            "SELECT o.qty, stddev_pop(o.total) FROM orders o JOIN customers c ON c.id = o.customer_id \
             WHERE o.id <= 14 GROUP BY o.qty HAVING var_samp(o.total) IS NULL ORDER BY 1",
            vec![],
        ),
        (
            // No rows: one row of NULLs (and a count of 0).
            "SELECT var_samp(o.total), stddev(o.qty), var_pop(o.qty), stddev_pop(o.total), count(*) \
             FROM orders o WHERE o.qty > 100",
            vec![],
        ),
        (
            "SELECT variance(qty), stddev_pop(total), round(stddev(total), 4), var_samp(score) * 2 \
             FROM orders o JOIN customers c ON c.id = o.customer_id",
            vec![],
        ),
    ];
    for (sql, partials) in cases {
        let expected = text_rows(&direct, sql).await.unwrap();
        let got = text_rows(&routed, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(got, expected, "{sql}");
        for needle in partials {
            let ran = shard_statements(&cluster, needle).await;
            for (shard, statements) in ran.iter().enumerate() {
                assert!(
                    !statements.is_empty(),
                    "shard {shard} ran no statement with {needle} for {sql}"
                );
                for (statement, rows) in statements {
                    assert!(
                        statement.contains("GROUP BY") && !statement.contains("avg("),
                        "shard {shard} ran {statement}"
                    );
                    // Partial groups, not joined rows: at most one row per country and value.
                    assert!(
                        *rows <= 5 * 10,
                        "shard {shard} sent {rows} rows for {statement}"
                    );
                }
            }
        }
    }
    // Over floating-point arguments the result is float8, as PostgreSQL's, equal to its
    // (Youngs-Cramer) result to floating-point tolerance.
    let sql = "SELECT k.name, stddev(o.total::float8), var_samp(o.qty / 7.0::float8), \
               var_pop(c.score::real), stddev_pop(o.total::float8) FILTER (WHERE o.qty > 4) \
               FROM orders o JOIN customers c ON c.id = o.customer_id JOIN countries k ON k.code = c.region \
               GROUP BY k.name ORDER BY k.name";
    let floats = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, Vec<Option<f64>>)> {
        rows.iter()
            .map(|row| (row.get(0), (1..row.len()).map(|i| row.get(i)).collect()))
            .collect()
    };
    let expected = floats(direct.query(sql, &[]).await.unwrap());
    let got = floats(routed.query(sql, &[]).await.unwrap());
    assert_eq!(got.len(), expected.len(), "{sql}");
    for ((name, got), (expected_name, expected)) in got.iter().zip(&expected) {
        assert_eq!(name, expected_name);
        for (g, e) in got.iter().zip(expected) {
            let (g, e) = (g.expect("a value"), e.expect("a value"));
            assert!(
                (g - e).abs() <= 1e-9 * e.abs().max(1.0),
                "{sql}: {name}: {g} instead of {e}"
            );
        }
    }
}
