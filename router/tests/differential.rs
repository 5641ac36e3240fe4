//! Differential tests: every query gives the same result through the router over sharded data
//! as directly on one PostgreSQL holding all rows, in text and in binary format.

mod common;

use common::{Cluster, binary_rows, connect, text_rows};

const SETUP: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, region text, score int);
     CREATE TABLE orders (id bigint, customer_id bigint NOT NULL, total numeric(12,2), qty int, note text, PRIMARY KEY (customer_id, id));
     CREATE TABLE countries (code text PRIMARY KEY, name text);
     CREATE TABLE accounts (owner text PRIMARY KEY, balance bigint NOT NULL)";

fn data() -> Vec<String> {
    let regions = ["'north'", "'south'", "'east'", "'west'", "NULL"];
    let customers: Vec<String> = (1..=200)
        .map(|i| {
            let score = if i % 11 == 0 {
                "NULL".to_string()
            } else {
                ((i * 37) % 101).to_string()
            };
            format!(
                "({i}, 'customer {:03}', {}, {score})",
                (i * 7) % 200,
                regions[i % 5]
            )
        })
        .collect();
    let orders: Vec<String> = (1..=600)
        .map(|i| {
            let customer = (i * 13) % 200 + 1;
            let total = if i % 17 == 0 {
                "NULL".to_string()
            } else {
                format!("{}.{:02}", (i * 31) % 500, i % 100)
            };
            format!("({i}, {customer}, {total}, {}, 'n{}')", i % 9, i % 4)
        })
        .collect();
    vec![
        format!("INSERT INTO customers (id, name, region, score) VALUES {}", customers.join(", ")),
        format!("INSERT INTO orders (id, customer_id, total, qty, note) VALUES {}", orders.join(", ")),
        "INSERT INTO countries (code, name) VALUES ('fr', 'France'), ('de', 'Germany'), ('jp', 'Japan')".into(),
        format!(
            "INSERT INTO accounts (owner, balance) VALUES {}",
            (0..50).map(|i| format!("('owner {i}', {})", i * 10 - 200)).collect::<Vec<_>>().join(", ")
        ),
    ]
}

