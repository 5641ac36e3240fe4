//! TPC-H differential suite: the 22 queries as the specification writes them (and variants:
//! other aliases, JOIN instead of comma joins, prepared with parameters) give the same rows
//! through the router over 2 and over 4 shards (lineitem and orders sharded by order key, the
//! other tables reference tables) as directly on one PostgreSQL holding the same SF 0.1 data.
//!
//! Rows are compared exactly (TPC-H's results are numeric, not floating point), in order where
//! the query orders, as a multiset where it does not. The suite prints a line per query and
//! cluster; it fails unless every query and variant passes on both shard counts (22/22 as
//! written).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Raw, config_toml, connect, shard_options, start_shards, text_rows};
use futures::SinkExt;
use router::{Router, RouterConfig};
use testbed::{Postgres, tpch};

/// Longest a query may take through the router before it counts as failing (the shards'
/// `statement_timeout` stops its work there too).
const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// A query of the suite: its name, its text, and its parameters (empty: simple protocol).
struct Case {
    name: String,
    sql: String,
    params: Vec<String>,
}

/// The 22 queries, then the variants.
fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = tpch::QUERIES
        .iter()
        .enumerate()
        .map(|(i, sql)| Case {
            name: format!("Q{}", i + 1),
            sql: sql.to_string(),
            params: Vec::new(),
        })
        .collect();
    let variant = |name: &str, sql: &str| Case {
        name: name.to_string(),
        sql: sql.to_string(),
        params: Vec::new(),
    };
    let prepared = |name: &str, sql: &str, params: &[&str]| Case {
        name: name.to_string(),
        sql: sql.to_string(),
        params: params.iter().map(|p| p.to_string()).collect(),
    };
    cases.extend([
        variant(
            "Q3-join-aliases",
            "select l.l_orderkey, sum(l.l_extendedprice * (1 - l.l_discount)) as revenue, o.o_orderdate, o.o_shippriority
             from customer c join orders o on c.c_custkey = o.o_custkey join lineitem l on l.l_orderkey = o.o_orderkey
             where c.c_mktsegment = 'BUILDING' and o.o_orderdate < date '1995-03-15' and l.l_shipdate > date '1995-03-15'
             group by l.l_orderkey, o.o_orderdate, o.o_shippriority
             order by revenue desc, o.o_orderdate limit 10",
        ),
        variant(
            "Q4-aliases",
            "select o.o_orderpriority, count(*) as order_count from orders as o
             where o.o_orderdate >= date '1993-07-01' and o.o_orderdate < date '1993-07-01' + interval '3' month
               and exists (select * from lineitem as l where l.l_orderkey = o.o_orderkey and l.l_commitdate < l.l_receiptdate)
             group by o.o_orderpriority order by o.o_orderpriority",
        ),
        variant(
            "Q5-join",
            "select n_name, sum(l_extendedprice * (1 - l_discount)) as revenue
             from customer join orders on c_custkey = o_custkey join lineitem on l_orderkey = o_orderkey
               join supplier on l_suppkey = s_suppkey and c_nationkey = s_nationkey
               join nation on s_nationkey = n_nationkey join region on n_regionkey = r_regionkey
             where r_name = 'ASIA' and o_orderdate >= date '1994-01-01' and o_orderdate < date '1994-01-01' + interval '1' year
             group by n_name order by revenue desc",
        ),
        variant(
            "Q10-aliases",
            "select cu.c_custkey, cu.c_name, sum(li.l_extendedprice * (1 - li.l_discount)) as revenue, cu.c_acctbal, na.n_name, cu.c_address, cu.c_phone, cu.c_comment
             from customer cu, orders ord, lineitem li, nation na
             where cu.c_custkey = ord.o_custkey and li.l_orderkey = ord.o_orderkey and ord.o_orderdate >= date '1993-10-01'
               and ord.o_orderdate < date '1993-10-01' + interval '3' month and li.l_returnflag = 'R' and cu.c_nationkey = na.n_nationkey
             group by cu.c_custkey, cu.c_name, cu.c_acctbal, cu.c_phone, na.n_name, cu.c_address, cu.c_comment
             order by revenue desc limit 20",
        ),
        variant(
            "Q12-join",
            "select l_shipmode, sum(case when o_orderpriority = '1-URGENT' or o_orderpriority = '2-HIGH' then 1 else 0 end) as high_line_count,
               sum(case when o_orderpriority <> '1-URGENT' and o_orderpriority <> '2-HIGH' then 1 else 0 end) as low_line_count
             from orders join lineitem on o_orderkey = l_orderkey
             where l_shipmode in ('MAIL', 'SHIP') and l_commitdate < l_receiptdate and l_shipdate < l_commitdate
               and l_receiptdate >= date '1994-01-01' and l_receiptdate < date '1994-01-01' + interval '1' year
             group by l_shipmode order by l_shipmode",
        ),
        variant(
            "Q14-aliases",
            "select 100.00 * sum(case when p.p_type like 'PROMO%' then l.l_extendedprice * (1 - l.l_discount) else 0 end) / sum(l.l_extendedprice * (1 - l.l_discount)) as promo_revenue
             from lineitem l, part p
             where l.l_partkey = p.p_partkey and l.l_shipdate >= date '1995-09-01' and l.l_shipdate < date '1995-09-01' + interval '1' month",
        ),
        variant(
            "Q18-join",
            "select c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice, sum(l_quantity)
             from customer join orders on c_custkey = o_custkey join lineitem on o_orderkey = l_orderkey
             where o_orderkey in (select l_orderkey from lineitem group by l_orderkey having sum(l_quantity) > 300)
             group by c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice
             order by o_totalprice desc, o_orderdate limit 100",
        ),
        variant(
            "Q17-join-aliases",
            "select sum(l.l_extendedprice) / 7.0 as avg_yearly
             from lineitem l join part p on p.p_partkey = l.l_partkey
             where p.p_brand = 'Brand#23' and p.p_container = 'MED BOX'
               and (select 0.2 * avg(l2.l_quantity) from lineitem l2 where p.p_partkey = l2.l_partkey) > l.l_quantity",
        ),
        variant(
            "Q20-aliases",
            "select s.s_name, s.s_address from supplier s, nation n
             where s.s_suppkey in (
                 select ps.ps_suppkey from partsupp ps
                 where ps.ps_partkey in (select p_partkey from part where p_name like 'forest%')
                   and ps.ps_availqty > (select 0.5 * sum(li.l_quantity) from lineitem li
                     where li.l_partkey = ps.ps_partkey and li.l_suppkey = ps.ps_suppkey
                       and li.l_shipdate >= date '1994-01-01' and li.l_shipdate < date '1994-01-01' + interval '1' year))
               and s.s_nationkey = n.n_nationkey and n.n_name = 'CANADA'
             order by s.s_name",
        ),
        variant(
            "Q22-with",
            "with custsale as (
               select substring(c.c_phone from 1 for 2) as cntrycode, c.c_acctbal from customer c
               where substring(c.c_phone from 1 for 2) in ('13', '31', '23', '29', '30', '18', '17')
                 and c.c_acctbal > (select avg(c_acctbal) from customer where c_acctbal > 0.00 and substring(c_phone from 1 for 2) in ('13', '31', '23', '29', '30', '18', '17'))
                 and not exists (select * from orders o where o.o_custkey = c.c_custkey))
             select cntrycode, count(*) as numcust, sum(c_acctbal) as totacctbal from custsale group by cntrycode order by cntrycode",
        ),
        prepared(
            "Q17-prepared",
            "select sum(l_extendedprice) / 7.0 as avg_yearly from lineitem, part
             where p_partkey = l_partkey and p_brand = $1 and p_container = $2
               and l_quantity < (select $3::numeric * avg(l_quantity) from lineitem where l_partkey = p_partkey)",
            &["Brand#23", "MED BOX", "0.2"],
        ),
        prepared(
            "Q1-prepared",
            "select l_returnflag, l_linestatus, sum(l_quantity) as sum_qty, sum(l_extendedprice) as sum_base_price, avg(l_discount) as avg_disc, count(*) as count_order
             from lineitem where l_shipdate <= $1::date - $2::integer
             group by l_returnflag, l_linestatus order by l_returnflag, l_linestatus",
            &["1998-12-01", "90"],
        ),
        variant(
            "Q1-variances",
            "select l_returnflag, l_linestatus, stddev(l_quantity), var_samp(l_extendedprice),
                 stddev_pop(l_extendedprice * l_discount), var_pop(l_tax), stddev_samp(l_linenumber)
             from lineitem where l_shipdate <= date '1998-12-01' - interval '90' day
             group by l_returnflag, l_linestatus order by l_returnflag, l_linestatus",
        ),
        variant(
            "Q5-variances",
            "select n_name, stddev(o_totalprice), variance(l_quantity), count(*) from customer, orders, lineitem, nation
             where c_custkey = o_custkey and l_orderkey = o_orderkey and c_nationkey = n_nationkey and o_orderdate >= date '1994-01-01'
             group by n_name having stddev(l_discount) > 0.01 order by variance(l_quantity) desc, n_name limit 10",
        ),
        prepared(
            "Q3-prepared",
            "select l_orderkey, sum(l_extendedprice * (1 - l_discount)) as revenue, o_orderdate, o_shippriority
             from customer, orders, lineitem
             where c_mktsegment = $1 and c_custkey = o_custkey and l_orderkey = o_orderkey and o_orderdate < $2::date and l_shipdate > $2::date
             group by l_orderkey, o_orderdate, o_shippriority order by revenue desc, o_orderdate limit 10",
            &["BUILDING", "1995-03-15"],
        ),
        prepared(
            "Q6-prepared",
            "select sum(l_extendedprice * l_discount) as revenue from lineitem
             where l_shipdate >= $1::date and l_shipdate < $1::date + interval '1' year
               and l_discount between $2::numeric - 0.01 and $2::numeric + 0.01 and l_quantity < $3::numeric",
            &["1994-01-01", "0.06", "24"],
        ),
        prepared(
            "Q12-prepared",
            "select l_shipmode, count(*) from orders, lineitem
             where o_orderkey = l_orderkey and l_shipmode in ($1, $2) and l_receiptdate >= $3::date and l_receiptdate < $3::date + interval '1' year
             group by l_shipmode order by l_shipmode",
            &["MAIL", "SHIP", "1994-01-01"],
        ),
        prepared(
            "Q-orderkey-prepared",
            "select o_orderkey, o_totalprice, count(l_linenumber) from orders, lineitem
             where o_orderkey = l_orderkey and o_orderkey = $1::bigint group by o_orderkey, o_totalprice",
            &["4423"],
        ),
    ]);
    cases
}

