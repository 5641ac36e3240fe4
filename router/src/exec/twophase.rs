//! Two-phase commit for transactions that wrote on several shards.
//!
//! Protocol (the router keeps no state of its own):
//! 1. every participant but the coordinator (the lowest shard index) runs
//!    `PREPARE TRANSACTION 'pgr_<gxid>_<coordinator>_<shard>'`;
//! 2. the coordinator inserts `(gxid, 'commit')` into `pgrouter.decisions` inside its own
//!    transaction and commits it: that commit is the decision;
//! 3. the other participants run `COMMIT PREPARED`; the decision row is then deleted.
//!
//! Any router resolves in-doubt transactions (on start and periodically): for each prepared
//! `pgr_` transaction older than a few seconds it inserts `(gxid, 'abort')` on the coordinator
//! (`ON CONFLICT DO NOTHING`) and reads the row back. The primary key makes the coordinator's
//! commit and the resolver's abort mutually exclusive, so a prepared branch is committed exactly
//! when the coordinator committed. Transaction ids are deterministic (they name their
//! coordinator), so no router-local log is needed.
//!
//! Isolation: each shard gives READ COMMITTED (or the level the client set) on its own; there is
//! no global snapshot. A reader can see one shard's part of a cross-shard transaction before
//! another's (between the coordinator's commit and COMMIT PREPARED elsewhere). Atomicity holds:
//! either every shard's part commits or none does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::backend::connection::BackendError;
use crate::backend::pool::{Leased, Pools};
use crate::error::RouterError;
use crate::metrics::Metrics;
use crate::plan::quote_literal;

/// DDL of the decision table, run on every shard at start (idempotent).
pub const DECISION_DDL: &str = "CREATE SCHEMA IF NOT EXISTS pgrouter; \
     CREATE TABLE IF NOT EXISTS pgrouter.decisions (\
       gxid text PRIMARY KEY, \
       outcome text NOT NULL CHECK (outcome IN ('commit', 'abort')), \
       decided_at timestamptz NOT NULL DEFAULT now())";

/// Prefix of every gid the router prepares.
pub const GID_PREFIX: &str = "pgr_";

/// Makes global transaction ids: unique per router process and per transaction.
#[derive(Debug)]
pub struct GxidSource {
    instance: u64,
    counter: AtomicU64,
}

impl Default for GxidSource {
    fn default() -> Self {
        Self {
            instance: rand::random::<u64>(),
            counter: AtomicU64::new(0),
        }
    }
}

