//! The run loop: every tick it observes (Lease, pods, fence annotations, local PostgreSQL), asks
//! [`crate::decision::next_step`] what to do, and acts. It is the only code that starts, stops,
//! promotes or demotes PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::contract;
use futures::future::join_all;
use k8s_openapi::api::coordination::v1::Lease;
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::backup::BackupSetup;
use crate::backup::archiver::{self, ArchiveState};
use crate::backup::engine::LocalServer;
use crate::backup::recovery::{self, Recovery};
use crate::backup::service::BackupService;
use crate::bootstrap;
use crate::cluster::{Cluster, Credentials, Member, fence_requested};
use crate::config::Config;
use crate::decision::{
    self, Candidacy, FenceReason, Observation, PeerPosition, Role, Step, next_step,
};
use crate::error::{Error, Result};
use crate::http::{self, Shared};
use crate::lease::{self, LeaseTracker};
use crate::postgres::{LocalPostgres, MANAGED_CONFIG, ManagedSettings, StopMode, Upstream};
use crate::quote;
use crate::status::InstanceStatus;
use crate::watchdog::Watchdog;

/// Marker in the run folder while a restore from a backup is not finished (a restart redoes it).
const RESTORE_MARKER: &str = "restore-incomplete";
/// How long a peer has to answer `/status`.
const PEER_TIMEOUT: Duration = Duration::from_millis(400);
/// A replica that has not streamed from a live primary for this long is rewound.
const STUCK_REPLICA: Duration = Duration::from_secs(15);
/// How long a replica handed the Lease waits, within one tick, for the old primary's last WAL.
const HANDOVER_WAL_WAIT: Duration = Duration::from_secs(1);
/// Environment variable naming a fault to inject, for tests only (`lose_handover_answer`).
const FAULT_ENV: &str = "PG_INSTANCE_FAULT";
/// How often the status annotation is refreshed when nothing important changed.
const PUBLISH_PERIOD: Duration = Duration::from_secs(2);

/// Runs the instance manager until SIGTERM / SIGINT.
pub async fn run(config: Config) -> Result<()> {
    // A hanging call must leave time, within the renew deadline, for the peers check and the stop.
    let api_timeout =
        Duration::from_millis((config.renew_deadline_seconds * 1000 / 4).clamp(250, 1000));
    let client = kube_client(&config, api_timeout).await?;
    let cluster = Cluster::new(
        client,
        &config.namespace,
        &config.cluster,
        &config.pod_name,
        api_timeout,
    );
    let (superuser, replication, app) = wait_for_credentials(&cluster, &config).await;
    let mut postgres = LocalPostgres::new(&config, &superuser.username)?;
    postgres.write_passfile(&superuser, &replication)?;
    // PostgresUser / PostgresDatabase: watched with a client whose timeouts suit watches.
    let (declarative_primary, primary_watch) = tokio::sync::watch::channel(false);
    let declarative_client = kube_client(&config, Duration::from_secs(60)).await?;
    let poolers = crate::pooler::pause::Poolers::new(
        declarative_client.clone(),
        &config.namespace,
        &config.cluster,
        &config.rw_service_address(),
        config
            .tls_dir
            .as_ref()
            .map(|dir| crate::pooler::pause::RwTls {
                ca_file: dir.join("server").join(api::contract::tls_keys::CA),
                server_name: format!(
                    "{}.{}.svc",
                    api::contract::rw_service(&config.cluster),
                    config.namespace
                ),
            }),
    );
    crate::pooler::spawn_auth(
        declarative_client.clone(),
        &config,
        &superuser.username,
        primary_watch.clone(),
    );
    crate::declarative::spawn(
        declarative_client,
        &config,
        &superuser.username,
        primary_watch,
    );
    let shared = Shared::new(
        &config.pod_name,
        config.max_lag_bytes,
        config.renew_deadline() / 2,
    );
    let backup = start_backups(&config, &mut postgres, &shared)?;
    // Before PostgreSQL starts, so the follower starts at the end of an older log.
    crate::postgres_log::spawn(
        &config.run_dir(),
        crate::postgres_log::Tags {
            cluster: config.cluster.clone(),
            namespace: config.namespace.clone(),
            instance: config.pod_name.clone(),
        },
        shared.clone(),
    );
    if config.metrics_database {
        shared
            .database
            .configure(crate::database_metrics::Settings {
                connection: crate::database_metrics::local_connection(
                    &config.run_dir(),
                    config.port,
                    &superuser.username,
                ),
                timeout: Duration::from_millis(config.metrics_timeout_millis),
                custom_queries: config.metrics_custom_queries.clone(),
            });
    }
    let http_address = config.http_address;
    let http_shared = shared.clone();
    tokio::spawn(async move {
        if let Err(error) = http::serve(http_address, http_shared).await {
            tracing::error!(%error, "HTTP endpoints stopped");
        }
    });

    let watchdog = Arc::new(Watchdog::default());
    tokio::spawn(watchdog.clone().run(Duration::from_millis(100)));
    let mut manager = Manager {
        watchdog,
        tick: config.tick(),
        config,
        cluster,
        postgres,
        shared,
        role: Role::Pending,
        lease: LeaseTracker::default(),
        last_renewal: None,
        members: Vec::new(),
        superuser,
        replication,
        app,
        api_reachable: false,
        fence_requested: false,
        cluster_fence: None,
        cluster_fence_read: None,
        last_published: None,
        local: None,
        restarts: 0,
        last_join: None,
        last_error: None,
        switchover_since: None,
        roles_ensured: false,
        serving_since: None,
        synchronous_set: Vec::new(),
        last_wait_reason: None,
        restart_requested: None,
        restart_token: None,
        not_streaming_since: None,
        rewound_while_stuck: false,
        included_config: None,
        tls_fingerprint: None,
        declarative_primary,
        backup,
        restarts_since_ready: 0,
        postgres_down_since: None,
        fenced_at: None,
        followed: None,
        poolers,
        stranded_since: None,
        data_lost: None,
        outage_confirmed_at: None,
        outage_logged: false,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::io("SIGTERM handler"))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::io("SIGINT handler"))?;
    let mut hangup = signal(SignalKind::hangup()).map_err(Error::io("SIGHUP handler"))?;
    let mut interval = tokio::time::interval(manager.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => manager.tick().await,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => manager.postgres.signal(Signal::SIGHUP),
        }
    }
    info!("shutting down: stopping PostgreSQL");
    manager.watchdog.guard(None);
    manager.postgres.stop(StopMode::Fast).await;
    if manager.role == Role::Primary {
        manager.release_lease().await;
    }
    Ok(())
}

/// Sets up WAL archiving, WAL restore and the backup endpoints when the cluster has a backup
/// repository or a recovery source; starts the archiver.
fn start_backups(
    config: &Config,
    postgres: &mut LocalPostgres,
    shared: &Arc<Shared>,
) -> Result<Option<Arc<BackupService>>> {
    let Some(setup) = BackupSetup::from_config(config, postgres.run_as_ids())? else {
        return Ok(None);
    };
    postgres.set_backup_settings(setup.archive_settings());
    let archive = Arc::new(ArchiveState::default());
    let metrics = shared.metrics.backup.clone();
    tokio::spawn(archiver::run(
        setup.clone(),
        postgres.pgdata().join("pg_wal"),
        archive.clone(),
        metrics.clone(),
        postgres.run_as_ids(),
    ));
    let service = BackupService::new(
        setup,
        archive,
        LocalServer {
            socket_dir: postgres.socket_dir().display().to_string(),
            port: postgres.port(),
            user: postgres.superuser().to_string(),
        },
        postgres.pgdata().join("pg_wal"),
        metrics,
    );
    let _ = shared.backup.set(service.clone());
    Ok(Some(service))
}