/// What a query gave: rows (text, or binary bytes for prepared statements) or an error.
type Answer = Result<Vec<Vec<Option<String>>>, String>;

fn ordered(sql: &str) -> bool {
    sql.to_lowercase()
        .rsplit_once(')')
        .map_or(sql.to_lowercase(), |(_, tail)| tail.to_string())
        .contains("order by")
}

async fn answer(client: &tokio_postgres::Client, case: &Case) -> Answer {
    let error = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    if case.params.is_empty() {
        return text_rows(client, &case.sql).await.map_err(error);
    }
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = case
        .params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    // Parameters go as text (`$n` untyped or cast in the statement): prepared with unknown types.
    let statement = client
        .prepare_typed(
            &case.sql,
            &vec![tokio_postgres::types::Type::TEXT; case.params.len()],
        )
        .await
        .map_err(error)?;
    let rows = client.query(&statement, &params).await.map_err(error)?;
    Ok(rows
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|i| {
                    row.get::<_, Option<Raw>>(i)
                        .map(|raw| format!("{:02x?}", raw.0))
                })
                .collect()
        })
        .collect())
}

/// Compares the router's answer with the direct one; `None` when equal.
fn difference(case: &Case, expected: &Answer, got: &Answer) -> Option<String> {
    let expected = match expected {
        Ok(rows) => rows,
        Err(error) => return Some(format!("direct PostgreSQL failed: {error}")),
    };
    let got = match got {
        Ok(rows) => rows,
        Err(error) => return Some(error.clone()),
    };
    let (mut expected, mut got) = (expected.clone(), got.clone());
    if !ordered(&case.sql) {
        expected.sort();
        got.sort();
    }
    if expected == got {
        return None;
    }
    if expected.len() != got.len() {
        return Some(format!(
            "wrong answer: {} rows instead of {}",
            got.len(),
            expected.len()
        ));
    }
    let at = expected
        .iter()
        .zip(&got)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    Some(format!(
        "wrong answer: row {at} is {:?}, expected {:?}",
        got[at], expected[at]
    ))
}