const CORPUS: &[&str] = &[
    "SELECT * FROM customers WHERE id = 17",
    "SELECT name, score FROM customers WHERE id IN (3, 50, 101)",
    "SELECT * FROM customers ORDER BY id",
    "SELECT * FROM customers ORDER BY id DESC LIMIT 7",
    "SELECT id, name FROM customers ORDER BY name, id LIMIT 10 OFFSET 5",
    "SELECT id FROM customers ORDER BY score NULLS FIRST, id LIMIT 20",
    "SELECT id FROM customers ORDER BY score DESC, id LIMIT 20",
    "SELECT id, region FROM customers ORDER BY region DESC NULLS LAST, id OFFSET 190",
    "SELECT count(*) FROM customers",
    "SELECT count(*), count(score), sum(score), min(score), max(score), avg(score) FROM customers",
    "SELECT region, count(*), sum(score), avg(score) FROM customers GROUP BY region ORDER BY region",
    "SELECT region, count(*) AS n FROM customers GROUP BY region HAVING count(*) > 39 ORDER BY n DESC, region",
    "SELECT region, max(name) FROM customers GROUP BY region HAVING max(score) >= 99 ORDER BY 1",
    "SELECT DISTINCT region FROM customers ORDER BY region",
    "SELECT DISTINCT qty FROM orders ORDER BY qty DESC LIMIT 4",
    "SELECT sum(total), avg(total), min(total), max(total), count(total) FROM orders",
    "SELECT qty, sum(total), avg(total) FROM orders GROUP BY qty ORDER BY qty",
    "SELECT note, qty, count(*) FROM orders GROUP BY note, qty ORDER BY note, qty LIMIT 10",
    "SELECT customer_id, count(*) FROM orders GROUP BY customer_id ORDER BY count(*) DESC, customer_id LIMIT 5",
    "SELECT c.id, c.name, o.id, o.total FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.id = 42 ORDER BY o.id",
    "SELECT c.region, count(*), sum(o.total) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.region ORDER BY c.region",
    "SELECT c.id, o.id FROM customers c JOIN orders o ON c.id = o.customer_id ORDER BY c.id, o.id LIMIT 15",
    "SELECT * FROM countries ORDER BY code",
    "SELECT o.id, k.name FROM orders o JOIN countries k ON k.code = o.note WHERE o.customer_id = 14",
    "SELECT owner, balance FROM accounts WHERE owner = 'owner 7'",
    "SELECT owner FROM accounts ORDER BY balance DESC, owner LIMIT 3",
    "SELECT sum(balance), min(owner), max(owner) FROM accounts",
    "SELECT 1 + 2 AS three, 'x'::text AS x",
    "SELECT id, score * 2 AS double FROM customers WHERE score > 90 ORDER BY double, id",
    "SELECT count(*) FROM orders WHERE total > 100 AND qty < 5",
    "SELECT max(total) - min(total) AS spread FROM orders WHERE customer_id = 9",
    // count(DISTINCT ...) across shards: values deduplicated by the router.
    "SELECT count(DISTINCT region), count(DISTINCT score), count(*) FROM customers",
    "SELECT region, count(DISTINCT score % 7) AS kinds, sum(score), avg(score) FROM customers GROUP BY region ORDER BY region",
    "SELECT note, count(DISTINCT total), max(total) FROM orders GROUP BY note HAVING count(DISTINCT total) > 100 ORDER BY note",
    "SELECT count(DISTINCT total * 1.0), count(DISTINCT qty) FROM orders",
    "SELECT count(DISTINCT name), count(*), sum(score), min(name) FROM customers WHERE score > 1000",
    "SELECT qty, count(DISTINCT customer_id) FROM orders GROUP BY qty ORDER BY count(DISTINCT customer_id) DESC, qty LIMIT 4",
    // Expressions over aggregates, HAVING and ORDER BY beyond plain comparisons: the merged
    // groups go through a final statement on one shard.
    "SELECT region, coalesce(sum(score), 0)::int AS total, round(avg(score), 2) FROM customers GROUP BY region ORDER BY region",
    "SELECT count(*)::int, sum(total) / count(*), max(total) - min(total) AS spread FROM orders",
    "SELECT note, count(*) FROM orders GROUP BY note HAVING sum(qty) * 2 > 100 AND note LIKE 'n%' ORDER BY count(*) DESC, note",
    "SELECT upper(note), count(DISTINCT qty)::int FROM orders GROUP BY note ORDER BY 1",
    "SELECT qty, count(*) FROM orders GROUP BY qty HAVING avg(total) > 240 ORDER BY avg(total) DESC",
    "SELECT count(*) FILTER (WHERE qty > 4) AS big, sum(total) FILTER (WHERE note = 'n1') FROM orders",
    "SELECT coalesce(max(total), -1) AS top, count(*) * 10, avg(qty)::float8 FROM orders WHERE qty > 100",
    "SELECT DISTINCT count(*) % 3 FROM orders GROUP BY customer_id ORDER BY 1",
    "SELECT CASE WHEN count(*) > 40 THEN 'many' ELSE 'few' END, region FROM customers GROUP BY region ORDER BY region NULLS FIRST",
    "SELECT customer_id, sum(total)::numeric(14,1) FROM orders GROUP BY customer_id ORDER BY 2 DESC NULLS LAST, customer_id LIMIT 5 OFFSET 2",
    "SELECT score % 4, length(min(name)), max(name) || '!' FROM customers GROUP BY score % 4 ORDER BY score % 4 NULLS LAST",
    "SELECT sum(qty) FROM orders HAVING count(*) > 1000",
    "SELECT bool_and(score > 0), bool_or(score > 98), every(score >= 0) FROM customers",
    "SELECT region, bool_or(score > 90), any_value(region) FROM customers GROUP BY region ORDER BY region",
    // Variances from count, sum and sum of squares per shard, in numeric.
    "SELECT region, var_samp(score), stddev_pop(score), count(*) FROM customers GROUP BY region ORDER BY stddev(score) DESC, region LIMIT 4",
    "SELECT variance(total), stddev(total), var_pop(qty), stddev_samp(qty) FROM orders WHERE customer_id < 20",
    "SELECT note, qty % 2, count(*) FROM orders GROUP BY 1, 2 ORDER BY 1, 2",
    "SELECT score % 3 AS bucket, sum(qty) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY 1 ORDER BY bucket",
    // WITH queries and FROM subqueries over sharded tables run first; the outer statement reads
    // their results on one shard.
    "WITH totals AS (SELECT customer_id, sum(total) AS s FROM orders GROUP BY customer_id) SELECT count(*), max(s) FROM totals WHERE s > 500",
    "SELECT count(*) FROM (SELECT DISTINCT region FROM customers) AS r",
    "SELECT r.region, r.n, k.name FROM (SELECT region, count(*) AS n FROM customers GROUP BY region) r LEFT JOIN countries k ON k.code = r.region ORDER BY r.region NULLS FIRST",
    "WITH big AS (SELECT id, score FROM customers WHERE score > 90), small(sid, sc) AS (SELECT id, score FROM customers WHERE score < 5) SELECT (SELECT count(*) FROM big), (SELECT count(*) FROM small), (SELECT max(sc) FROM small)",
    "WITH t AS (SELECT customer_id, count(*) AS n FROM orders GROUP BY customer_id) SELECT n, count(*) FROM t GROUP BY n ORDER BY n",
    "WITH t AS (SELECT id, total FROM orders WHERE total IS NOT NULL ORDER BY total DESC, id LIMIT 5) SELECT * FROM t ORDER BY id",
    "WITH t AS (SELECT id, name || E'\\\\ \"q\" ,{}' AS weird FROM customers WHERE score > 95) SELECT * FROM t ORDER BY id",
    "WITH t AS (SELECT id, score, region FROM customers WHERE score IS NULL OR region IS NULL) SELECT count(*), count(score), count(region) FROM t",
    // ... read by a statement over sharded tables: the results go to every shard with it.
    "WITH top AS (SELECT customer_id FROM orders GROUP BY customer_id ORDER BY sum(total) DESC NULLS LAST, customer_id LIMIT 5) SELECT c.id, c.name FROM customers c JOIN top ON top.customer_id = c.id ORDER BY c.id",
    "SELECT o.id, o.total FROM orders o JOIN (SELECT region, min(id) AS first_id FROM customers GROUP BY region) f ON f.first_id = o.customer_id ORDER BY o.id",
    "WITH big AS (SELECT id FROM customers WHERE score > 80) SELECT count(*), sum(o.total) FROM orders o JOIN big ON big.id = o.customer_id",
    "WITH w AS (SELECT id, name || E' \\\\ '' {},\"x\"' AS label FROM customers WHERE score > 95) SELECT o.id, w.label FROM orders o JOIN w ON w.id = o.customer_id ORDER BY o.id",
    // Joins off the shard keys: the other tables go to every shard with the statement.
    "SELECT o.id, c.id FROM orders o JOIN customers c ON c.score = o.qty * 10 ORDER BY o.id, c.id LIMIT 30",
    "SELECT c.region, count(*), sum(o.total) FROM orders o LEFT JOIN customers c ON c.score = o.qty GROUP BY c.region ORDER BY 1 NULLS FIRST",
    // Window functions, DISTINCT ON and aggregates that do not merge, over one sharded table:
    // its matching rows are pulled from the shards and the statement runs over them.
    "SELECT id, score, rank() OVER (ORDER BY score DESC NULLS LAST) FROM customers ORDER BY score DESC NULLS LAST, id LIMIT 7",
    "SELECT region, string_agg(name, ',' ORDER BY name), array_agg(id ORDER BY id) FROM customers WHERE id < 40 GROUP BY region ORDER BY region",
    "SELECT sum(DISTINCT score), round(stddev(score), 6), percentile_cont(0.5) WITHIN GROUP (ORDER BY score) FROM customers",
    "SELECT DISTINCT ON (region) region, id, name FROM customers ORDER BY region, id",
    "SELECT o.customer_id, o.total, sum(o.total) OVER (PARTITION BY o.customer_id ORDER BY o.id) FROM orders o WHERE o.qty = 2 ORDER BY 1, o.id",
    "SELECT json_agg(id ORDER BY id) FROM customers WHERE score > 95",
    // ... and over a co-located join: the columns it reads are pulled.
    "SELECT c.region, o.total, rank() OVER (PARTITION BY c.region ORDER BY o.total DESC NULLS LAST, o.id) AS r FROM customers c JOIN orders o ON o.customer_id = c.id WHERE o.qty > 6 ORDER BY c.region NULLS FIRST, r LIMIT 20",
    "SELECT c.region, string_agg(DISTINCT o.note, ',' ORDER BY o.note), count(*) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.region ORDER BY 1 NULLS FIRST",
    "SELECT region, score % 2 AS parity, count(*) FROM customers GROUP BY ROLLUP (region, score % 2) ORDER BY 1 NULLS FIRST, 2 NULLS FIRST",
    "SELECT note, qty, sum(total) FROM orders GROUP BY GROUPING SETS ((note), (qty), ()) ORDER BY 1 NULLS FIRST, 2 NULLS FIRST",
    // Subqueries co-located with the statement (IN / EXISTS on the shard key): pushed down.
    "SELECT count(*) FROM orders WHERE customer_id IN (SELECT id FROM customers WHERE region = 'north')",
    "SELECT o.id, o.total FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id AND c.score > 90) ORDER BY o.id LIMIT 10",
    "SELECT c.id FROM customers c WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id) ORDER BY c.id",
    "SELECT note, count(*) FROM orders o WHERE o.customer_id IN (SELECT c.id FROM customers c WHERE c.score < 20) GROUP BY note ORDER BY note",
    "SELECT c.id, (SELECT count(*) FROM orders o WHERE o.customer_id = c.id) AS n FROM customers c ORDER BY n DESC, c.id LIMIT 5",
    "SELECT o.id FROM orders o WHERE o.total > (SELECT avg(x.total) FROM orders x WHERE x.customer_id = o.customer_id) ORDER BY o.id LIMIT 20",
    // Correlated aggregates off the shard key: joined with the groups, aggregated per shard first.
    "SELECT c.id FROM customers c WHERE c.score > (SELECT avg(x.score) FROM customers x WHERE x.region = c.region) ORDER BY c.id",
    "SELECT o.id FROM orders o WHERE o.total > (SELECT avg(x.total) + 1 FROM orders x WHERE x.qty = o.qty AND x.note = o.note) ORDER BY o.id LIMIT 20",
    "SELECT k.code FROM countries k WHERE k.name <> 'none' AND 2 < (SELECT max(o.qty) FROM orders o WHERE o.note = k.code) ORDER BY 1",
    // ... and elsewhere (select list, count, inside OR): left joins, the value over no rows kept.
    "SELECT k.code, (SELECT count(*) FROM orders o WHERE o.note = k.code) AS n, (SELECT sum(o.qty) FROM orders o WHERE o.note = k.code) FROM countries k ORDER BY k.code",
    "SELECT c.id, (SELECT max(o.qty) FROM orders o WHERE o.note = c.region) FROM customers c ORDER BY c.id LIMIT 20",
    "SELECT c.id FROM customers c WHERE 0 = (SELECT count(*) FROM orders o WHERE o.qty = c.score) OR c.score IS NULL ORDER BY c.id",
    // Uncorrelated subqueries over sharded tables: run first, bound as parameters.
    "SELECT id, total FROM orders WHERE total > (SELECT avg(total) FROM orders) ORDER BY id LIMIT 10",
    "SELECT count(*) FROM orders WHERE note NOT IN (SELECT region FROM customers WHERE region IS NOT NULL)",
    "SELECT count(*) FROM orders WHERE qty NOT IN (SELECT score FROM customers)",
    "SELECT * FROM customers WHERE id = (SELECT max(customer_id) FROM orders)",
    "SELECT count(*) FROM customers WHERE EXISTS (SELECT 1 FROM orders WHERE qty > 7) AND NOT EXISTS (SELECT 1 FROM orders WHERE qty > 70)",
    "SELECT id FROM customers WHERE score IN (SELECT qty * 10 FROM orders) ORDER BY id",
    // FETCH FIRST, as Hibernate writes it.
    "SELECT id FROM customers ORDER BY id FETCH FIRST 3 ROWS ONLY",
    "SELECT id FROM customers ORDER BY id DESC OFFSET 5 ROWS FETCH NEXT 2 ROWS ONLY",
    "SELECT region, count(*) FROM customers GROUP BY region ORDER BY count(*) DESC, region NULLS FIRST FETCH FIRST 2 ROWS ONLY",
    // Set operations that do not merge: each branch runs first, the operation over the results.
    "SELECT id FROM customers WHERE id < 30 INTERSECT SELECT customer_id FROM orders ORDER BY 1",
    "SELECT id FROM customers EXCEPT SELECT customer_id FROM orders ORDER BY id",
    "SELECT region FROM customers UNION SELECT note FROM orders UNION ALL SELECT code FROM countries ORDER BY 1",
    "SELECT count(*) FROM customers UNION ALL SELECT count(*) FROM orders ORDER BY 1",
    // UNION [ALL] across shards: run whole on every shard, merged (and deduplicated).
    "SELECT id, name FROM customers WHERE score > 90 UNION ALL SELECT customer_id, note FROM orders WHERE qty = 3 ORDER BY 1, 2",
    "SELECT region FROM customers UNION SELECT note FROM orders ORDER BY region",
    "SELECT id FROM customers WHERE id < 20 UNION ALL SELECT id FROM orders WHERE id < 20 ORDER BY 1 DESC LIMIT 7 OFFSET 3",
    "SELECT c.id, o.total FROM customers c JOIN orders o ON o.customer_id = c.id WHERE o.qty = 1 UNION SELECT id, score FROM customers WHERE score < 5",
    "SELECT qty FROM orders UNION SELECT score FROM customers UNION SELECT score + 1 FROM customers WHERE id = 3",
    "SELECT o.id, k.name FROM orders o JOIN countries k ON k.code = o.note UNION ALL SELECT id, name FROM customers WHERE id = 3",
    // Pinned to one shard by their keys: WITH, UNION, subqueries, window functions, DISTINCT
    // aggregates run there whole.
    "WITH recent AS (SELECT * FROM orders WHERE customer_id = 27 ORDER BY id DESC LIMIT 2) SELECT count(*), sum(total) FROM recent",
    "SELECT id, total FROM orders WHERE customer_id = 27 UNION ALL SELECT id, score FROM customers WHERE id = 27 ORDER BY 1, 2",
    "SELECT id FROM orders WHERE customer_id = 27 INTERSECT SELECT id FROM orders WHERE customer_id = 27 AND qty > 2 ORDER BY 1",
    "SELECT c.name, (SELECT count(*) FROM orders o WHERE o.customer_id = 27) AS orders FROM customers c WHERE c.id = 27",
    "SELECT id, total, rank() OVER (ORDER BY total DESC NULLS LAST, id) FROM orders WHERE customer_id = 27 ORDER BY id",
    "SELECT count(DISTINCT qty) FROM orders WHERE customer_id = 27",
    "SELECT * FROM customers WHERE id = 27 AND EXISTS (SELECT 1 FROM orders WHERE customer_id = 27 AND total > 10)",
    "WITH c AS (SELECT * FROM customers WHERE id = 27) SELECT c.name, k.code FROM c CROSS JOIN countries k ORDER BY k.code",
];