async fn kube_client(config: &Config, timeout: Duration) -> Result<kube::Client> {
    let invalid = |error: &dyn std::fmt::Display| {
        Error::Invalid(format!("Kubernetes client configuration: {error}"))
    };
    let mut kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| invalid(&e))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| invalid(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| invalid(&e))?,
    };
    kube_config.connect_timeout = Some(timeout);
    kube_config.read_timeout = Some(timeout);
    kube_config.write_timeout = Some(timeout);
    kube::Client::try_from(kube_config).map_err(|e| invalid(&e))
}

async fn wait_for_credentials(
    cluster: &Cluster,
    config: &Config,
) -> (Credentials, Credentials, Option<Credentials>) {
    loop {
        let superuser = cluster
            .credentials(&contract::superuser_secret(&config.cluster))
            .await;
        let replication = cluster
            .credentials(&contract::replication_secret(&config.cluster))
            .await;
        let app = cluster
            .credentials(&contract::app_secret(&config.cluster))
            .await;
        match (superuser, replication, app) {
            (Ok(Some(superuser)), Ok(Some(replication)), Ok(app)) => {
                return (superuser, replication, app);
            }
            (superuser, replication, _) => {
                warn!(
                    superuser_found = matches!(superuser, Ok(Some(_))),
                    replication_found = matches!(replication, Ok(Some(_))),
                    "waiting for the superuser and replication Secrets"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

struct Manager {
    watchdog: Arc<Watchdog>,
    config: Config,
    tick: Duration,
    cluster: Cluster,
    postgres: LocalPostgres,
    shared: Arc<Shared>,
    role: Role,
    lease: LeaseTracker,
    /// Start of the last successful renewal (primary).
    last_renewal: Option<Instant>,
    members: Vec<Member>,
    superuser: Credentials,
    replication: Credentials,
    app: Option<Credentials>,
    api_reachable: bool,
    fence_requested: bool,
    cluster_fence: Option<String>,
    cluster_fence_read: Option<Instant>,
    last_published: Option<(String, Instant)>,
    local: Option<InstanceStatus>,
    restarts: u64,
    last_join: Option<String>,
    last_error: Option<String>,
    switchover_since: Option<(String, Instant)>,
    roles_ensured: bool,
    /// First primary upkeep of this process (see [`bootstrap::SINGLE_INSTANCE_GRACE`]).
    serving_since: Option<Instant>,
    synchronous_set: Vec<String>,
    last_wait_reason: Option<String>,
    /// Token of the restart annotation on the pod.
    restart_requested: Option<String>,
    /// Last restart token handled; `None` until the pod was first read.
    restart_token: Option<String>,
    /// Since when this replica has not streamed.
    not_streaming_since: Option<Instant>,
    /// Whether a rewind already ran for the current stall (the next remedy is a new clone).
    rewound_while_stuck: bool,
    /// Contents of the included configuration files (the operator's ConfigMap) last loaded.
    included_config: Option<Vec<Option<String>>>,
    /// Contents of the mounted certificate Secrets last installed (TLS on).
    tls_fingerprint: Option<Vec<Option<Vec<u8>>>>,
    /// Tells the declarative reconcilers whether this instance is a writable primary.
    declarative_primary: tokio::sync::watch::Sender<bool>,
    /// Backups (archiving, base backups, recovery), when configured.
    backup: Option<Arc<BackupService>>,
    /// Restarts of PostgreSQL since it last accepted connections.
    restarts_since_ready: u32,
    /// Since when PostgreSQL has not accepted connections after it exited.
    postgres_down_since: Option<Instant>,
    /// When this instance fenced itself.
    fenced_at: Option<Instant>,
    /// Address of the primary written in `primary_conninfo` (replica).
    followed: Option<Upstream>,
    /// The cluster's Poolers, paused around a switchover and resumed on the new primary.
    poolers: crate::pooler::pause::Poolers,
    /// Since when this instance has found itself with no data and no one to clone from.
    stranded_since: Option<Instant>,
    /// Why this instance cannot start by itself (see [`bootstrap::stranded`]): a state, not an
    /// error of the last tick, so it stays until the instance gets data again.
    data_lost: Option<String>,
    /// When every peer last confirmed that it cannot reach the API server either (primary).
    outage_confirmed_at: Option<Instant>,
    /// Whether the last peers check confirmed an outage (logged on change, not every tick).
    outage_logged: bool,
}

impl Manager {
    fn me(&self) -> &str {
        &self.config.pod_name
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        self.observe_lease(now).await;
        if self.api_reachable {
            self.observe_members().await;
        }
        self.restart_on_request().await;
        self.reload_on_config_change();
        self.reload_on_certificate_change();
        self.supervise().await;
        self.local = self.query_local().await;
        if self.local.is_some() {
            self.restarts_since_ready = 0;
            self.postgres_down_since = None;
        }

        let since_renewal = self
            .last_renewal
            .map(|at| now.duration_since(at))
            .unwrap_or(Duration::MAX);
        let mut seen = Observation {
            fence_requested: self.fence_requested,
            lease_holder: self.lease.holder(),
            lease_is_mine: self.lease.holder().as_deref() == Some(self.me()),
            lease_expired: self.lease.expired_for(
                now,
                self.config.lease_duration(),
                self.config.failover_delay(),
            ),
            api_reachable: self.api_reachable,
            since_renewal,
            peers_confirm_api_outage: false,
            switchover_to: self
                .lease
                .annotation(contract::ANNOTATION_SWITCHOVER_TO)
                .filter(|target| !target.is_empty()),
            replica_diverged: self.replica_diverged(now),
            postgres_failed_restarts: self.restarts_since_ready.saturating_sub(1),
            postgres_down_for: self
                .postgres_down_since
                .map(|since| now.saturating_duration_since(since))
                .unwrap_or_default(),
            since_fence: self
                .fenced_at
                .map(|at| now.saturating_duration_since(at))
                .unwrap_or_default(),
            upstream_moved: self.upstream_moved(),
        };
        if self.role == Role::Primary && since_renewal >= self.config.renew_deadline() {
            let confirmed_at = Instant::now();
            let confirmed = self.peers_confirm_api_outage().await;
            if confirmed {
                // None of them can promote before a whole Lease duration after it reaches the API
                // server again: the confirmation counts as a renewal.
                self.watchdog.extend(confirmed_at + self.watchdog_window());
                self.outage_confirmed_at = Some(confirmed_at);
            }
            // ... for the run loop too: a peer's answer lost or late (a loaded node) within the
            // renew deadline of the last confirmation does not fence a primary that nobody can
            // replace; it fences by then, a Lease duration before any peer may take over.
            seen.peers_confirm_api_outage = self
                .outage_confirmed_at
                .is_some_and(|at| at.elapsed() < self.config.renew_deadline());
            if confirmed != self.outage_logged {
                info!(confirmed, "primary cannot renew its Lease; asked its peers");
                self.outage_logged = confirmed;
            }
        } else {
            self.outage_logged = false;
        }
        let step = next_step(&self.role, &seen, self.config.renew_deadline());
        if step != Step::Stay {
            debug!(role = ?self.role, ?step, "step");
        }
        match self.act(step).await {
            Ok(()) => self.last_error = None,
            Err(error) => {
                warn!(%error, role = ?self.role, "step failed; retrying on the next tick");
                self.last_error = Some(error.to_string());
            }
        }
        let writable = self.role == Role::Primary
            && self
                .local
                .as_ref()
                .is_some_and(|local| local.in_recovery == Some(false));
        self.declarative_primary
            .send_if_modified(|primary| std::mem::replace(primary, writable) != writable);
        self.watchdog.guard(if self.role == Role::Primary {
            self.postgres.pid()
        } else {
            None
        });
        self.publish().await;
    }

    /// Whether this replica cannot follow: it accepts writes (promoted by someone else), or it has
    /// not streamed for [`STUCK_REPLICA`].
    fn replica_diverged(&mut self, now: Instant) -> bool {
        let Role::Replica { upstream: Some(_) } = &self.role else {
            self.not_streaming_since = None;
            self.rewound_while_stuck = false;
            return false;
        };
        if self.lease.expired(now, self.config.lease_duration()) {
            // No primary to follow: not streaming is expected.
            self.not_streaming_since = None;
            return false;
        }
        let Some(local) = &self.local else {
            return false;
        };
        if local.in_recovery == Some(false) {
            warn!("this replica accepts writes (promoted outside the instance manager)");
            return true;
        }
        if local.streaming {
            self.not_streaming_since = None;
            self.rewound_while_stuck = false;
            return false;
        }
        let since = *self.not_streaming_since.get_or_insert(now);
        now.duration_since(since) >= STUCK_REPLICA
    }

    /// Whether the primary this replica follows now has another address than the one it streams
    /// from (its pod came back with another IP).
    fn upstream_moved(&self) -> bool {
        let (
            Role::Replica {
                upstream: Some(name),
            },
            Some(followed),
        ) = (&self.role, &self.followed)
        else {
            return false;
        };
        self.upstream_of(name)
            .is_ok_and(|current| current != *followed)
    }

    /// How long after the start of a renewal a primary may keep accepting writes when the run
    /// loop gets no turn: halfway between the renew deadline (when the run loop fences) and the
    /// Lease's expiry (when a replica may promote).
    fn watchdog_window(&self) -> Duration {
        (self.config.renew_deadline() + self.config.lease_duration()) / 2
    }

    /// Reads the Lease; a primary renews it (optimistic concurrency on its resourceVersion).
    async fn observe_lease(&mut self, now: Instant) {
        if self.role == Role::Primary
            && self.lease.holder().as_deref() == Some(self.me())
            && let Some(current) = self.lease.lease().cloned()
        {
            let started = Instant::now();
            let renewed = lease::claimed(
                Some(&current),
                &self.cluster.lease_name(),
                &self.config.namespace,
                Some(self.me()),
                self.config.lease_duration(),
            );
            match self.cluster.replace_lease(&renewed).await {
                Ok(lease) => {
                    self.lease.observe(Some(lease), now);
                    self.last_renewal = Some(started);
                    self.watchdog.extend(started + self.watchdog_window());
                    self.api_reachable = true;
                    self.shared.api_succeeded();
                    return;
                }
                Err(error) if error.is_conflict() => {
                    // Changed since we read it (an annotation, or another holder): read again.
                }
                Err(error) => {
                    debug!(%error, "renewing the Lease failed");
                    self.lease.observe_outage();
                    self.api_reachable = false;
                    return;
                }
            }
        }
        match self.cluster.get_lease().await {
            Ok(lease) => {
                self.lease.observe(lease, now);
                self.api_reachable = true;
                self.shared.api_succeeded();
            }
            Err(error) => {
                debug!(%error, "reading the Lease failed");
                self.lease.observe_outage();
                self.api_reachable = false;
            }
        }
    }

    async fn observe_members(&mut self) {
        match self.cluster.members().await {
            Ok(members) => self.members = members,
            Err(error) => {
                debug!(%error, "listing the cluster's pods failed");
                return;
            }
        }
        let due = self
            .cluster_fence_read
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if due {
            match self.cluster.cluster_fence_annotation().await {
                Ok(value) => {
                    self.cluster_fence = value;
                    self.cluster_fence_read = Some(Instant::now());
                }
                Err(error) => debug!(%error, "reading the cluster's fence annotation failed"),
            }
        }
        let pod_annotation = self
            .member(self.me())
            .and_then(|member| member.annotations.get(contract::ANNOTATION_FENCED).cloned());
        self.fence_requested = fence_requested(
            self.me(),
            pod_annotation.as_deref(),
            self.cluster_fence.as_deref(),
        );
        self.restart_requested = self.member(self.me()).and_then(|member| {
            member
                .annotations
                .get(contract::ANNOTATION_RESTART)
                .cloned()
        });
        if self.restart_token.is_none() {
            // PostgreSQL starts after this read with the current configuration: a token already
            // there is satisfied.
            self.restart_token = Some(self.restart_requested.clone().unwrap_or_default());
        }
    }

    /// Restarts PostgreSQL when the restart annotation carries a new token (rolling updates).
    async fn restart_on_request(&mut self) {
        let Some(requested) = self.restart_requested.clone() else {
            return;
        };
        if self.restart_token.as_deref() == Some(requested.as_str())
            || !matches!(self.role, Role::Primary | Role::Replica { .. })
        {
            return;
        }
        info!(token = %requested, "restart requested: restarting PostgreSQL");
        self.postgres.stop(StopMode::Fast).await;
        if let Err(error) = self.postgres.start(self.config.renew_deadline() / 2).await {
            debug!(%error, "postgres not ready yet after the requested restart");
        }
        self.roles_ensured = false;
        self.restart_token = Some(requested);
    }

    /// Reloads PostgreSQL (SIGHUP) when an included configuration file changed, so that
    /// parameters which only need a reload apply without a restart (the operator rewrites the
    /// ConfigMap; the kubelet swaps the mounted file).
    fn reload_on_config_change(&mut self) {
        let contents: Vec<Option<String>> = self
            .config
            .included_config_files()
            .iter()
            .map(|path| std::fs::read_to_string(path).ok())
            .collect();
        match &self.included_config {
            None => self.included_config = Some(contents),
            Some(loaded) if *loaded == contents => {}
            Some(_) => {
                if self.postgres.pid().is_some() {
                    info!("included configuration changed: reloading PostgreSQL");
                    self.postgres.signal(Signal::SIGHUP);
                }
                self.included_config = Some(contents);
            }
        }
    }

    /// Installs renewed certificates and reloads PostgreSQL (SIGHUP), which loads them for new
    /// connections without a restart; connections already open keep their session. The
    /// kubelet swaps a renewed Secret's files at once; a read in the middle of the swap shows as
    /// one more change at the next tick and is installed again.
    fn reload_on_certificate_change(&mut self) {
        let Some(tls) = self.postgres.tls() else {
            return;
        };
        let fingerprint = tls.fingerprint();
        if self.tls_fingerprint.as_ref() == Some(&fingerprint) {
            return;
        }
        // Also at the first look (a renewal may have come between the first configuration and
        // now): one reload at start-up is harmless.
        if let Err(error) = self.postgres.install_tls() {
            warn!(%error, "renewed certificates could not be installed; retrying");
            return;
        }
        if self.postgres.pid().is_some() {
            info!("certificates installed: reloading PostgreSQL");
            self.postgres.signal(Signal::SIGHUP);
        }
        self.tls_fingerprint = Some(fingerprint);
    }

    fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|member| member.name == name)
    }

    fn upstream_of(&self, name: &str) -> Result<Upstream> {
        let member = self
            .member(name)
            .ok_or_else(|| Error::Invalid(format!("pod {name} (the primary) not found")))?;
        let host = member
            .ip
            .clone()
            .ok_or_else(|| Error::Invalid(format!("pod {name} (the primary) has no IP yet")))?;
        Ok(Upstream {
            host,
            port: member.postgres_port,
        })
    }

    fn other_pods(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| member.name.clone())
            .filter(|name| name != self.me())
            .collect()
    }

    /// Restarts a crashed PostgreSQL (primary or replica).
    async fn supervise(&mut self) {
        let should_run = matches!(self.role, Role::Primary | Role::Replica { .. });
        if !should_run || self.postgres.is_running() {
            return;
        }
        let renewed_recently = self
            .last_renewal
            .is_some_and(|at| at.elapsed() < self.config.renew_deadline());
        if self.role == Role::Primary
            && (self.lease.holder().as_deref() != Some(self.me()) || !renewed_recently)
        {
            return;
        }
        warn!(role = ?self.role, "postgres is not running; restarting it");
        self.restarts += 1;
        self.restarts_since_ready += 1;
        self.postgres_down_since.get_or_insert_with(Instant::now);
        self.roles_ensured = false;
        if let Err(error) = self.postgres.start(Duration::ZERO).await {
            debug!(%error, "postgres restart pending");
            self.last_error = Some(format!("restarting PostgreSQL: {error}"));
        }
    }

    async fn act(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Stay => {
                if self.role == Role::Primary {
                    self.reconcile_primary().await?;
                }
                Ok(())
            }
            Step::Fence(reason) => {
                let mode = match reason {
                    FenceReason::Requested => StopMode::Fast,
                    FenceReason::LostLease | FenceReason::PostgresFailed => StopMode::Immediate,
                };
                warn!(?reason, "fencing: stopping PostgreSQL");
                self.postgres.stop(mode).await;
                let was_primary = self.role == Role::Primary;
                self.role = Role::Fenced { reason };
                self.last_renewal = None;
                self.fenced_at = Some(Instant::now());
                if reason == FenceReason::PostgresFailed && was_primary {
                    // PostgreSQL is stopped: no write can be accepted any more, so a replica may
                    // take over now rather than after the Lease's duration.
                    self.release_lease().await;
                    self.restarts_since_ready = 0;
                    self.postgres_down_since = None;
                }
                Ok(())
            }
            Step::Resolve => {
                let role = self.resolve().await?;
                if role != Role::Pending {
                    self.stranded_since = None;
                    self.data_lost = None;
                }
                if role != self.role {
                    info!(from = ?self.role, to = ?role, "role resolved");
                }
                self.role = role;
                Ok(())
            }
            Step::Follow(holder) => {
                let upstream = self.upstream_of(&holder)?;
                self.followed = Some(upstream.clone());
                self.postgres.write_config(
                    &ManagedSettings {
                        upstream: Some(upstream),
                        synchronous_standby_names: String::new(),
                    },
                    true,
                    &self.replication.username,
                )?;
                self.postgres.signal(Signal::SIGHUP);
                info!(primary = %holder, address = ?self.followed, "following the primary");
                self.not_streaming_since = None;
                self.role = Role::Replica {
                    upstream: Some(holder),
                };
                Ok(())
            }
            Step::RunForPrimary => self.run_for_primary().await,
            Step::PromoteHandedOver => self.promote_handed_over().await,
            Step::Switchover(target) => self.switchover(target).await,
            Step::Rewind(holder) => {
                let upstream = self.upstream_of(&holder)?;
                let writable = self.local.as_ref().and_then(|l| l.in_recovery) == Some(false);
                warn!(primary = %holder, writable, "this replica cannot follow the primary: rejoining");
                self.postgres
                    .stop(if writable {
                        StopMode::Immediate
                    } else {
                        StopMode::Fast
                    })
                    .await;
                self.not_streaming_since = None;
                if self.rewound_while_stuck {
                    let why = format!("still not streaming {STUCK_REPLICA:?} after pg_rewind");
                    self.reclone(&upstream, &why).await?;
                    self.rewound_while_stuck = false;
                } else {
                    self.rejoin(&upstream).await?;
                    self.rewound_while_stuck = true;
                }
                self.start_replica(Some(upstream)).await?;
                self.role = Role::Replica {
                    upstream: Some(holder),
                };
                Ok(())
            }
            Step::Demote => {
                warn!(holder = ?self.lease.holder(), "another instance holds the Lease: stopping writes");
                self.postgres.stop(StopMode::Immediate).await;
                self.role = Role::Pending;
                self.last_renewal = None;
                Ok(())
            }
        }
    }

    /// Works out the role from the data directory and the Lease (start-up, after a fence).
    async fn resolve(&mut self) -> Result<Role> {
        if !self.api_reachable {
            return Ok(self.role.clone());
        }
        let now = Instant::now();
        let me = self.me().to_string();
        let holder = self.lease.holder();
        let expired = self.lease.expired(now, self.config.lease_duration());
        let clone_marker = self.config.run_dir().join("clone-incomplete");
        let restore_marker = self.config.run_dir().join(RESTORE_MARKER);
        let initdb_marker = self.config.run_dir().join(bootstrap::INITDB_MARKER);
        // Read the data folder and the markers once: the bootstrap decision below uses them all.
        let facts = bootstrap::Facts {
            has_data: self.postgres.has_data(),
            initdb_marker: initdb_marker.exists(),
            other_marker: clone_marker.exists() || restore_marker.exists(),
            holder_is_me_or_nobody: holder.as_deref().is_none_or(|holder| holder == me),
            bootstrapped: self
                .lease
                .annotation(contract::ANNOTATION_BOOTSTRAPPED)
                .is_some(),
        };
        if !facts.has_data || facts.other_marker || facts.initdb_marker {
            let restoring = restore_marker.exists() && holder.as_deref() == Some(me.as_str());
            let again = bootstrap::start_again(facts).filter(|_| self.lease.ever_held());
            if !self.lease.ever_held() || restoring || again.is_some() {
                self.acquire().await?;
                if let Some(why) = again {
                    warn!(reason = why, "starting the bootstrap over");
                    if let Err(error) = self
                        .cluster
                        .warning_event("BootstrapRestarted", why.to_string())
                        .await
                    {
                        debug!(%error, "recording the bootstrap event failed");
                    }
                }
                if let Some(backup) = self.backup.as_ref().filter(|_| !restoring) {
                    backup.check_repository_unused().await?;
                }
                if let Some(recovery) = self.recovery() {
                    self.bootstrap_from_backup(recovery).await?;
                    self.last_join = Some("restore".into());
                    return Ok(Role::Primary);
                }
                info!("bootstrapping a new cluster with initdb");
                std::fs::write(&initdb_marker, b"")
                    .map_err(Error::io("writing the initdb marker"))?;
                self.postgres.initdb(&self.superuser).await?;
                // The repository check and initdb can outlast the Lease on a loaded machine:
                // renew before accepting writes, or the watchdog stops the new primary at once.
                self.acquire().await?;
                let _ = std::fs::remove_file(&initdb_marker);
                self.start_primary().await?;
                self.last_join = Some(
                    if again.is_some() {
                        "reinitdb"
                    } else {
                        "initdb"
                    }
                    .into(),
                );
                return Ok(Role::Primary);
            }
            return match holder {
                Some(holder) if holder != me && !expired => {
                    let upstream = self.upstream_of(&holder)?;
                    info!(primary = %holder, "cloning the primary with pg_basebackup");
                    std::fs::write(&clone_marker, b"")
                        .map_err(Error::io("writing the clone marker"))?;
                    self.postgres
                        .basebackup(&upstream, &self.replication.username)
                        .await?;
                    let _ = std::fs::remove_file(&clone_marker);
                    self.start_replica(Some(upstream)).await?;
                    self.last_join = Some("basebackup".into());
                    Ok(Role::Replica {
                        upstream: Some(holder),
                    })
                }
                _ => {
                    let lease = self.cluster.lease_name();
                    let facts = bootstrap::Facts {
                        // An expired holder is nobody to clone from.
                        holder_is_me_or_nobody: true,
                        ..facts
                    };
                    match bootstrap::stranded(facts, &lease) {
                        Some(why) => self.report_stranded(why).await,
                        None => self.stranded_since = None,
                    }
                    Ok(Role::Pending)
                }
            };
        }
        self.postgres.stop(StopMode::Fast).await;
        let standby = self.postgres.is_standby_configured();
        match holder {
            Some(holder) if holder == me => {
                if standby {
                    self.start_replica(None).await?;
                    Ok(Role::Replica { upstream: None })
                } else {
                    // Our own Lease (a restart, or an unfence): renew before accepting writes.
                    self.acquire().await?;
                    self.start_primary().await?;
                    self.last_join = Some("restart".into());
                    Ok(Role::Primary)
                }
            }
            Some(holder) if !expired => {
                let upstream = self.upstream_of(&holder)?;
                if !standby {
                    self.rejoin(&upstream).await?;
                }
                self.start_replica(Some(upstream)).await?;
                Ok(Role::Replica {
                    upstream: Some(holder),
                })
            }
            _ if standby => {
                self.start_replica(None).await?;
                Ok(Role::Replica { upstream: None })
            }
            _ => {
                debug!("a former primary waits for a new primary to rewind from");
                Ok(Role::Pending)
            }
        }
    }

    /// Says once, after [`bootstrap::STRANDED_AFTER_LEASES`] Lease durations, that this instance
    /// lost the cluster's only data: in its status (`dataLost`, which the operator turns into the
    /// cluster's `DataLost` condition) and in one `DataLost` event per change of the text.
    async fn report_stranded(&mut self, why: String) {
        let since = *self.stranded_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.config.lease_duration() * bootstrap::STRANDED_AFTER_LEASES
            || self.data_lost.as_deref() == Some(why.as_str())
        {
            return;
        }
        warn!(reason = %why, "waiting for the user: the cluster's data is lost");
        if let Err(error) = self.cluster.warning_event("DataLost", why.clone()).await {
            debug!(%error, "recording the data loss event failed");
        }
        self.data_lost = Some(why);
    }

    fn recovery(&self) -> Option<Recovery> {
        self.backup
            .as_ref()
            .and_then(|backup| backup.setup.recovery.clone())
    }

    /// Creates the cluster from a backup (`spec.bootstrap.recovery`): download, archive recovery
    /// up to the target, promotion; the Lease is renewed while PostgreSQL replays.
    async fn bootstrap_from_backup(&mut self, recovery: Recovery) -> Result<()> {
        let Some(setup) = self.backup.as_ref().map(|backup| backup.setup.clone()) else {
            return Ok(());
        };
        let marker = self.config.run_dir().join(RESTORE_MARKER);
        std::fs::write(&marker, b"").map_err(Error::io("writing the restore marker"))?;
        info!(
            source = %recovery.store.destination(),
            source_cluster = %recovery.store.server_name,
            backup = ?recovery.backup_id,
            target = ?recovery.target,
            "bootstrapping the cluster from a backup"
        );
        self.postgres.stop(StopMode::Fast).await;
        self.postgres.empty_data_dir()?;
        recovery::download(&setup, &recovery, self.postgres.pgdata(), MANAGED_CONFIG).await?;
        let mut settings = setup.archive_settings();
        settings.extend(recovery.settings(&setup));
        self.postgres.set_backup_settings(settings);
        let managed = ManagedSettings {
            upstream: None,
            synchronous_standby_names: String::new(),
        };
        self.postgres
            .write_config(&managed, false, &self.replication.username)?;
        self.acquire().await?;
        self.postgres.start(Duration::from_secs(3600)).await?;
        loop {
            if !self.postgres.is_running() {
                return Err(Error::Invalid(
                    "PostgreSQL stopped during the recovery (is the target inside the archived WAL, after the backup? see its log)".into(),
                ));
            }
            if let Ok(client) = self.postgres.connect().await
                && let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await
                && !row.get::<_, bool>(0)
            {
                break;
            }
            self.acquire().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        info!("recovery finished and promoted: archiving to this cluster's own repository");
        self.postgres.set_backup_settings(setup.archive_settings());
        self.postgres
            .write_config(&managed, false, &self.replication.username)?;
        self.postgres.signal(Signal::SIGHUP);
        self.roles_ensured = false;
        let _ = std::fs::remove_file(&marker);
        Ok(())
    }

    /// A former primary becomes a replica of `upstream`: pg_rewind, or a new clone when rewinding
    /// is impossible.
    async fn rejoin(&mut self, upstream: &Upstream) -> Result<()> {
        info!(primary = %upstream.host, port = upstream.port, "former primary: running pg_rewind");
        match self.postgres.rewind(upstream).await {
            Ok(output) => {
                info!(output = %output.trim(), "pg_rewind done");
                self.last_join = Some("rewind".into());
            }
            Err(error) => {
                warn!(%error, "pg_rewind failed; cloning the primary again");
                self.reclone(upstream, &format!("pg_rewind failed: {error}"))
                    .await?;
            }
        }
        Ok(())
    }

    /// Replaces the data directory with a new clone of the primary at `upstream`, and says so
    /// (`lastJoin: reclone` in the status, a `Recloned` event on the pod with `why`).
    async fn reclone(&mut self, upstream: &Upstream, why: &str) -> Result<()> {
        let note = format!("data directory replaced by a new clone of the primary: {why}");
        let note: String = note.chars().take(1000).collect();
        if let Err(error) = self.cluster.warning_event("Recloned", note).await {
            debug!(%error, "recording the reclone event failed");
        }
        let marker = self.config.run_dir().join("clone-incomplete");
        std::fs::write(&marker, b"").map_err(Error::io("writing the clone marker"))?;
        self.postgres
            .basebackup(upstream, &self.replication.username)
            .await?;
        let _ = std::fs::remove_file(&marker);
        self.last_join = Some("reclone".into());
        Ok(())
    }

    async fn start_primary(&mut self) -> Result<()> {
        let settings = ManagedSettings {
            upstream: None,
            synchronous_standby_names: decision::standby_names(
                &self.synchronous_set,
                self.config.sync_policy(),
            ),
        };
        self.postgres
            .write_config(&settings, false, &self.replication.username)?;
        self.roles_ensured = false;
        self.postgres
            .start(self.config.renew_deadline() / 2)
            .await
            .or_else(|error| {
                // Crash recovery may take longer than a tick; readiness is checked every tick.
                debug!(%error, "primary not ready yet");
                Ok::<(), Error>(())
            })?;
        let _ = self.reconcile_primary().await;
        Ok(())
    }

    async fn start_replica(&mut self, upstream: Option<Upstream>) -> Result<()> {
        self.followed = upstream.clone();
        let settings = ManagedSettings {
            upstream,
            synchronous_standby_names: String::new(),
        };
        self.postgres
            .write_config(&settings, true, &self.replication.username)?;
        self.postgres.start(Duration::from_secs(60)).await
    }

    /// Takes (or renews) the Lease with an optimistic-concurrency write.
    async fn acquire(&mut self) -> Result<()> {
        let started = Instant::now();
        let claimed = lease::claimed(
            self.lease.lease(),
            &self.cluster.lease_name(),
            &self.config.namespace,
            Some(self.me()),
            self.config.lease_duration(),
        );
        let written = if self.lease.exists() {
            self.cluster.replace_lease(&claimed).await?
        } else {
            self.cluster.create_lease(&claimed).await?
        };
        self.lease.observe(Some(written), Instant::now());
        self.last_renewal = Some(started);
        self.watchdog.extend(started + self.watchdog_window());
        Ok(())
    }

    /// After PostgreSQL stopped on the primary (no more writes): marks the Lease released (and
    /// shortens it to one second for instances that do not know the mark), so a replica takes over
    /// at once instead of after a whole Lease duration. The holder stays named, so that the
    /// candidates know whose synchronous standbys to consult.
    async fn release_lease(&mut self) {
        if self.lease.holder().as_deref() != Some(self.me()) {
            return;
        }
        let mut released = lease::claimed(
            self.lease.lease(),
            &self.cluster.lease_name(),
            &self.config.namespace,
            Some(self.me()),
            self.config.lease_duration(),
        );
        if let Some(spec) = released.spec.as_mut() {
            spec.lease_duration_seconds = Some(1);
        }
        lease::annotate(
            &mut released,
            &[(
                contract::ANNOTATION_RELEASED_BY,
                Some(self.me().to_string()),
            )],
        );
        match self.cluster.replace_lease(&released).await {
            Ok(written) => {
                self.lease.observe(Some(written), Instant::now());
                info!("Lease released with PostgreSQL stopped")
            }
            Err(error) => {
                warn!(%error, "releasing the Lease failed; replicas take over when it expires")
            }
        }
    }

    /// Whether every peer answers that it cannot reach the API server either (then none of them
    /// can take the Lease, and the primary keeps serving).
    async fn peers_confirm_api_outage(&self) -> bool {
        let peers: Vec<&Member> = self
            .members
            .iter()
            .filter(|member| member.name != self.me())
            .collect();
        if peers.is_empty() {
            return false;
        }
        let answers = join_all(peers.iter().map(|peer| async move {
            match &peer.ip {
                Some(ip) => http::peer_status(ip, peer.http_port, PEER_TIMEOUT).await,
                None => None,
            }
        }))
        .await;
        let confirmed = answers
            .iter()
            .all(|answer| matches!(answer, Some(status) if !status.api_reachable));
        debug!(confirmed, "primary cannot renew its Lease; asked its peers");
        confirmed
    }

    async fn run_for_primary(&mut self) -> Result<()> {
        if self.fence_requested {
            return Ok(());
        }
        let Some(local) = self.local.clone() else {
            return Ok(());
        };
        let Some(position) = local.position() else {
            return Ok(());
        };
        let old_primary = self.lease.holder().filter(|holder| holder != self.me());
        let old_status = old_primary
            .as_deref()
            .and_then(|name| self.member(name))
            .and_then(|member| member.status.clone());
        let number = self.config.synchronous_standbys;
        let sync_names: Vec<String> = match &old_status {
            Some(status) if number > 0 && !status.synchronous_standbys.is_empty() => {
                status.synchronous_standbys.clone()
            }
            _ if number > 0 => self
                .members
                .iter()
                .map(|member| member.name.clone())
                .filter(|name| Some(name) != old_primary.as_ref())
                .collect(),
            _ => Vec::new(),
        };
        let number = old_status
            .as_ref()
            .map(|status| status.synchronous_number)
            .filter(|n| *n > 0)
            .unwrap_or(number);
        let peers: Vec<&Member> = self
            .members
            .iter()
            .filter(|member| member.name != self.me() && Some(&member.name) != old_primary.as_ref())
            .collect();
        let positions = join_all(peers.iter().map(|peer| async move {
            let status = match &peer.ip {
                Some(ip) => http::peer_status(ip, peer.http_port, PEER_TIMEOUT).await,
                None => None,
            };
            PeerPosition {
                name: peer.name.clone(),
                received_lsn: status
                    .as_ref()
                    .filter(|status| status.postgres_ready)
                    .and_then(InstanceStatus::position),
                fenced: status.as_ref().is_some_and(|status| status.fenced),
            }
        }))
        .await;
        match decision::candidacy(self.me(), position, &positions, &sync_names, number) {
            Candidacy::Wait(reason) => {
                if self.last_wait_reason.as_deref() != Some(reason.as_str()) {
                    info!(%reason, "not promoting");
                    self.last_wait_reason = Some(reason);
                }
                Ok(())
            }
            Candidacy::Promote => {
                self.last_wait_reason = None;
                info!(
                    old_primary = ?old_primary,
                    lsn = %decision::format_lsn(position),
                    "the Lease expired and this is the best candidate: taking the Lease"
                );
                self.acquire().await?;
                let mut inherited = sync_names;
                if let Some(old) = old_primary {
                    inherited.push(old);
                }
                self.promote(inherited).await
            }
        }
    }

    async fn promote_handed_over(&mut self) -> Result<()> {
        let Some(local) = self.local.clone() else {
            return Ok(());
        };
        let wanted = self
            .lease
            .annotation(contract::ANNOTATION_SWITCHOVER_LSN)
            .and_then(|lsn| decision::parse_lsn(&lsn));
        if let Some(wanted) = wanted
            && local.position().is_none_or(|position| position <= wanted)
            && !self.receives_past(wanted).await
        {
            debug!(wanted = %decision::format_lsn(wanted), "waiting for the old primary's last WAL");
            return Ok(());
        }
        info!("the Lease was handed over: promoting");
        self.acquire().await?;
        let previous = self.other_pods();
        self.promote(previous).await
    }

    /// Whether this replica receives WAL past `wanted` within [`HANDOVER_WAL_WAIT`], asked every
    /// 20 ms: the old primary's last WAL usually arrives within milliseconds of the hand-over,
    /// and waiting for the next tick (250 ms) would add to the clients' pause.
    async fn receives_past(&self, wanted: u64) -> bool {
        let Ok(client) = self.postgres.connect().await else {
            return false;
        };
        let deadline = Instant::now() + HANDOVER_WAL_WAIT;
        while Instant::now() < deadline {
            let received = client
                .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
                .await
                .ok()
                .and_then(|row| row.get::<_, Option<String>>(0))
                .and_then(|lsn| decision::parse_lsn(&lsn));
            if received.is_some_and(|position| position > wanted) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Promotes the local replica (the Lease is already ours).
    async fn promote(&mut self, inherited_set: Vec<String>) -> Result<()> {
        let pods = self.other_pods();
        self.synchronous_set =
            decision::next_synchronous_set(&inherited_set, &[], &pods, self.me());
        let settings = ManagedSettings {
            upstream: None,
            synchronous_standby_names: decision::standby_names(
                &self.synchronous_set,
                self.config.sync_policy(),
            ),
        };
        // synchronous_standby_names is in place before the first write is accepted.
        self.postgres
            .write_config(&settings, true, &self.replication.username)?;
        let client = self.postgres.connect().await?;
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(Error::postgres("reloading the configuration"))?;
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(Error::postgres("checking recovery before promotion"))?
            .get(0);
        // An earlier attempt may have promoted it already (pg_promote timed out, or we restarted).
        let promoted = !in_recovery || self.wait_for_promotion(&client).await?;
        if !promoted {
            return Err(Error::Invalid(
                "pg_promote did not complete within 8 s; retrying".into(),
            ));
        }
        info!("promoted: this instance is the primary");
        // Poolers a former primary paused (or that still hold server connections to a dead one)
        // are re-pointed and resumed once the rw Service reaches this writable primary.
        self.poolers.resume_all_when_writable();
        self.role = Role::Primary;
        self.watchdog.guard(self.postgres.pid());
        self.roles_ensured = false;
        self.last_join.get_or_insert_with(|| "promote".into());
        let _ = self.reconcile_primary().await;
        Ok(())
    }

    /// Signals promotion and waits up to 8 s for PostgreSQL to leave recovery, renewing the Lease
    /// meanwhile. The end of recovery can outlast a Lease (restore_command fetching the last WAL
    /// and the timeline history from a slow store): a Lease left to lapse here made the watchdog
    /// stop the new primary right after its promotion.
    async fn wait_for_promotion(&mut self, client: &tokio_postgres::Client) -> Result<bool> {
        client
            .batch_execute("SELECT pg_promote(false)")
            .await
            .map_err(Error::postgres("pg_promote"))?;
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut renewed = Instant::now();
        loop {
            let in_recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(Error::postgres("waiting for the end of recovery"))?
                .get(0);
            if !in_recovery {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            if renewed.elapsed() >= Duration::from_secs(1) {
                self.acquire().await?;
                renewed = Instant::now();
            }
            // Promotion takes tens of milliseconds; clients of a switchover wait for it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn switchover(&mut self, target: String) -> Result<()> {
        if target == self.me() || self.member(&target).is_none() {
            warn!(%target, "switchover target is this primary or not a member; clearing the request");
            return self.clear_switchover_request().await;
        }
        let client = self.postgres.connect().await?;
        let application = quote::slot_name(&target);
        let streaming = client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&application],
            )
            .await
            .map_err(Error::postgres("checking the switchover target streams"))?
            .is_some();
        if !streaming {
            let since = match &self.switchover_since {
                Some((name, at)) if *name == target => *at,
                _ => {
                    let now = Instant::now();
                    self.switchover_since = Some((target.clone(), now));
                    now
                }
            };
            if since.elapsed() > Duration::from_secs(self.config.switchover_timeout_seconds) {
                warn!(%target, "switchover target never streamed; abandoning the switchover");
                self.switchover_since = None;
                return self.clear_switchover_request().await;
            }
            return Ok(());
        }
        self.switchover_since = None;
        // Checkpoint while clients still run, so that the shutdown checkpoint inside the pause
        // has little left to write: the pause lasts the stop, the hand-over and the promotion.
        client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(Error::postgres("CHECKPOINT before the switchover"))?;
        // Clients of the Poolers wait in PgBouncer instead of failing: paused before the stop,
        // resumed once the rw Service reaches a writable primary again (this one, if the
        // hand-over fails), or when the pause timeout runs out.
        let paused = self.poolers.pause().await;
        let result = self.hand_over(target, client).await;
        if let Some(paused) = paused {
            self.poolers.resume_when_writable(paused);
        }
        result
    }

    /// The second half of a switchover (checkpointed, poolers paused): stop, write the standby
    /// configuration, hand the Lease to `target`, start as its replica.
    async fn hand_over(&mut self, target: String, client: tokio_postgres::Client) -> Result<()> {
        info!(%target, "switchover: stop and hand over the Lease");
        drop(client);
        let upstream = self.upstream_of(&target)?;
        // Giving up the role on purpose: the clean shutdown must not be cut short.
        self.watchdog.guard(None);
        self.postgres.stop(StopMode::Fast).await;
        let lsn = match self.postgres.shutdown_checkpoint_lsn().await {
            Ok(lsn) => lsn,
            Err(error) => {
                warn!(%error, "no clean shutdown checkpoint; staying primary");
                self.start_primary().await?;
                return Err(error);
            }
        };
        self.postgres.write_config(
            &ManagedSettings {
                upstream: Some(upstream.clone()),
                synchronous_standby_names: String::new(),
            },
            true,
            &self.replication.username,
        )?;
        self.followed = Some(upstream);
        let mut handed = lease::claimed(
            self.lease.lease(),
            &self.cluster.lease_name(),
            &self.config.namespace,
            Some(&target),
            self.config.lease_duration(),
        );
        lease::annotate(
            &mut handed,
            &[
                (contract::ANNOTATION_SWITCHOVER_TO, None),
                (contract::ANNOTATION_SWITCHOVER_LSN, Some(lsn.clone())),
            ],
        );
        let mut outcome = self.cluster.replace_lease(&handed).await;
        // Fault injection for tests: the API server applies the hand-over, its answer is lost.
        if outcome.is_ok() && std::env::var(FAULT_ENV).as_deref() == Ok("lose_handover_answer") {
            outcome = Err(Error::Invalid(
                "fault injection: the hand-over's answer is lost".into(),
            ));
        }
        let written = match outcome {
            Ok(written) => written,
            Err(error) => match self.handed_over_after_all(&target, &lsn).await {
                // The API server applied the update but its answer was lost (a reset
                // connection): the target promotes, so this instance must not.
                Some(written) => written,
                None => return Err(error),
            },
        };
        self.lease.observe(Some(written), Instant::now());
        info!(%target, %lsn, "Lease handed over; restarting as a replica");
        self.role = Role::Replica {
            upstream: Some(target),
        };
        self.last_renewal = None;
        self.last_join = Some("switchover".into());
        self.postgres.start(Duration::from_secs(60)).await
    }

    /// After a failed hand-over write, whether the Lease went to `target` anyway: the write may
    /// have been applied with its answer lost. Only a Lease read back that is still this
    /// instance's makes it primary again; when it cannot be read, PostgreSQL stays stopped and
    /// the next tick resolves the role from the Lease, since restarting as primary while the
    /// target may be promoting would make two writable primaries.
    async fn handed_over_after_all(&mut self, target: &str, lsn: &str) -> Option<Lease> {
        match self.cluster.get_lease().await {
            Ok(Some(current))
                if current
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(target)
                    && lease::annotation_of(&current, contract::ANNOTATION_SWITCHOVER_LSN)
                        == Some(lsn) =>
            {
                info!(%target, "the Lease hand-over was applied although its answer was lost");
                Some(current)
            }
            Ok(current) => {
                warn!("handing over the Lease failed; staying primary");
                self.lease.observe(current, Instant::now());
                if let Err(error) = self.start_primary().await {
                    warn!(%error, "starting again as primary failed");
                }
                None
            }
            Err(error) => {
                warn!(%error, "handing over the Lease failed and the Lease cannot be read: staying stopped until it can");
                self.role = Role::Pending;
                None
            }
        }
    }

    /// Writes [`contract::ANNOTATION_BOOTSTRAPPED`] on the Lease once the data exists twice (or
    /// a lone primary has served a while): from then on a lost volume is never re-initialised.
    async fn mark_bootstrapped(&mut self, client: &tokio_postgres::Client) -> Result<()> {
        let serving_for = self
            .serving_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        if self
            .lease
            .annotation(contract::ANNOTATION_BOOTSTRAPPED)
            .is_some()
            || self.lease.holder().as_deref() != Some(self.me())
        {
            return Ok(());
        }
        let streaming: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .map_err(Error::postgres("counting streaming replicas"))?
            .get(0);
        if !bootstrap::now_bootstrapped(streaming, serving_for) {
            return Ok(());
        }
        let Some(mut current) = self.lease.lease().cloned() else {
            return Ok(());
        };
        lease::annotate(&mut current, &[bootstrap::annotation()]);
        // A renewal in between makes this a conflict: the next upkeep tries again.
        match self.cluster.replace_lease(&current).await {
            Ok(written) => {
                self.lease.observe(Some(written), Instant::now());
                info!(
                    streaming,
                    "the cluster is bootstrapped: its data exists on more than this instance"
                );
            }
            Err(error) => debug!(%error, "marking the Lease bootstrapped failed; retrying"),
        }
        Ok(())
    }

    async fn clear_switchover_request(&mut self) -> Result<()> {
        let Some(mut current) = self.lease.lease().cloned() else {
            return Ok(());
        };
        lease::annotate(&mut current, &[(contract::ANNOTATION_SWITCHOVER_TO, None)]);
        let written = self.cluster.replace_lease(&current).await?;
        self.lease.observe(Some(written), Instant::now());
        Ok(())
    }

    /// Primary upkeep: roles, one physical slot per member, synchronous_standby_names.
    async fn reconcile_primary(&mut self) -> Result<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        if !local.postgres_ready || local.in_recovery != Some(false) {
            return Ok(());
        }
        let client = self.postgres.connect().await?;
        if !self.roles_ensured {
            self.ensure_roles(&client).await?;
            self.roles_ensured = true;
        }
        if !self.api_reachable {
            return Ok(());
        }
        self.mark_bootstrapped(&client).await?;
        let pods = self.other_pods();
        let wanted_slots: Vec<String> = pods.iter().map(|pod| quote::slot_name(pod)).collect();
        let slots = client
            .query(
                "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'",
                &[],
            )
            .await
            .map_err(Error::postgres("listing replication slots"))?;
        for slot in &wanted_slots {
            if !slots.iter().any(|row| row.get::<_, String>(0) == *slot) {
                client
                    .execute(
                        "SELECT pg_create_physical_replication_slot($1, true)",
                        &[slot],
                    )
                    .await
                    .map_err(Error::postgres(format!("creating replication slot {slot}")))?;
                info!(%slot, "replication slot created");
            }
        }
        for row in &slots {
            let name: String = row.get(0);
            let active: bool = row.get(1);
            if !active && !wanted_slots.contains(&name) {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .map_err(Error::postgres(format!("dropping replication slot {name}")))?;
                info!(slot = %name, "replication slot of a former member dropped");
            }
        }
        if self.config.synchronous_standbys > 0 {
            let streaming_apps: Vec<String> = client
                .query(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .await
                .map_err(Error::postgres("listing streaming replicas"))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let streaming: Vec<String> = pods
                .iter()
                .filter(|pod| streaming_apps.contains(&quote::slot_name(pod)))
                .cloned()
                .collect();
            let policy = self.config.sync_policy();
            let next = decision::next_synchronous_set_for(
                &self.synchronous_set,
                &streaming,
                &pods,
                self.me(),
                policy,
            );
            let names = decision::standby_names(&next, policy);
            let current: String = client
                .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                .await
                .map_err(Error::postgres("reading synchronous_standby_names"))?
                .get(0);
            self.synchronous_set = next;
            if current != names {
                self.postgres.write_config(
                    &ManagedSettings {
                        upstream: None,
                        synchronous_standby_names: names.clone(),
                    },
                    false,
                    &self.replication.username,
                )?;
                client
                    .batch_execute("SELECT pg_reload_conf()")
                    .await
                    .map_err(Error::postgres("reloading the configuration"))?;
                info!(synchronous_standby_names = %names, "synchronous standbys updated");
            }
        }
        Ok(())
    }

    /// Creates (or updates the password of) the replication and application roles.
    async fn ensure_roles(&self, client: &tokio_postgres::Client) -> Result<()> {
        // The statements hold passwords: keep them out of the server log.
        client
            .batch_execute("SET log_statement TO 'none'; SET log_min_duration_statement TO -1")
            .await
            .map_err(Error::postgres("hiding role statements from the log"))?;
        // The superuser too: a cluster restored from a backup starts with the source's password.
        let mut roles = vec![
            (&self.superuser, "SUPERUSER LOGIN"),
            (&self.replication, "LOGIN REPLICATION"),
        ];
        if let Some(app) = &self.app {
            roles.push((app, "LOGIN"));
        }
        for (user, attributes) in roles {
            let stored: Option<Option<String>> = client
                .query_opt(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                    &[&user.username],
                )
                .await
                .map_err(Error::postgres("looking up a role"))?
                .map(|row| row.get(0));
            let verb = if stored.is_some() { "ALTER" } else { "CREATE" };
            // A right verifier is kept: a new one (new salt) for the same password would fail
            // the server logins PgBouncer makes with the SCRAM keys of its connected clients.
            let password = match stored.flatten() {
                Some(stored) if crate::declarative::scram::matches(&stored, &user.password) => {
                    String::new()
                }
                // A verifier, never the cleartext (see declarative::scram).
                _ => format!(
                    " PASSWORD {}",
                    quote::literal(&crate::declarative::scram::verifier(&user.password))
                ),
            };
            client
                .batch_execute(&format!(
                    "{verb} ROLE {} WITH {attributes}{password}",
                    quote::identifier(&user.username),
                ))
                .await
                .map_err(Error::postgres(format!("{verb} ROLE {}", user.username)))?;
        }
        if let Some(app) = &self.app {
            let database = self
                .config
                .app_database
                .clone()
                .or_else(|| app.dbname.clone())
                .unwrap_or_else(|| app.username.clone());
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
                .await
                .map_err(Error::postgres("looking up the application database"))?
                .is_some();
            if !exists {
                client
                    .batch_execute(&format!(
                        "CREATE DATABASE {} OWNER {}",
                        quote::identifier(&database),
                        quote::identifier(&app.username)
                    ))
                    .await
                    .map_err(Error::postgres(format!("CREATE DATABASE {database}")))?;
                info!(%database, "application database created");
            }
        }
        Ok(())
    }

    /// Reads role, timeline, LSNs, lag and counters from the local PostgreSQL.
    async fn query_local(&mut self) -> Option<InstanceStatus> {
        if !self.postgres.is_running() {
            return None;
        }
        let client = self.postgres.connect().await.ok()?;
        let row = client
            .query_one(LOCAL_STATUS_QUERY, &[])
            .await
            .map_err(|error| debug!(%error, "status query failed"))
            .ok()?;
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

    /// Updates `/status`, the metrics, the pod's role label and status annotation.
    async fn publish(&mut self) {
        let mut status = self.local.clone().unwrap_or_default();
        status.pod = self.me().to_string();
        status.role = self.role.label().to_string();
        status.fenced = matches!(self.role, Role::Fenced { .. });
        status.api_reachable = self.api_reachable;
        status.postgres_restarts = self.restarts;
        status.last_join = self.last_join.clone();
        status.last_error = self.last_error.clone();
        status.data_lost = self.data_lost.clone();
        status.restart_token = self.restart_token.clone().filter(|token| !token.is_empty());
        status.data_disk_available_bytes = self.postgres.available_bytes();
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
            let primary = self.role == Role::Primary && status.in_recovery == Some(false);
            let replica = matches!(self.role, Role::Replica { .. }) && status.postgres_ready;
            backup.archive.set_active(primary || replica);
            backup.set_role(&status.role, status.postgres_ready);
            let archive = backup.archive.status();
            if (primary && backup.setup.wal_archiving) || archive.refused.is_some() {
                status.wal_archive = Some(archive);
            }
        }
        self.shared.set_status(status.clone());
        if !self.api_reachable {
            return;
        }
        let key = format!(
            "{:?}|{}|{}|{}|{:?}|{:?}|{}|{:?}|{:?}|{:?}",
            status.restart_token,
            status.role,
            status.fenced,
            status.postgres_ready,
            status.timeline,
            status.synchronous_standbys,
            status.streaming,
            status.last_join,
            status.wal_archive.as_ref().map(|archive| &archive.refused),
            status.data_lost,
        );
        let due = match &self.last_published {
            Some((last, at)) => *last != key || at.elapsed() >= PUBLISH_PERIOD,
            None => true,
        };
        // A pending instance has nothing to report, except a refusal to bootstrap (the
        // operator turns it into the cluster's ContinuousArchiving condition) or a data loss
        // (the DataLost condition).
        let refused = status
            .wal_archive
            .as_ref()
            .is_some_and(|archive| archive.refused.is_some());
        if !due || (self.role == Role::Pending && !refused && status.data_lost.is_none()) {
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
