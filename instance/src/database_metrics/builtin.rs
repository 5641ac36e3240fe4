//! The built-in queries: what a DBA reads first, under postgres_exporter's names where the figure
//! is the same and under `pg_instance_` otherwise (README, "Monitoring", has the mapping).
//! Written for PostgreSQL 18 (the operator refuses older majors).

use super::query::{Column, Query};

/// How many statements of `pg_stat_statements` are exported (by total execution time).
pub const STATEMENTS_TOP: usize = 20;

/// The built-in queries, in the order they run.
pub fn queries() -> Vec<Query> {
    vec![
        role(),
        settings(),
        database_size(),
        database_wraparound(),
        stat_database(),
        activity(),
        long_transactions(),
        oldest_xmin(),
        locks(),
        stat_replication(),
        standby_lag(),
        replica(),
        replication_slots(),
        wal(),
        wal_directory(),
        archiver(),
        checkpointer(),
        bgwriter(),
        stat_io(),
        statements(),
    ]
}

fn role() -> Query {
    Query::new(
        "role",
        "SELECT NOT pg_is_in_recovery() AS is_primary, pg_is_in_recovery() AS is_replica, \
         (SELECT timeline_id FROM pg_control_checkpoint()) AS timeline, \
         extract(epoch FROM pg_postmaster_start_time()) AS start_time",
        vec![
            Column::gauge(
                "is_primary",
                "pg_instance_is_primary",
                "1 when PostgreSQL runs as a primary (not in recovery)",
            ),
            Column::gauge(
                "is_replica",
                "pg_replication_is_replica",
                "1 when PostgreSQL is in recovery (a replica)",
            ),
            Column::gauge(
                "timeline",
                "pg_instance_checkpoint_timeline",
                "Timeline of the last checkpoint (pg_control_checkpoint)",
            ),
            Column::gauge(
                "start_time",
                "pg_postmaster_start_time_seconds",
                "Time at which PostgreSQL started (Unix seconds)",
            ),
        ],
    )
}

fn settings() -> Query {
    Query::new(
        "settings",
        "SELECT current_setting('max_connections') AS max_connections, \
         current_setting('superuser_reserved_connections') AS superuser_reserved_connections, \
         current_setting('reserved_connections') AS reserved_connections",
        vec![
            Column::gauge(
                "max_connections",
                "pg_settings_max_connections",
                "Server setting max_connections",
            ),
            Column::gauge(
                "superuser_reserved_connections",
                "pg_settings_superuser_reserved_connections",
                "Server setting superuser_reserved_connections",
            ),
            Column::gauge(
                "reserved_connections",
                "pg_settings_reserved_connections",
                "Server setting reserved_connections",
            ),
        ],
    )
}

fn database_size() -> Query {
    Query::new(
        "database_size",
        "SELECT datname, pg_database_size(oid) AS size_bytes, datconnlimit AS connection_limit \
         FROM pg_database WHERE datallowconn",
        vec![
            Column::label("datname"),
            Column::gauge(
                "size_bytes",
                "pg_database_size_bytes",
                "Disk space used by the database",
            ),
            Column::gauge(
                "connection_limit",
                "pg_database_connection_limit",
                "Connection limit of the database (-1: none)",
            ),
        ],
    )
}

fn database_wraparound() -> Query {
    Query::new(
        "database_wraparound",
        "SELECT datname, age(datfrozenxid) AS age_datfrozenxid, \
         mxid_age(datminmxid) AS age_datminmxid FROM pg_database",
        vec![
            Column::label("datname"),
            Column::gauge(
                "age_datfrozenxid",
                "pg_database_wraparound_age_datfrozenxid_seconds",
                "Age of the oldest unfrozen transaction id of the database, in transactions \
                 (postgres_exporter's name; the unit is transactions, not seconds)",
            ),
            Column::gauge(
                "age_datminmxid",
                "pg_database_wraparound_age_datminmxid_seconds",
                "Age of the oldest multixact id of the database, in multixacts",
            ),
        ],
    )
}