fn generated() -> Vec<String> {
    let mut out = Vec::new();
    let columns = ["id", "score", "region", "name"];
    for (i, column) in columns.iter().enumerate() {
        for desc in [false, true] {
            for (limit, offset) in [(None, 0), (Some(5), 0), (Some(3), 7), (None, 195)] {
                let direction = if desc { "DESC" } else { "ASC" };
                let mut sql =
                    format!("SELECT id, {column} FROM customers ORDER BY {column} {direction}, id");
                if let Some(limit) = limit {
                    sql.push_str(&format!(" LIMIT {limit}"));
                }
                if offset > 0 {
                    sql.push_str(&format!(" OFFSET {offset}"));
                }
                out.push(sql);
            }
        }
        let aggregate = [
            "count(*)",
            "sum(score)",
            "min(name)",
            "max(score)",
            "avg(score)",
        ][i];
        for group in ["region", "score % 3", "qty"] {
            let table = if group == "qty" {
                "orders"
            } else {
                "customers"
            };
            let aggregate = if table == "orders" {
                [
                    "count(*)",
                    "sum(total)",
                    "min(note)",
                    "max(total)",
                    "avg(total)",
                ][i]
            } else {
                aggregate
            };
            out.push(format!(
                "SELECT {group}, {aggregate} FROM {table} GROUP BY {group} ORDER BY {group}"
            ));
            out.push(format!(
                "SELECT {group} AS g, {aggregate} AS a, count(*) FROM {table} GROUP BY {group} HAVING count(*) > 10 ORDER BY a DESC NULLS LAST, g LIMIT 3"
            ));
        }
        out.push(format!(
            "SELECT DISTINCT {column} FROM customers ORDER BY {column}"
        ));
    }
    out
}

