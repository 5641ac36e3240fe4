//! The TPC-H stage of `cargo xtask bench router`: the 22 queries as the specification writes
//! them, through pg-router (release build) over 2 shards and directly on one PostgreSQL holding
//! the same data, in one run. Prints per query the median time of each and their ratio, then
//! `tpch_ratio_max`, `tpch_ratio_geomean` and `tpch_correct` (answers equal to the direct ones),
//! and the router process's CPU time over the whole stage.
//!
//! Knobs: `BENCH_TPCH_SCALE` (default 0.1; 0 skips the stage), `BENCH_TPCH_SHARDS` (default 2),
//! `BENCH_TPCH_RUNS` (timed runs per query and target after one warm-up, default 3).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::SinkExt;
use testbed::{Postgres, tpch};

use super::{Guard, clock_ticks, env_or, process_cpu, wait_for_port};

type Rows = Vec<Vec<Option<String>>>;

/// Runs the stage and prints its figures.
pub fn run(dir: &Path) -> anyhow::Result<()> {
    let scale = std::env::var("BENCH_TPCH_SCALE").unwrap_or_else(|_| "0.1".into());
    if scale.parse::<f64>().unwrap_or(0.0) <= 0.0 {
        return Ok(());
    }
    let shard_count = env_or("BENCH_TPCH_SHARDS", 2).max(1) as usize;
    let runs = env_or("BENCH_TPCH_RUNS", 3).max(1) as usize;
    let data = tpch::generate(&scale)?;
    let options = testbed::PostgresOptions::default()
        .setting("max_prepared_transactions", 20)
        .setting("max_connections", 100)
        .setting("shared_buffers", "128MB");
    let direct = Postgres::start_with(options.clone())?;
    let shards: Vec<Postgres> = (0..shard_count)
        .map(|_| Postgres::start_with(options.clone()))
        .collect::<anyhow::Result<_>>()?;
    let (router, router_port) = start_router(&shards, dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let direct_client = connect(direct.port()).await?;
        let router_client = connect(router_port).await?;
        load(&direct_client, &data).await?;
        direct_client.batch_execute("ANALYZE").await?;
        load(&router_client, &data).await?;
        for shard in &shards {
            connect(shard.port())
                .await?
                .batch_execute("ANALYZE")
                .await?;
        }
        println!("tpch_scale={scale} tpch_shards={shard_count} tpch_runs={runs}");
        let cpu_before = process_cpu(router.0.id());
        let mut ratios = Vec::new();
        let mut correct = 0;
        for (i, sql) in tpch::QUERIES.iter().enumerate() {
            let number = i + 1;
            let expected = timed(&direct_client, sql).await?.1;
            let got = timed(&router_client, sql).await;
            match &got {
                Ok((_, rows)) if same(sql, rows, &expected) => correct += 1,
                Ok(_) => println!("tpch_q{number}_wrong_answer=1"),
                Err(error) => println!("tpch_q{number}_error=\"{error}\""),
            }
            if got.is_err() {
                continue;
            }
            let (mut direct_times, mut router_times) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                direct_times.push(timed(&direct_client, sql).await?.0);
                router_times.push(timed(&router_client, sql).await?.0);
            }
            let (direct_ms, router_ms) = (median_ms(direct_times), median_ms(router_times));
            let ratio = router_ms / direct_ms.max(0.001);
            ratios.push(ratio);
            println!("tpch_q{number}_direct_ms={direct_ms:.2}");
            println!("tpch_q{number}_router_ms={router_ms:.2}");
            println!("tpch_q{number}_ratio={ratio:.3}");
        }
        let cpu_ms = process_cpu(router.0.id()).saturating_sub(cpu_before) as f64 * 1000.0
            / clock_ticks() as f64;
        let geomean =
            (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len().max(1) as f64).exp();
        let max = ratios.iter().copied().fold(0.0, f64::max);
        println!("tpch_ratio_max={max:.3}");
        println!("tpch_ratio_geomean={geomean:.3}");
        println!("tpch_correct={correct}");
        println!("tpch_router_cpu_ms={cpu_ms:.0}");
        anyhow::Ok(())
    })?;
    drop(router);
    Ok(())
}

fn start_router(shards: &[Postgres], dir: &Path) -> anyhow::Result<(Guard, u16)> {
    let port = testbed::free_port();
    let mut config = format!(
        "listen = \"127.0.0.1:{port}\"\n{}\n[backend]\npool_size = 32\n",
        tpch::ROUTER_TOML
    );
    for (i, shard) in shards.iter().enumerate() {
        config.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\nport = {}\n",
            shard.port()
        ));
    }
    let path = dir.join("router-tpch.toml");
    std::fs::write(&path, config)?;
    let child = Command::new(env!("CARGO_BIN_EXE_pg-router"))
        .arg("--config")
        .arg(&path)
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting pg-router")?;
    let guard = Guard(child);
    wait_for_port(port)?;
    Ok((guard, port))
}

async fn connect(port: u16) -> anyhow::Result<tokio_postgres::Client> {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Creates the schema, copies the tables in, adds the keys.
async fn load(client: &tokio_postgres::Client, data: &Path) -> anyhow::Result<()> {
    client.batch_execute(tpch::SCHEMA).await?;
    for table in tpch::TABLES {
        let bytes = std::fs::read(data.join(format!("{table}.csv")))?;
        let sink = client.copy_in(&tpch::copy_statement(table)).await?;
        futures::pin_mut!(sink);
        for chunk in bytes.chunks(1 << 20) {
            sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
        }
        sink.finish().await?;
    }
    client.batch_execute(tpch::INDEXES).await?;
    Ok(())
}

/// One run of `sql`: its time and its rows (text).
async fn timed(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<(Duration, Rows)> {
    let start = Instant::now();
    let messages = client.simple_query(sql).await?;
    let elapsed = start.elapsed();
    let rows = messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    Ok((elapsed, rows))
}

/// Equal answers: in order where the query orders, as multisets otherwise.
fn same(sql: &str, got: &Rows, expected: &Rows) -> bool {
    let ordered = sql
        .to_lowercase()
        .rsplit_once(')')
        .map_or(sql.to_lowercase(), |(_, tail)| tail.to_string())
        .contains("order by");
    if ordered {
        return got == expected;
    }
    let (mut got, mut expected) = (got.clone(), expected.clone());
    got.sort();
    expected.sort();
    got == expected
}

fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1000.0
}
