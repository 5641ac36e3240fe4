//! What this instance reports: one query for the local server's state, and the status annotation
//! published on the pod (when something important changed, or every few seconds).

use super::*;

impl Manager {
    /// Reads role, timeline, LSNs, lag and counters from the local PostgreSQL.
    pub(super) async fn query_local(&mut self) -> Option<InstanceStatus> {
        if !self.postgres.is_running() {
            self.local_client = None;
            return None;
        }
        let row = self.local_status_row().await?;
        let in_recovery: bool = row.get(0);
        let streaming_applications: Vec<String> = row.get(12);
        let streaming_replicas = self
            .members
            .iter()
            .map(|member| member.name.clone())
            .filter(|pod| streaming_applications.contains(&quote::slot_name(pod)))
            .collect();
        Some(InstanceStatus {
            streaming_replicas,
            postgres_ready: true,
            in_recovery: Some(in_recovery),
            current_lsn: row.get(1),
            received_lsn: row.get::<_, Option<String>>(2).or_else(|| row.get(3)),
            replay_lsn: row.get(3),
            lag_bytes: in_recovery.then(|| row.get::<_, i64>(4).max(0) as u64),
            lag_seconds: in_recovery.then(|| row.get::<_, f64>(5).max(0.0)),
            streaming: row.get(6),
            timeline: row.get::<_, Option<i32>>(7).map(|t| t as u32),
            connections: row.get(8),
            commits: row.get(9),
            rollbacks: row.get(10),
            wal_bytes: row.get(11),
            ..InstanceStatus::default()
        })
    }

    /// The run loop's connection to the local PostgreSQL, kept across ticks: a new backend twice
    /// a tick (status, primary upkeep) costs a fork and a login each, and on a saturated node
    /// (2 cores under pgbench) that took up to 2 s of a tick whose Lease renewal cannot wait.
    pub(super) async fn local_client(&mut self) -> Result<Arc<tokio_postgres::Client>> {
        if let Some(client) = &self.local_client
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        self.local_client = None;
        let client = Arc::new(self.postgres.connect().await?);
        self.local_client = Some(client.clone());
        Ok(client)
    }

    /// The status row; a kept connection that fails (PostgreSQL restarted since) is replaced
    /// once, so that a restart does not show as a tick without status.
    async fn local_status_row(&mut self) -> Option<tokio_postgres::Row> {
        loop {
            let reused = self.local_client.is_some();
            let client = self.local_client().await.ok()?;
            match client.query_one(LOCAL_STATUS_QUERY, &[]).await {
                Ok(row) => return Some(row),
                Err(error) => {
                    self.local_client = None;
                    if !reused {
                        debug!(%error, "status query failed");
                        return None;
                    }
                }
            }
        }
    }