/// Pseudo-random queries (fixed seed, so failures reproduce) over filters, ORDER BY, LIMIT /
/// OFFSET, aggregates, GROUP BY / HAVING and DISTINCT.
fn randomized(count: usize) -> Vec<String> {
    let mut state: u64 = 0x5eed_1234_abcd_0001;
    let mut next = move |n: usize| -> usize {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let filters = [
        "",
        " WHERE score > 50",
        " WHERE region = 'north'",
        " WHERE region IS NULL",
        " WHERE id < 120",
        " WHERE name LIKE 'customer 1%'",
        " WHERE score BETWEEN 10 AND 60 AND region <> 'east'",
    ];
    let order_filters = [
        "",
        " WHERE qty > 3",
        " WHERE total > 200",
        " WHERE note = 'n1'",
    ];
    let columns = ["id", "name", "region", "score"];
    let customer_aggregates = [
        "count(*)",
        "count(score)",
        "sum(score)",
        "min(score)",
        "max(score)",
        "avg(score)",
        "min(name)",
        "max(region)",
    ];
    let order_aggregates = [
        "count(*)",
        "sum(total)",
        "avg(total)",
        "min(total)",
        "max(qty)",
        "sum(qty)",
        "avg(qty)",
    ];
    let groups = ["region", "score % 5", "id % 7"];
    let mut out = Vec::new();
    while out.len() < count {
        let sql = match next(6) {
            0 => {
                let column = columns[next(4)];
                let direction = ["ASC", "DESC"][next(2)];
                let nulls = ["", " NULLS FIRST", " NULLS LAST"][next(3)];
                let mut sql = format!(
                    "SELECT id, {column} FROM customers{} ORDER BY {column} {direction}{nulls}, id",
                    filters[next(filters.len())]
                );
                match next(3) {
                    0 => sql.push_str(&format!(" LIMIT {}", 1 + next(20))),
                    1 => sql.push_str(&format!(" LIMIT {} OFFSET {}", 1 + next(20), next(100))),
                    _ => {}
                }
                sql
            }
            1 => {
                let picked: Vec<&str> = (0..1 + next(4))
                    .map(|_| customer_aggregates[next(customer_aggregates.len())])
                    .collect();
                format!(
                    "SELECT {} FROM customers{}",
                    picked.join(", "),
                    filters[next(filters.len())]
                )
            }
            2 => {
                let group = groups[next(groups.len())];
                let picked: Vec<&str> = (0..1 + next(3))
                    .map(|_| customer_aggregates[next(customer_aggregates.len())])
                    .collect();
                let having = match next(3) {
                    0 => format!(" HAVING count(*) > {}", next(30)),
                    1 => format!(" HAVING max(score) >= {} OR count(*) < 5", next(100)),
                    _ => String::new(),
                };
                let mut sql = format!(
                    "SELECT {group}, {} FROM customers{} GROUP BY {group}{having} ORDER BY {group}",
                    picked.join(", "),
                    filters[next(filters.len())]
                );
                if next(2) == 0 {
                    sql.push_str(&format!(" DESC LIMIT {}", 1 + next(5)));
                }
                sql
            }
            3 => {
                let picked: Vec<&str> = (0..1 + next(3))
                    .map(|_| order_aggregates[next(order_aggregates.len())])
                    .collect();
                if next(2) == 0 {
                    format!(
                        "SELECT note, {} FROM orders{} GROUP BY note ORDER BY note",
                        picked.join(", "),
                        order_filters[next(order_filters.len())]
                    )
                } else {
                    format!(
                        "SELECT {} FROM orders{}",
                        picked.join(", "),
                        order_filters[next(order_filters.len())]
                    )
                }
            }
            4 => {
                // Expressions over aggregates, HAVING over them, aggregates that need the rows.
                let expressions = [
                    "coalesce(sum(score), 0) * 2",
                    "round(avg(score), 3)",
                    "count(*)::int + 1",
                    "max(score) - min(score)",
                    "count(DISTINCT region)::text",
                    "sum(score) / nullif(count(*), 0)",
                    "CASE WHEN count(*) > 20 THEN 'big' ELSE 'small' END",
                    "bool_or(score > 90)",
                    "string_agg(name, '|' ORDER BY name)",
                    "stddev(score)::numeric(10,4)",
                ];
                let group = groups[next(groups.len())];
                let picked: Vec<&str> = (0..1 + next(2))
                    .map(|_| expressions[next(expressions.len())])
                    .collect();
                let having = match next(4) {
                    0 => format!(" HAVING sum(score) * 2 > {}", next(2000)),
                    1 => format!(" HAVING avg(score) < {}", next(100)),
                    2 => " HAVING count(*) % 2 = 0".to_string(),
                    _ => String::new(),
                };
                let mut sql = format!(
                    "SELECT {group}, {} FROM customers{} GROUP BY {group}{having} ORDER BY {group} NULLS FIRST",
                    picked.join(", "),
                    filters[next(filters.len())]
                );
                if next(2) == 0 {
                    sql.push_str(&format!(" LIMIT {}", 1 + next(5)));
                }
                sql
            }
            _ => {
                let expr = ["region", "score % 4", "qty"][next(3)];
                let table = if expr == "qty" { "orders" } else { "customers" };
                let direction = ["ASC", "DESC"][next(2)];
                let mut sql =
                    format!("SELECT DISTINCT {expr} FROM {table} ORDER BY {expr} {direction}");
                if next(2) == 0 {
                    sql.push_str(&format!(" LIMIT {}", 1 + next(4)));
                }
                sql
            }
        };
        out.push(sql);
    }
    out
}

/// The bytes of a COPY TO STDOUT.
async fn copy_out(client: &tokio_postgres::Client, sql: &str) -> Vec<u8> {
    use futures::StreamExt;
    let stream = client
        .copy_out(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// The column names of the answer to `sql` (simple protocol: the names the statement itself
/// reports, not a separate Describe).
async fn column_names(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap();
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::RowDescription(columns) => {
                Some(columns.iter().map(|c| c.name().to_string()).collect())
            }
            _ => None,
        })
        .unwrap_or_default()
}

fn sort_if_unordered<T: Ord>(sql: &str, mut rows: Vec<T>) -> Vec<T> {
    if !sql.to_uppercase().contains("ORDER BY") {
        rows.sort();
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_results_equal_single_postgres_results() {
    let cluster = Cluster::start(3).await;
    let reference =
        tokio::task::block_in_place(|| testbed::Postgres::start().expect("reference postgres"));
    let direct = reference.client().await.unwrap();
    let routed = cluster.client().await;
    direct.batch_execute(SETUP).await.unwrap();
    routed.batch_execute(SETUP).await.unwrap();
    for statement in data() {
        direct.batch_execute(&statement).await.unwrap();
        routed.batch_execute(&statement).await.unwrap();
    }
    // Rows really are spread: no shard has all customers.
    for n in cluster
        .count_on_each_shard("SELECT count(*) FROM customers")
        .await
    {
        assert!(n > 0 && n < 200, "shard has {n} customers");
    }
    let mut queries: Vec<String> = CORPUS.iter().map(|s| s.to_string()).collect();
    queries.extend(generated());
    queries.extend(randomized(300));
    let mut checked = 0;
    for sql in &queries {
        let expected_text = text_rows(&direct, sql)
            .await
            .unwrap_or_else(|e| panic!("direct {sql}: {e}"));
        let got_text = text_rows(&routed, sql)
            .await
            .unwrap_or_else(|e| panic!("router {sql}: {e:?}"));
        assert_eq!(
            column_names(&routed, sql).await,
            column_names(&direct, sql).await,
            "column names differ for: {sql}"
        );
        assert_eq!(
            sort_if_unordered(sql, got_text),
            sort_if_unordered(sql, expected_text),
            "text results differ for: {sql}"
        );
        let expected_binary = binary_rows(&direct, sql)
            .await
            .unwrap_or_else(|e| panic!("direct {sql}: {e}"));
        let got_binary = binary_rows(&routed, sql)
            .await
            .unwrap_or_else(|e| panic!("router binary {sql}: {e:?}"));
        assert_eq!(
            sort_if_unordered(sql, got_binary),
            sort_if_unordered(sql, expected_binary),
            "binary results differ for: {sql}"
        );
        checked += 1;
    }
    assert!(checked > 200, "only {checked} queries checked");

    // Writes restricted by co-located subqueries change the same rows.
    for write in [
        "UPDATE orders SET qty = qty + 10 WHERE customer_id IN (SELECT id FROM customers WHERE region = 'south')",
        "DELETE FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id AND c.score < 10)",
        // Uncorrelated subqueries run first, bound as parameters.
        "UPDATE orders SET qty = qty + 100 WHERE total > (SELECT avg(total) FROM orders)",
        "DELETE FROM customers WHERE score IN (SELECT qty FROM orders WHERE qty < 2)",
    ] {
        let expected = direct.execute(write, &[]).await.unwrap();
        let got = routed.execute(write, &[]).await.unwrap();
        assert_eq!(got, expected, "{write}");
        assert!(got > 0, "{write} changed nothing");
    }
    let sql = "SELECT id, customer_id, qty FROM orders ORDER BY id";
    assert_eq!(
        text_rows(&routed, sql).await.unwrap(),
        text_rows(&direct, sql).await.unwrap()
    );

    // INSERT ... SELECT: the router reads the rows and copies each to its shard.
    for write in [
        "INSERT INTO orders (id, customer_id, total, qty, note) SELECT id + 10000, customer_id, total, qty, note FROM orders WHERE qty = 3",
        "INSERT INTO customers (id, name, region) SELECT i, 'new ' || i, E'tab\\there \\\\ back' FROM generate_series(1001, 1050) i",
        "INSERT INTO countries (code, name) SELECT DISTINCT note, 'from orders' FROM orders WHERE note IS NOT NULL",
        "INSERT INTO customers SELECT id + 2000, name, NULL, score FROM customers WHERE id <= 20",
    ] {
        let expected = direct.execute(write, &[]).await.unwrap();
        let got = routed
            .execute(write, &[])
            .await
            .unwrap_or_else(|e| panic!("{write}: {e:?}"));
        assert_eq!(got, expected, "{write}");
        assert!(got > 0, "{write} inserted nothing");
    }
    for sql in [
        "SELECT * FROM orders ORDER BY id",
        "SELECT * FROM customers ORDER BY id",
        "SELECT * FROM countries ORDER BY code",
    ] {
        assert_eq!(
            text_rows(&routed, sql).await.unwrap(),
            text_rows(&direct, sql).await.unwrap(),
            "{sql}"
        );
    }
    // Each row on its shard; the reference table's on every shard.
    for shard in &cluster.shards {
        let client = shard.client().await.unwrap();
        // A copied order is on its original's shard (same customer_id, routed by the router).
        let (copied, misplaced): (i64, i64) = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM orders o \
                 WHERE o.id = n.id - 10000 AND o.customer_id = n.customer_id)) \
                 FROM orders n WHERE n.id > 10000",
                &[],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        assert!(copied > 0, "no copied order on this shard");
        assert_eq!(misplaced, 0);
    }
    assert_eq!(
        cluster
            .count_on_each_shard("SELECT count(*) FROM countries")
            .await,
        vec![7; cluster.shards.len()]
    );
    let error = routed
        .execute(
            "INSERT INTO orders SELECT * FROM orders WHERE qty = 1 ON CONFLICT DO NOTHING",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error:?}");

    // COPY (query) TO STDOUT of queries the router merges: the same bytes as PostgreSQL's.
    for sql in [
        "COPY (SELECT region, count(*) FROM customers GROUP BY region ORDER BY region NULLS FIRST) TO STDOUT WITH (FORMAT csv, HEADER)",
        "COPY (SELECT id, name || E'\\t\\\\x\\n', NULL::text, '' FROM customers WHERE score > 90 ORDER BY id) TO STDOUT",
        "COPY (SELECT id, name, '' AS empty, NULL AS nothing, 'a,\"b\"' FROM customers ORDER BY id LIMIT 5) TO STDOUT (FORMAT csv)",
        "COPY (SELECT id, score FROM customers ORDER BY id DESC LIMIT 4) TO STDOUT WITH (DELIMITER '|', NULL 'none')",
    ] {
        assert_eq!(
            copy_out(&routed, sql).await,
            copy_out(&direct, sql).await,
            "{sql}"
        );
    }

    // Parameters: the same prepared statements, many bindings.
    let direct_statement = direct
        .prepare("SELECT id, name, score FROM customers WHERE id = $1")
        .await
        .unwrap();
    let routed_statement = routed
        .prepare("SELECT id, name, score FROM customers WHERE id = $1")
        .await
        .unwrap();
    for id in [1i64, 2, 99, 150, 200, 201] {
        let a: Vec<(i64, String, Option<i32>)> = direct
            .query(&direct_statement, &[&id])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let b: Vec<(i64, String, Option<i32>)> = routed
            .query(&routed_statement, &[&id])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(a, b, "id {id}");
    }
    // LIMIT and OFFSET as parameters (SQLAlchemy, Hibernate), NULL meaning no limit.
    let paged = [
        "SELECT id, name FROM customers ORDER BY id LIMIT $1 OFFSET $2",
        "SELECT region, count(*) FROM customers GROUP BY region ORDER BY region NULLS FIRST LIMIT $1 OFFSET $2",
        "SELECT id FROM customers WHERE score > 50 UNION ALL SELECT id FROM orders WHERE qty = 1 ORDER BY 1 LIMIT $1 OFFSET $2",
        "SELECT id FROM customers ORDER BY id OFFSET $2 ROWS FETCH FIRST $1 ROWS ONLY",
    ];
    for sql in paged {
        for (limit, offset) in [(Some(5i64), 3i64), (Some(0), 0), (None, 190), (Some(2), 0)] {
            let expected = direct.query(sql, &[&limit, &offset]).await.unwrap();
            let got = routed
                .query(sql, &[&limit, &offset])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            let raw = |rows: &[tokio_postgres::Row]| -> Vec<Vec<Option<common::Raw>>> {
                rows.iter()
                    .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
                    .collect()
            };
            assert_eq!(raw(&got), raw(&expected), "{sql} with {limit:?}, {offset}");
        }
    }
    let error = routed.query(paged[0], &[&-1i64, &0i64]).await.unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("2201W"), "{error:?}");
    let _ = connect; // used by other suites
}