fn stat_database() -> Query {
    Query::new(
        "stat_database",
        "SELECT datid::text AS datid, datname, numbackends, xact_commit, xact_rollback, \
         blks_read, blks_hit, tup_returned, tup_fetched, tup_inserted, tup_updated, tup_deleted, \
         conflicts, temp_files, temp_bytes, deadlocks \
         FROM pg_stat_database WHERE datname IS NOT NULL",
        [
            ("xact_commit", "Transactions committed"),
            ("xact_rollback", "Transactions rolled back"),
            ("blks_read", "Disk blocks read"),
            ("blks_hit", "Disk blocks found in shared buffers"),
            (
                "tup_returned",
                "Live rows fetched by sequential scans and index entries returned",
            ),
            ("tup_fetched", "Live rows fetched by index scans"),
            ("tup_inserted", "Rows inserted"),
            ("tup_updated", "Rows updated"),
            ("tup_deleted", "Rows deleted"),
            ("conflicts", "Queries canceled by recovery conflicts"),
            ("temp_files", "Temporary files created"),
            ("temp_bytes", "Bytes written to temporary files"),
            ("deadlocks", "Deadlocks detected"),
        ]
        .into_iter()
        .map(|(column, help)| Column::untyped(column, &format!("pg_stat_database_{column}"), help))
        .chain([
            Column::label("datid"),
            Column::label("datname"),
            Column::gauge(
                "numbackends",
                "pg_stat_database_numbackends",
                "Backends connected to the database",
            ),
        ])
        .collect(),
    )
}

fn activity() -> Query {
    Query::new(
        "activity",
        "SELECT coalesce(datname, '') AS datname, coalesce(state, '') AS state, backend_type, \
         count(*) AS count, \
         coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0) AS max_tx_duration \
         FROM pg_stat_activity GROUP BY 1, 2, 3",
        vec![
            Column::label("datname"),
            Column::label("state"),
            Column::label("backend_type"),
            Column::gauge(
                "count",
                "pg_stat_activity_count",
                "Connections (backends) in this state",
            ),
            Column::gauge(
                "max_tx_duration",
                "pg_stat_activity_max_tx_duration",
                "Longest open transaction of backends in this state, in seconds",
            ),
        ],
    )
}

fn long_transactions() -> Query {
    Query::new(
        "long_running_transactions",
        "SELECT count(*) AS transactions, \
         coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0) AS oldest \
         FROM pg_stat_activity \
         WHERE state IS DISTINCT FROM 'idle' AND xact_start IS NOT NULL \
         AND backend_type = 'client backend'",
        vec![
            Column::gauge(
                "transactions",
                "pg_long_running_transactions",
                "Open client transactions",
            ),
            Column::gauge(
                "oldest",
                "pg_long_running_transactions_oldest_timestamp_seconds",
                "Age of the longest open client transaction, in seconds",
            ),
        ],
    )
}

fn oldest_xmin() -> Query {
    Query::new(
        "oldest_xmin",
        "SELECT 'backend' AS source, max(age(backend_xmin)) AS age FROM pg_stat_activity \
         UNION ALL SELECT 'replication_slot', max(age(xmin)) FROM pg_replication_slots \
         UNION ALL SELECT 'replication_slot_catalog', max(age(catalog_xmin)) FROM pg_replication_slots \
         UNION ALL SELECT 'prepared_transaction', max(age(transaction)) FROM pg_prepared_xacts",
        vec![
            Column::label("source"),
            Column::gauge(
                "age",
                "pg_instance_oldest_xmin_age",
                "Age, in transactions, of the oldest xmin that holds back vacuum, by what holds it",
            ),
        ],
    )
}