/// Creates the schema through `client` (broadcast by a router), loads the files, adds the keys
/// and refreshes the statistics.
async fn load(client: &tokio_postgres::Client, data: &Path) {
    client
        .batch_execute(tpch::SCHEMA)
        .await
        .expect("creating the TPC-H schema");
    for table in tpch::TABLES {
        let bytes = std::fs::read(data.join(format!("{table}.csv"))).expect("reading the data");
        let sink = client
            .copy_in(&tpch::copy_statement(table))
            .await
            .unwrap_or_else(|e| panic!("COPY {table}: {e}"));
        futures::pin_mut!(sink);
        for chunk in bytes.chunks(1 << 20) {
            sink.send(Bytes::copy_from_slice(chunk))
                .await
                .unwrap_or_else(|e| panic!("COPY {table}: {e}"));
        }
        sink.finish()
            .await
            .unwrap_or_else(|e| panic!("COPY {table}: {e}"));
    }
    client
        .batch_execute(tpch::INDEXES)
        .await
        .expect("adding the TPC-H keys");
}

struct Sharded {
    shards: Vec<Postgres>,
    router: Router,
}

async fn sharded(count: usize, data: &Path) -> Sharded {
    let options = shard_options().setting("statement_timeout", "20s");
    let shards = tokio::task::block_in_place(|| start_shards(count, options));
    let config =
        RouterConfig::from_toml(&config_toml(&shards, tpch::ROUTER_TOML)).expect("router config");
    let router = Router::start(config, None)
        .await
        .expect("starting the router");
    let client = connect(&router_url(&router)).await;
    load(&client, data).await;
    for shard in &shards {
        let client = shard.client().await.expect("shard client");
        client.batch_execute("ANALYZE").await.expect("ANALYZE");
    }
    Sharded { shards, router }
}