    /// Updates `/status`, the metrics, the pod's role label and status annotation.
    pub(super) async fn publish(&mut self) {
        let mut status = self.local.clone().unwrap_or_default();
        status.pod = self.me().to_string();
        status.role = self.role.label().to_string();
        status.fenced = matches!(self.role, Role::Fenced { .. });
        status.api_reachable = self.api_reachable;
        status.postgres_restarts = self.restarts;
        status.fence = self.watchdog.fence_report();
        status.last_join = self.last_join.clone();
        status.last_error = self.last_error.clone();
        status.bootstrapping = self.role == Role::Primary && self.roles.new_cluster_pending();
        status.data_lost = self.data_lost.clone();
        status.restart_token = self.restart_token.clone().filter(|token| !token.is_empty());
        status.data_disk_available_bytes = self.postgres.available_bytes();
        status.tls_ca = self.tls_ca.clone();
        status.certificates = self.certificates.clone();
        let gave_up = Role::Fenced {
            reason: FenceReason::PostgresFailed,
        };
        if self.role == Role::Primary || self.role == gave_up {
            // Candidates read the synchronous set of the primary they replace.
            status.synchronous_standbys = self.synchronous_set.clone();
            if self.role == gave_up {
                status.last_error.get_or_insert_with(|| {
                    "PostgreSQL exited and failed to restart: Lease released to a replica".into()
                });
            }
            status.synchronous_number = self.config.synchronous_standbys;
        }
        if let Some(backup) = &self.backup {
            // A designated primary (replica cluster) archives what it replays to the own
            // repository (`archive_mode = always`), as a primary would.
            let primary = self.role == Role::Primary
                && (status.in_recovery == Some(false) || self.follows_source());
            let replica = matches!(self.role, Role::Replica { .. }) && status.postgres_ready;
            backup.archive.set_active(primary || replica);
            backup.set_role(&status.role, status.postgres_ready);
            let archive = backup.archive.status();
            if (primary && backup.setup.wal_archiving) || archive.refused.is_some() {
                status.wal_archive = Some(archive);
            }
            if self.role == Role::Primary && self.follows_source() {
                status.source_archive = backup.source_lag();
            }
        }
        self.shared.set_status(status.clone());
        if !self.api_reachable {
            return;
        }
        // An error's appearance and end are published at once; a change of its text waits for
        // the period (an error that alternates would otherwise write the pod every tick).
        let key = format!(
            "{:?}|{}|{}|{}|{}|{:?}|{:?}|{}|{:?}|{:?}|{:?}|{}|{:?}|{:?}",
            status.restart_token,
            status.role,
            status.fenced,
            status.postgres_ready,
            status.bootstrapping,
            status.timeline,
            status.synchronous_standbys,
            status.streaming,
            status.last_join,
            status.wal_archive.as_ref().map(|archive| &archive.refused),
            status.data_lost,
            status.last_error.is_some(),
            // The replica cluster's distance in segments, and whether the listing fails.
            status
                .source_archive
                .as_ref()
                .map(|lag| (lag.segments, lag.error.is_some())),
            // A CA renewal waits for every instance to report its new bundle.
            status.tls_ca,
        );
        let due = match &self.last_published {
            Some((last, at)) => *last != key || at.elapsed() >= PUBLISH_PERIOD,
            None => true,
        };
        // A pending instance has nothing to report, except a refusal to bootstrap (the
        // operator turns it into the cluster's ContinuousArchiving condition), a data loss
        // (the DataLost condition) or the error that keeps it from starting (an initdb that
        // fails: the cluster's conditions repeat it).
        let refused = status
            .wal_archive
            .as_ref()
            .is_some_and(|archive| archive.refused.is_some());
        let stuck = refused || status.data_lost.is_some() || status.last_error.is_some();
        if !due || (self.role == Role::Pending && !stuck) {
            return;
        }
        match self.cluster.publish(self.role.label(), &status).await {
            Ok(()) => self.last_published = Some((key, Instant::now())),
            Err(error) => debug!(%error, "publishing the status failed"),
        }
    }
}

/// One query for everything the status needs (the CASEs keep primary-only functions away from
/// replicas and the other way round).
const LOCAL_STATUS_QUERY: &str = "SELECT pg_is_in_recovery(),
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
  pg_last_wal_receive_lsn()::text,
  pg_last_wal_replay_lsn()::text,
  COALESCE((pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn())::bigint, 0),
  CASE WHEN pg_is_in_recovery() AND pg_last_wal_receive_lsn() IS DISTINCT FROM pg_last_wal_replay_lsn()
       THEN COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8, 0)
       ELSE 0::float8 END,
  COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false),
  CASE WHEN pg_is_in_recovery()
       THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT timeline_id FROM pg_control_checkpoint()))
       ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
  (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::bigint,
  (SELECT COALESCE(sum(xact_commit), 0) FROM pg_stat_database)::bigint,
  (SELECT COALESCE(sum(xact_rollback), 0) FROM pg_stat_database)::bigint,
  (SELECT wal_bytes FROM pg_stat_wal)::bigint,
  (SELECT COALESCE(array_agg(application_name::text), '{}') FROM pg_stat_replication WHERE state = 'streaming')";