fn locks() -> Query {
    Query::new(
        "locks",
        "SELECT d.datname, m.mode, coalesce(l.count, 0) AS count \
         FROM (VALUES ('accesssharelock'), ('rowsharelock'), ('rowexclusivelock'), \
         ('shareupdateexclusivelock'), ('sharelock'), ('sharerowexclusivelock'), \
         ('exclusivelock'), ('accessexclusivelock'), ('sireadlock')) AS m(mode) \
         CROSS JOIN pg_database d \
         LEFT JOIN (SELECT database, lower(mode) AS mode, count(*) AS count FROM pg_locks \
         WHERE database IS NOT NULL GROUP BY 1, 2) l ON l.database = d.oid AND l.mode = m.mode",
        vec![
            Column::label("datname"),
            Column::label("mode"),
            Column::gauge("count", "pg_locks_count", "Locks held or awaited, by mode"),
        ],
    )
}

fn stat_replication() -> Query {
    Query::new(
        "stat_replication",
        "SELECT r.application_name, coalesce(host(r.client_addr), '') AS client_addr, r.state, \
         coalesce(s.slot_name, '') AS slot_name, \
         pg_current_wal_lsn() - '0/0' AS current_wal_lsn_bytes, \
         pg_current_wal_lsn() - r.replay_lsn AS wal_lsn_diff \
         FROM pg_stat_replication r LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid \
         WHERE NOT pg_is_in_recovery()",
        vec![
            Column::label("application_name"),
            Column::label("client_addr"),
            Column::label("state"),
            Column::label("slot_name"),
            Column::gauge(
                "current_wal_lsn_bytes",
                "pg_stat_replication_pg_current_wal_lsn_bytes",
                "WAL position of the primary, in bytes",
            ),
            Column::gauge(
                "wal_lsn_diff",
                "pg_stat_replication_pg_wal_lsn_diff",
                "WAL the standby has not replayed yet, in bytes",
            ),
        ],
    )
}

fn standby_lag() -> Query {
    Query::new(
        "standby_lag",
        "SELECT application_name, sync_state, \
         pg_current_wal_lsn() - sent_lsn AS sent_bytes, \
         pg_current_wal_lsn() - write_lsn AS write_bytes, \
         pg_current_wal_lsn() - flush_lsn AS flush_bytes, \
         pg_current_wal_lsn() - replay_lsn AS replay_bytes, \
         coalesce(extract(epoch FROM write_lag), 0) AS write_seconds, \
         coalesce(extract(epoch FROM flush_lag), 0) AS flush_seconds, \
         coalesce(extract(epoch FROM replay_lag), 0) AS replay_seconds, \
         (state = 'streaming') AS streaming \
         FROM pg_stat_replication WHERE NOT pg_is_in_recovery()",
        vec![
            Column::label("application_name"),
            Column::label("sync_state"),
            Column::gauge(
                "streaming",
                "pg_instance_standby_streaming",
                "1 when the standby streams (0 while it catches up or backs up)",
            ),
        ]
        .into_iter()
        .chain(["sent", "write", "flush", "replay"].map(|stage| {
            Column::gauge(
                &format!("{stage}_bytes"),
                "pg_instance_standby_lag_bytes",
                "WAL of the primary the standby has not reached yet at this stage, in bytes",
            )
            .with_label("stage", stage)
        }))
        .chain(["write", "flush", "replay"].map(|stage| {
            Column::gauge(
                &format!("{stage}_seconds"),
                "pg_instance_standby_lag_seconds",
                "Time the standby took to reach this stage for recent WAL (0 when idle)",
            )
            .with_label("stage", stage)
        }))
        .collect(),
    )
}