fn router_url(router: &Router) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        router.address().port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_queries_answer_as_on_one_postgresql() {
    let started = Instant::now();
    let data = tokio::task::block_in_place(|| tpch::generate("0.1")).expect("TPC-H data");
    let direct = tokio::task::block_in_place(|| Postgres::start_with(shard_options()))
        .expect("starting PostgreSQL");
    let client = direct.client().await.expect("direct client");
    load(&client, &data).await;
    client.batch_execute("ANALYZE").await.expect("ANALYZE");
    let cases = cases();
    let mut expected = Vec::new();
    for case in &cases {
        expected.push(answer(&client, case).await);
    }
    eprintln!("loaded and answered directly in {:?}", started.elapsed());

    let mut passing: BTreeMap<String, usize> = BTreeMap::new();
    let mut summary = Vec::new();
    for count in [2, 4] {
        let loading = Instant::now();
        let cluster = sharded(count, &data).await;
        eprintln!("{count} shards loaded in {:?}", loading.elapsed());
        let mut passed = 0;
        let mut as_written = 0;
        for (case, expected) in cases.iter().zip(&expected) {
            let client = connect(&router_url(&cluster.router)).await;
            let start = Instant::now();
            let got = tokio::time::timeout(QUERY_TIMEOUT, answer(&client, case))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {QUERY_TIMEOUT:?}")));
            let elapsed = start.elapsed();
            match difference(case, expected, &got) {
                None => {
                    passed += 1;
                    if !case.name.contains('-') {
                        as_written += 1;
                    }
                    *passing.entry(case.name.clone()).or_default() += 1;
                    eprintln!("{count} shards {:<22} pass ({elapsed:.2?})", case.name);
                }
                Some(why) => {
                    let why: String = why.chars().take(300).collect();
                    eprintln!("{count} shards {:<22} FAIL {why}", case.name);
                }
            }
        }
        summary.push(format!(
            "{count} shards: {as_written}/22 as written, {passed}/{} with variants",
            cases.len()
        ));
        drop(cluster.router);
        drop(cluster.shards);
    }
    for line in &summary {
        eprintln!("TPC-H {line}");
    }
    eprintln!("total {:?}", started.elapsed());
    let failing: Vec<&str> = cases
        .iter()
        .map(|case| case.name.as_str())
        .filter(|name| passing.get(*name).copied().unwrap_or(0) < 2)
        .collect();
    assert!(
        failing.is_empty(),
        "queries that do not answer as on one PostgreSQL on 2 and 4 shards: {failing:?}"
    );
}