impl GxidSource {
    /// The next global transaction id.
    pub fn next(&self) -> String {
        format!(
            "{:016x}{:08x}",
            self.instance,
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// The gid of `shard`'s branch of transaction `gxid` coordinated by `coordinator`.
pub fn gid(gxid: &str, coordinator: usize, shard: usize) -> String {
    format!("{GID_PREFIX}{gxid}_{coordinator}_{shard}")
}

/// Parses a gid back into (gxid, coordinator shard).
pub fn parse_gid(gid: &str) -> Option<(String, usize)> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let mut parts = rest.split('_');
    let gxid = parts.next()?.to_string();
    let coordinator = parts.next()?.parse().ok()?;
    let _shard: usize = parts.next()?.parse().ok()?;
    Some((gxid, coordinator))
}

/// Fault injection for tests: `PG_ROUTER_FAULT=crash_after_prepare` aborts the process after
/// the PREPARE phase.
fn crash_point(name: &str) {
    if std::env::var("PG_ROUTER_FAULT").is_ok_and(|v| v == name) {
        tracing::error!(fault = name, "fault injection: aborting the router");
        std::process::abort();
    }
}

async fn exec(connection: &Arc<Mutex<Leased>>, sql: &str) -> Result<(), BackendError> {
    let mut guard = connection.lock().await;
    let result = guard.query_text(sql).await;
    if let Err(error) = &result
        && error.is_connection_lost()
    {
        guard.discard();
    }
    result.map(|_| ())
}

/// Commits a transaction whose participants are `participants` (shard index, connection, all
/// inside an open transaction), with 2PC when there are several.
pub async fn commit(
    participants: Vec<(usize, Arc<Mutex<Leased>>)>,
    gxids: &GxidSource,
    metrics: &Metrics,
) -> Result<(), RouterError> {
    if participants.len() <= 1 {
        if let Some((_, connection)) = participants.first() {
            exec(connection, "COMMIT").await?;
        }
        return Ok(());
    }
    let coordinator = participants
        .iter()
        .map(|(s, _)| *s)
        .min()
        .expect("participants");
    let gxid = gxids.next();
    let others: Vec<&(usize, Arc<Mutex<Leased>>)> = participants
        .iter()
        .filter(|(s, _)| *s != coordinator)
        .collect();
    let coordinator_connection = &participants
        .iter()
        .find(|(s, _)| *s == coordinator)
        .expect("coordinator")
        .1;

    // Phase 1: prepare every other participant.
    let prepares = others.iter().map(|(shard, connection)| {
        let sql = format!(
            "PREPARE TRANSACTION {}",
            quote_literal(&gid(&gxid, coordinator, *shard))
        );
        async move { (*shard, exec(connection, &sql).await) }
    });
    let results = futures::future::join_all(prepares).await;
    let failed = results
        .iter()
        .find_map(|(_, r)| r.as_ref().err().map(|e| e.to_string()));
    if let Some(message) = failed {
        // Abort everything: prepared branches are rolled back, the others are aborted.
        for ((shard, result), (_, connection)) in results.iter().zip(&others) {
            if result.is_ok() {
                let sql = format!(
                    "ROLLBACK PREPARED {}",
                    quote_literal(&gid(&gxid, coordinator, *shard))
                );
                let _ = exec(connection, &sql).await;
            } else {
                let _ = exec(connection, "ROLLBACK").await;
            }
        }
        let _ = exec(coordinator_connection, "ROLLBACK").await;
        metrics.two_phase("aborted");
        return Err(RouterError::session(
            "40001",
            format!("cross-shard transaction rolled back: a shard failed to prepare: {message}"),
        ));
    }
    crash_point("crash_after_prepare");

    // Phase 2: the decision is the coordinator's commit of its decision row.
    let decision = format!(
        "INSERT INTO pgrouter.decisions (gxid, outcome) VALUES ({}, 'commit')",
        quote_literal(&gxid)
    );
    let decided = match exec(coordinator_connection, &decision).await {
        Ok(()) => exec(coordinator_connection, "COMMIT").await,
        Err(error) => {
            let _ = exec(coordinator_connection, "ROLLBACK").await;
            Err(error)
        }
    };
    match decided {
        Ok(()) => {}
        Err(error) if !error.is_connection_lost() => {
            for (shard, connection) in &others {
                let sql = format!(
                    "ROLLBACK PREPARED {}",
                    quote_literal(&gid(&gxid, coordinator, *shard))
                );
                let _ = exec(connection, &sql).await;
            }
            metrics.two_phase("aborted");
            return Err(RouterError::session(
                "40001",
                format!("cross-shard transaction rolled back: {error}"),
            ));
        }
        Err(error) => {
            metrics.two_phase("in_doubt");
            return Err(RouterError::session(
                "08007",
                format!(
                    "cross-shard transaction {gxid} in doubt (lost the coordinator shard during commit: {error}); \
                     the router resolves it from the decision record"
                ),
            ));
        }
    }
    crash_point("crash_after_decision");
    let mut all_committed = true;
    for (shard, connection) in &others {
        let sql = format!(
            "COMMIT PREPARED {}",
            quote_literal(&gid(&gxid, coordinator, *shard))
        );
        if let Err(error) = exec(connection, &sql).await {
            tracing::warn!(shard, %error, gxid, "COMMIT PREPARED failed; the resolver will finish it");
            all_committed = false;
        }
    }
    if all_committed {
        let cleanup = format!(
            "DELETE FROM pgrouter.decisions WHERE gxid = {}",
            quote_literal(&gxid)
        );
        let _ = exec(coordinator_connection, &cleanup).await;
    }
    metrics.two_phase("committed");
    Ok(())
}

/// Creates the decision table on every reachable shard.
pub async fn ensure_decision_tables(pools: &Pools) {
    for pool in &pools.shards {
        match pool.get().await {
            Ok(mut connection) => {
                if let Err(error) = connection.query_text(DECISION_DDL).await {
                    tracing::warn!(shard = pool.endpoint().name, %error, "creating pgrouter.decisions");
                }
            }
            Err(error) => tracing::warn!(shard = pool.endpoint().name, %error, "shard unreachable"),
        }
    }
}

/// Resolves in-doubt prepared transactions older than `min_age` on every shard; returns how
/// many were resolved.
pub async fn resolve_in_doubt(pools: &Pools, min_age: Duration, metrics: &Metrics) -> usize {
    let mut resolved = 0;
    for pool in &pools.shards {
        let Ok(mut connection) = pool.get().await else {
            continue;
        };
        let query = format!(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'pgr\\_%' \
             AND database = current_database() AND prepared < now() - interval '{} milliseconds'",
            min_age.as_millis()
        );
        let Ok(rows) = connection.query_text(&query).await else {
            continue;
        };
        drop(connection);
        for row in rows {
            let Some(Some(gid_text)) = row.into_iter().next() else {
                continue;
            };
            let Some((gxid, coordinator)) = parse_gid(&gid_text) else {
                continue;
            };
            let Some(coordinator_pool) = pools.shards.get(coordinator) else {
                continue;
            };
            let Ok(mut coordinator_connection) = coordinator_pool.get().await else {
                continue;
            };
            let decide = format!(
                "INSERT INTO pgrouter.decisions (gxid, outcome) VALUES ({}, 'abort') ON CONFLICT (gxid) DO NOTHING; \
                 SELECT outcome FROM pgrouter.decisions WHERE gxid = {}",
                quote_literal(&gxid),
                quote_literal(&gxid)
            );
            let Ok(outcome) = coordinator_connection.query_text(&decide).await else {
                continue;
            };
            drop(coordinator_connection);
            let commit = outcome
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .is_some_and(|o| o == "commit");
            let Ok(mut connection) = pool.get().await else {
                continue;
            };
            let sql = format!(
                "{} PREPARED {}",
                if commit { "COMMIT" } else { "ROLLBACK" },
                quote_literal(&gid_text)
            );
            match connection.query_text(&sql).await {
                Ok(_) => {
                    resolved += 1;
                    metrics.two_phase(if commit {
                        "recovered_commit"
                    } else {
                        "recovered_abort"
                    });
                    tracing::info!(gid = gid_text, commit, "resolved an in-doubt transaction");
                }
                Err(error) => {
                    tracing::warn!(gid = gid_text, %error, "resolving an in-doubt transaction")
                }
            }
        }
    }
    resolved
}