fn replica() -> Query {
    Query::new(
        "replica",
        "SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
         ELSE greatest(0, extract(epoch FROM now() - pg_last_xact_replay_timestamp())) END AS lag, \
         greatest(0, extract(epoch FROM now() - pg_last_xact_replay_timestamp())) AS last_replay, \
         pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn() AS replay_pending_bytes, \
         (SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming') AS streaming \
         WHERE pg_is_in_recovery()",
        vec![
            Column::gauge(
                "lag",
                "pg_replication_lag_seconds",
                "Replica: age of the last replayed transaction while WAL is waiting to be replayed",
            ),
            Column::gauge(
                "last_replay",
                "pg_replication_last_replay_seconds",
                "Replica: age of the last replayed transaction",
            ),
            Column::gauge(
                "replay_pending_bytes",
                "pg_instance_replica_replay_pending_bytes",
                "Replica: WAL received but not replayed yet, in bytes",
            ),
            Column::gauge(
                "streaming",
                "pg_instance_replica_streaming",
                "Replica: 1 when the WAL receiver streams from the primary",
            ),
        ],
    )
}

fn replication_slots() -> Query {
    Query::new(
        "replication_slots",
        "SELECT slot_name, slot_type, coalesce(database, '') AS database, \
         coalesce(wal_status, '') AS wal_status, active, \
         CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() - restart_lsn \
         ELSE pg_current_wal_lsn() - restart_lsn END AS retained_bytes, \
         safe_wal_size FROM pg_replication_slots",
        vec![
            Column::label("slot_name"),
            Column::label("slot_type"),
            Column::label("database"),
            Column::label("wal_status"),
            Column::gauge(
                "active",
                "pg_replication_slots_active",
                "1 when a consumer is connected to the slot",
            ),
            Column::gauge(
                "retained_bytes",
                "pg_replication_slots_pg_wal_lsn_diff",
                "WAL the slot retains (from its restart_lsn to the current position), in bytes",
            ),
            Column::gauge(
                "safe_wal_size",
                "pg_replication_slots_safe_wal_size_bytes",
                "WAL that can still be written before the slot is lost (max_slot_wal_keep_size)",
            ),
        ],
    )
}

fn wal() -> Query {
    Query::new(
        "stat_wal",
        "SELECT wal_records, wal_fpi, wal_bytes, wal_buffers_full FROM pg_stat_wal",
        vec![
            Column::counter(
                "wal_records",
                "pg_instance_stat_wal_records_total",
                "WAL records generated",
            ),
            Column::counter(
                "wal_fpi",
                "pg_instance_stat_wal_fpi_total",
                "WAL full page images generated",
            ),
            Column::counter(
                "wal_bytes",
                "pg_instance_stat_wal_bytes_total",
                "WAL generated, in bytes",
            ),
            Column::counter(
                "wal_buffers_full",
                "pg_instance_stat_wal_buffers_full_total",
                "Times WAL was written because the WAL buffers were full",
            ),
        ],
    )
}

fn wal_directory() -> Query {
    Query::new(
        "wal_directory",
        "SELECT count(*) AS segments, coalesce(sum(size), 0) AS size FROM pg_ls_waldir() \
         WHERE name ~ '^[0-9A-F]{24}$'",
        vec![
            Column::gauge("segments", "pg_wal_segments", "WAL segments in pg_wal"),
            Column::gauge(
                "size",
                "pg_wal_size_bytes",
                "Size of the WAL segments in pg_wal",
            ),
        ],
    )
}

fn archiver() -> Query {
    Query::new(
        "stat_archiver",
        "SELECT archived_count, failed_count, \
         extract(epoch FROM now() - last_archived_time) AS last_archive_age, \
         extract(epoch FROM now() - last_failed_time) AS last_failure_age, \
         (last_failed_time IS NOT NULL AND (last_archived_time IS NULL \
          OR last_failed_time > last_archived_time)) AS failing, \
         (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready') AS ready \
         FROM pg_stat_archiver",
        vec![
            Column::untyped(
                "archived_count",
                "pg_stat_archiver_archived_count",
                "WAL files archived",
            ),
            Column::untyped(
                "failed_count",
                "pg_stat_archiver_failed_count",
                "Failed attempts to archive a WAL file",
            ),
            Column::gauge(
                "last_archive_age",
                "pg_stat_archiver_last_archive_age",
                "Seconds since a WAL file was last archived",
            ),
            Column::gauge(
                "last_failure_age",
                "pg_instance_stat_archiver_last_failure_age_seconds",
                "Seconds since archiving last failed",
            ),
            Column::gauge(
                "failing",
                "pg_instance_stat_archiver_failing",
                "1 when the last archiving attempt failed (no success since the last failure)",
            ),
            Column::gauge(
                "ready",
                "pg_instance_stat_archiver_ready_segments",
                "WAL files waiting to be archived (.ready in archive_status)",
            ),
        ],
    )
}

fn checkpointer() -> Query {
    Query::new(
        "stat_checkpointer",
        "SELECT num_timed, num_requested, num_done, restartpoints_timed, restartpoints_req, \
         restartpoints_done, write_time, sync_time, buffers_written, slru_written, \
         extract(epoch FROM stats_reset) AS stats_reset FROM pg_stat_checkpointer",
        vec![
            Column::counter(
                "num_timed",
                "pg_stat_checkpointer_num_timed_total",
                "Scheduled checkpoints",
            ),
            Column::counter(
                "num_requested",
                "pg_stat_checkpointer_num_requested_total",
                "Requested checkpoints",
            ),
            Column::counter(
                "num_done",
                "pg_instance_stat_checkpointer_num_done_total",
                "Checkpoints performed",
            ),
            Column::counter(
                "restartpoints_timed",
                "pg_stat_checkpointer_restartpoints_timed_total",
                "Scheduled restartpoints",
            ),
            Column::counter(
                "restartpoints_req",
                "pg_stat_checkpointer_restartpoints_req_total",
                "Requested restartpoints",
            ),
            Column::counter(
                "restartpoints_done",
                "pg_stat_checkpointer_restartpoints_done_total",
                "Restartpoints performed",
            ),
            Column::counter(
                "write_time",
                "pg_stat_checkpointer_write_time_total",
                "Time spent writing files in checkpoints and restartpoints, in milliseconds",
            ),
            Column::counter(
                "sync_time",
                "pg_stat_checkpointer_sync_time_total",
                "Time spent syncing files in checkpoints and restartpoints, in milliseconds",
            ),
            Column::counter(
                "buffers_written",
                "pg_stat_checkpointer_buffers_written_total",
                "Buffers written by checkpoints and restartpoints",
            ),
            Column::counter(
                "slru_written",
                "pg_instance_stat_checkpointer_slru_written_total",
                "SLRU buffers written by checkpoints and restartpoints",
            ),
            Column::gauge(
                "stats_reset",
                "pg_stat_checkpointer_stats_reset_total",
                "Time the checkpointer statistics were last reset (Unix seconds)",
            ),
        ],
    )
}

fn bgwriter() -> Query {
    Query::new(
        "stat_bgwriter",
        "SELECT buffers_clean, maxwritten_clean, buffers_alloc, \
         extract(epoch FROM stats_reset) AS stats_reset FROM pg_stat_bgwriter",
        vec![
            Column::counter(
                "buffers_clean",
                "pg_stat_bgwriter_buffers_clean_total",
                "Buffers written by the background writer",
            ),
            Column::counter(
                "maxwritten_clean",
                "pg_stat_bgwriter_maxwritten_clean_total",
                "Times the background writer stopped a round for writing too many buffers",
            ),
            Column::counter(
                "buffers_alloc",
                "pg_stat_bgwriter_buffers_alloc_total",
                "Buffers allocated",
            ),
            Column::gauge(
                "stats_reset",
                "pg_stat_bgwriter_stats_reset_total",
                "Time the background writer statistics were last reset (Unix seconds)",
            ),
        ],
    )
}

fn stat_io() -> Query {
    let counters = [
        ("reads", "Read operations"),
        ("read_bytes", "Bytes read"),
        ("writes", "Write operations"),
        ("write_bytes", "Bytes written"),
        ("writebacks", "Writeback requests"),
        ("extends", "Relation extend operations"),
        ("extend_bytes", "Bytes added by extend operations"),
        ("hits", "Times a wanted block was found in a shared buffer"),
        (
            "evictions",
            "Times a block was evicted from a buffer to reuse it",
        ),
        ("reuses", "Times a ring buffer was reused"),
        ("fsyncs", "fsync calls"),
    ];
    let timings = [
        (
            "read_time",
            "Time spent reading, in seconds (track_io_timing)",
        ),
        (
            "write_time",
            "Time spent writing, in seconds (track_io_timing)",
        ),
        (
            "fsync_time",
            "Time spent in fsync, in seconds (track_io_timing)",
        ),
    ];
    let select: Vec<String> = counters
        .iter()
        .map(|(column, _)| column.to_string())
        .chain(
            timings
                .iter()
                .map(|(column, _)| format!("{column} / 1000 AS {column}")),
        )
        .collect();
    Query::new(
        "stat_io",
        &format!(
            "SELECT backend_type, object, context, {} FROM pg_stat_io",
            select.join(", ")
        ),
        [
            Column::label("backend_type"),
            Column::label("object"),
            Column::label("context"),
        ]
        .into_iter()
        .chain(counters.iter().map(|(column, help)| {
            Column::counter(column, &format!("pg_instance_stat_io_{column}_total"), help)
        }))
        .chain(timings.iter().map(|(column, help)| {
            Column::counter(
                column,
                &format!("pg_instance_stat_io_{column}_seconds_total"),
                help,
            )
        }))
        .collect(),
    )
}

fn statements() -> Query {
    Query::new(
        "stat_statements",
        &format!(
            "SELECT r.rolname AS user, d.datname, s.queryid::text AS queryid, \
             sum(s.calls) AS calls, sum(s.total_exec_time) / 1000 AS seconds, sum(s.rows) AS rows, \
             sum(s.shared_blk_read_time + s.local_blk_read_time + s.temp_blk_read_time) / 1000 \
             AS block_read_seconds, \
             sum(s.shared_blk_write_time + s.local_blk_write_time + s.temp_blk_write_time) / 1000 \
             AS block_write_seconds \
             FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid \
             JOIN pg_database d ON d.oid = s.dbid WHERE s.queryid IS NOT NULL \
             GROUP BY 1, 2, 3 ORDER BY sum(s.total_exec_time) DESC LIMIT {STATEMENTS_TOP}"
        ),
        vec![
            Column::label("user"),
            Column::label("datname"),
            Column::label("queryid"),
            Column::counter(
                "calls",
                "pg_stat_statements_calls_total",
                "Times the statement was executed (top statements by execution time)",
            ),
            Column::counter(
                "seconds",
                "pg_stat_statements_seconds_total",
                "Time spent executing the statement, in seconds",
            ),
            Column::counter(
                "rows",
                "pg_stat_statements_rows_total",
                "Rows retrieved or affected by the statement",
            ),
            Column::counter(
                "block_read_seconds",
                "pg_stat_statements_block_read_seconds_total",
                "Time the statement spent reading blocks, in seconds (track_io_timing)",
            ),
            Column::counter(
                "block_write_seconds",
                "pg_stat_statements_block_write_seconds_total",
                "Time the statement spent writing blocks, in seconds (track_io_timing)",
            ),
        ],
    )
    .requires(
        "SELECT to_regclass('pg_stat_statements') IS NOT NULL \
         AND current_setting('shared_preload_libraries') ~ 'pg_stat_statements'",
    )
}

/// Every metric name the built-in queries can export (for the dashboard and alert checks).
pub fn metric_names() -> Vec<String> {
    let mut names: Vec<String> = queries()
        .iter()
        .flat_map(|query| query.columns.iter())
        .filter_map(|column| match &column.usage {
            super::query::Usage::Metric(metric) => Some(metric.name.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