/// Expressions over aggregates finished by a final statement: groups of a user type (its array
/// type read from the catalog), the client's parameters in the moved parts, binary results, and
/// a clear error for array-typed groups. Then DISTINCT and UNION deduplicating by value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_groups_and_distinct_values() {
    let cluster = Cluster::start(2).await;
    cluster.create_schema().await;
    let client = cluster.client().await;
    client
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
             ALTER TABLE customers ADD COLUMN mood mood, ADD COLUMN tags int[]",
        )
        .await
        .unwrap();
    let rows: Vec<String> = (1..=30)
        .map(|i| {
            let mood = ["sad", "ok", "happy"][i % 3];
            format!(
                "({i}, 'c{i}', 'r{}', {i}, '{mood}', ARRAY[{}])",
                i % 2,
                i % 2
            )
        })
        .collect();
    client
        .batch_execute(&format!(
            "INSERT INTO customers (id, name, region, score, mood, tags) VALUES {}",
            rows.join(", ")
        ))
        .await
        .unwrap();

    // Grouped by an enum, ordered by it (enum order, not text order).
    let got = text_rows(
        &client,
        "SELECT mood, count(*)::int, max(score) - min(score) AS spread FROM customers \
         GROUP BY mood ORDER BY mood DESC",
    )
    .await
    .unwrap();
    let expected: Vec<Vec<Option<String>>> = [("happy", "27"), ("ok", "27"), ("sad", "27")]
        .iter()
        .map(|(mood, spread)| {
            vec![
                Some(mood.to_string()),
                Some("10".into()),
                Some(spread.to_string()),
            ]
        })
        .collect();
    assert_eq!(got, expected);

    // The client's parameters, used by the shards (WHERE) and by the final statement (select
    // list, HAVING, LIMIT), bound in binary by tokio-postgres.
    let rows = client
        .query(
            "SELECT region, sum(score) * $1::int AS weighted FROM customers WHERE score > $2::int \
             GROUP BY region HAVING count(*) >= $3::bigint ORDER BY region LIMIT $4::bigint",
            &[&10i32, &4i32, &13i64, &5i64],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // score 5..=30: r0 holds the even ones (6..=30: 13 rows), r1 the odd ones (5..=29: 13 rows).
    let even: i64 = (6..=30).step_by(2).sum();
    let odd: i64 = (5..=29).step_by(2).sum();
    assert_eq!(got, vec![("r0".into(), even * 10), ("r1".into(), odd * 10)]);
    assert_eq!(rows[0].columns()[1].name(), "weighted");

    // A WITH query over sharded tables and its outer statement, each with the client's
    // parameters.
    let rows = client
        .query(
            "WITH t AS (SELECT region, count(*) AS n FROM customers WHERE score > $1::int \
             GROUP BY region) SELECT region, n, mood_count FROM t, \
             (SELECT count(DISTINCT mood) AS mood_count FROM customers) m WHERE n > $2::bigint \
             ORDER BY region",
            &[&5i32, &12i64],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got, vec![("r0".into(), 13, 3)]);

    // A subquery bound as a parameter, next to the client's own parameters.
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM customers WHERE score > (SELECT min(score) FROM customers \
             WHERE region = $1) AND id < $2",
            &[&"r0", &20i64],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 17);
    let error = client
        .simple_query("SELECT * FROM customers WHERE id = (SELECT id FROM customers)")
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("21000"), "{error:?}");

    // Array-typed groups do not pass through unnest: a clear error, the connection stays usable.
    let error = client
        .simple_query("SELECT tags, count(*)::int FROM customers GROUP BY tags")
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error:?}");
    // A shard's error in the final statement reaches the client with its SQLSTATE.
    let error = client
        .simple_query("SELECT sum(score) / (count(*) - 30) FROM customers")
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("22012"), "{error:?}");
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // A user-defined aggregate is an aggregate, not a function answered once per shard: one
    // made through the router is known at once, one made on the shards directly within the
    // router's refresh (every 2 s).
    client
        .batch_execute("CREATE AGGREGATE my_sum(int) (sfunc = int4pl, stype = int, initcond = '0')")
        .await
        .unwrap();
    let total: i64 = client
        .query_one("SELECT sum(score) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    let rows = text_rows(&client, "SELECT my_sum(score) FROM customers")
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Some(total.to_string())]]);
    let grouped = text_rows(
        &client,
        "SELECT region, my_sum(score) FROM customers GROUP BY region ORDER BY region",
    )
    .await
    .unwrap();
    let expected = text_rows(
        &client,
        "SELECT region, sum(score) FROM customers GROUP BY region ORDER BY region",
    )
    .await
    .unwrap();
    assert_eq!(grouped, expected);
    for shard in &cluster.shards {
        shard
            .client()
            .await
            .unwrap()
            .batch_execute(
                "CREATE AGGREGATE my_count(int) (sfunc = int4pl, stype = int, initcond = '0')",
            )
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let rows = text_rows(&client, "SELECT my_count(1) FROM customers")
            .await
            .unwrap();
        if rows == vec![vec![Some("30".to_string())]] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "my_count still answered per shard: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // DISTINCT and UNION across shards compare values: 1.0 from one shard and 1.00 from the
    // other are one numeric, as on a single PostgreSQL.
    let mut on_shard = Vec::new();
    for shard in &cluster.shards {
        let id: i64 = shard
            .client()
            .await
            .unwrap()
            .query_one("SELECT min(id) FROM customers", &[])
            .await
            .unwrap()
            .get(0);
        on_shard.push(id);
    }
    let (a, b) = (on_shard[0], on_shard[1]);
    for sql in [
        format!(
            "SELECT DISTINCT CASE WHEN id = {a} THEN 1.0 ELSE 1.00 END AS v FROM customers \
             WHERE id IN ({a}, {b})"
        ),
        format!(
            "SELECT CASE WHEN id = {a} THEN 1.0 ELSE 1.00 END AS v, count(*) FROM customers \
             WHERE id IN ({a}, {b}) GROUP BY 1"
        ),
        format!(
            "SELECT 1.0 AS v FROM customers WHERE id = {a} UNION SELECT 1.00 FROM customers \
             WHERE id = {b}"
        ),
        format!(
            "SELECT DISTINCT CASE WHEN id = {a} THEN '-0'::float8 ELSE 0 END AS v FROM customers \
             WHERE id IN ({a}, {b})"
        ),
    ] {
        let rows = text_rows(&client, &sql).await.unwrap();
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    }
}
