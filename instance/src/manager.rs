//! The run loop: every tick it observes (Lease, pods, fence annotations, local PostgreSQL), asks
//! [`crate::decision::next_step`] what to do, and acts. It is the only code that starts, stops,
//! promotes or demotes PostgreSQL. The loop and its observations are here; the steps it takes
//! are in `manager/`: `election` (the Lease, promotion), `switchover`, `restore` (starting in a
//! role, rejoin, re-clone, restore from a backup), `primary` (primary upkeep), `status`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::contract;
use futures::future::join_all;
use k8s_openapi::api::coordination::v1::Lease;
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

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

mod election;
mod phases;
mod primary;
mod restore;
mod roles;
mod setup;
mod status;
mod switchover;

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

/// Runs the instance manager until SIGTERM / SIGINT. `fence` is the fence process started
/// before the runtime (see [`crate::watchdog`]); without it only the watchdog task guards.
pub async fn run(config: Config, fence: Option<crate::watchdog::Fence>) -> Result<()> {
    // A hanging call must leave time, within the renew deadline, for the peers check and the stop.
    let api_timeout =
        Duration::from_millis((config.renew_deadline_seconds * 1000 / 4).clamp(250, 1000));
    let client = setup::kube_client(&config, api_timeout).await?;
    let cluster = Cluster::new(
        client,
        &config.namespace,
        &config.cluster,
        &config.pod_name,
        api_timeout,
    );
    let (superuser, replication, app) = setup::wait_for_credentials(&cluster, &config).await;
    let mut postgres = LocalPostgres::new(&config, &superuser.username)?;
    postgres.write_passfile(&superuser, &replication)?;
    // PostgresUser / PostgresDatabase: watched with a client whose timeouts suit watches.
    let (declarative_primary, primary_watch) = tokio::sync::watch::channel(false);
    let (declarative_designated, designated_watch) = tokio::sync::watch::channel(false);
    let declarative_client = setup::kube_client(&config, Duration::from_secs(60)).await?;
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
        designated_watch.clone(),
    );
    let shared = Shared::new(
        &config.pod_name,
        config.max_lag_bytes,
        config.renew_deadline() / 2,
    );
    let backup = setup::start_backups(&config, &mut postgres, &shared)?;
    if let Some(service) = &backup {
        tokio::spawn(crate::backup::source_lag::run(
            service.clone(),
            shared.clone(),
            designated_watch,
            Duration::from_secs(config.source_archive_check_seconds.max(1)),
        ));
    }
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
    let listener = http::bind(config.http_address).await?;
    let mut endpoints = tokio::spawn(http::serve(listener, shared.clone()));

    let watchdog = Arc::new(fence.map_or_else(Watchdog::default, Watchdog::with_fence));
    tokio::spawn(watchdog.clone().run(Duration::from_millis(100)));
    let bootstrap_roles = Arc::new(roles::BootstrapRoles {
        connector: postgres.connector("pg-instance roles"),
        superuser: superuser.clone(),
        replication: replication.clone(),
        app,
        app_database: config.app_database.clone(),
    });
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
        bootstrap_roles,
        superuser,
        replication,
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
        roles: roles::RoleUpkeep::default(),
        serving_since: None,
        synchronous_set: Vec::new(),
        last_wait_reason: None,
        restart_requested: None,
        restart_token: None,
        not_streaming_since: None,
        rewound_while_stuck: false,
        included_config: None,
        tls_fingerprint: None,
        tls_ca: None,
        certificates: Vec::new(),
        declarative_primary,
        declarative_designated,
        backup,
        restarts_since_ready: 0,
        postgres_down_since: None,
        fenced_at: None,
        followed: None,
        poolers,
        stranded_since: None,
        data_lost: None,
        initdb_failed: false,
        outage_confirmed_at: None,
        outage_logged: false,
        local_client: None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::io("SIGTERM handler"))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::io("SIGINT handler"))?;
    let mut hangup = signal(SignalKind::hangup()).map_err(Error::io("SIGHUP handler"))?;
    let mut interval = tokio::time::interval(manager.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Without its endpoints the instance has no probes and peers cannot read its status: it
    // stops, PostgreSQL with it, and the process exits with the error (the pod restarts).
    let outcome = loop {
        tokio::select! {
            _ = interval.tick() => manager.tick().await,
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            _ = hangup.recv() => manager.postgres.signal(Signal::SIGHUP),
            served = &mut endpoints => {
                let error = match served {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) => Error::Invalid("the HTTP endpoints stopped".into()),
                    Err(error) => Error::Invalid(format!("the HTTP endpoints task ended: {error}")),
                };
                tracing::error!(%error, "HTTP endpoints stopped: shutting down");
                break Err(error);
            }
        }
    };
    info!("shutting down: stopping PostgreSQL");
    manager.watchdog.guard(None);
    manager.postgres.stop(StopMode::Fast).await;
    if manager.role == Role::Primary {
        manager.release_lease().await;
    }
    outcome
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
    /// The bootstrap roles and the application database (primary).
    roles: roles::RoleUpkeep,
    bootstrap_roles: Arc<roles::BootstrapRoles>,
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
    /// Digest of the CA bundle last installed and loaded (`tlsCa` of the status).
    tls_ca: Option<String>,
    /// Validity of the certificates last installed (`certificates` of the status).
    certificates: Vec<crate::tls::CertificateValidity>,
    /// Tells the declarative reconcilers whether this instance is a writable primary.
    declarative_primary: tokio::sync::watch::Sender<bool>,
    /// Whether this instance is a replica cluster's designated primary (read-only).
    declarative_designated: tokio::sync::watch::Sender<bool>,
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
    /// The last initdb of this process failed (a setting initdb refuses, such as an unknown
    /// locale): the next attempt is a retry of a known failure, not a bootstrap cut short.
    initdb_failed: bool,
    /// When every peer last confirmed that it cannot reach the API server either (primary).
    outage_confirmed_at: Option<Instant>,
    /// Whether the last peers check confirmed an outage (logged on change, not every tick).
    outage_logged: bool,
    /// The run loop's connection to the local PostgreSQL, kept across ticks (see
    /// [`Manager::local_client`]).
    local_client: Option<Arc<tokio_postgres::Client>>,
}

impl Manager {
    fn me(&self) -> &str {
        &self.config.pod_name
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        let mut phases = phases::Phases::start();
        let was_primary = self.role == Role::Primary;
        self.observe_lease(now).await;
        phases.end("lease");
        if self.api_reachable {
            self.observe_members().await;
        }
        phases.end("members");
        self.restart_on_request().await;
        phases.end("restart_request");
        self.reload_on_config_change();
        self.reload_on_certificate_change();
        let restart_failed = self.supervise().await;
        phases.end("supervise");
        self.local = self.query_local().await;
        phases.end("local_status");
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
            phases.end("peers");
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
            // A step that succeeds does not hide a restart that failed this tick.
            Ok(()) => self.last_error = restart_failed,
            Err(error) => {
                warn!(%error, role = ?self.role, "step failed; retrying on the next tick");
                self.last_error = Some(error.to_string());
            }
        }
        phases.end("act");
        // On a new cluster the declarative and pooler auth loops start once the bootstrap roles
        // and the application database exist: a PostgresDatabase may be owned by the
        // application role, and the pooler's lookup function goes into the databases there are.
        let in_recovery = self.local.as_ref().and_then(|local| local.in_recovery);
        let writable = self.role == Role::Primary
            && !self.roles.new_cluster_pending()
            && in_recovery == Some(false);
        self.declarative_primary
            .send_if_modified(|primary| std::mem::replace(primary, writable) != writable);
        let designated =
            self.role == Role::Primary && self.follows_source() && in_recovery == Some(true);
        self.declarative_designated
            .send_if_modified(|current| std::mem::replace(current, designated) != designated);
        self.watchdog.guard(if self.role == Role::Primary {
            self.postgres.pid()
        } else {
            None
        });
        self.publish().await;
        phases.end("publish");
        // Half the renew deadline: a primary's next renewal is then already late. Other roles
        // have long steps by design (initdb, a clone, a rewind): only a primary's is a warning.
        if phases.total() >= self.config.renew_deadline() / 2 {
            let took_ms = phases.total().as_millis() as u64;
            let slowest = phases.summary();
            if was_primary {
                warn!(took_ms, %slowest, "slow tick: the primary's next Lease renewal is late");
            } else {
                debug!(took_ms, %slowest, role = ?self.role, "slow tick");
            }
        }
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
                    debug!("renewing the Lease: changed since it was read; reading it again");
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
        self.roles.reset();
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
        self.tls_ca = tls.installed_ca_digest();
        self.certificates = tls.installed_validity();
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

    /// A primary's managed settings: no upstream, and `synchronous_standby_names` from the
    /// current synchronous set under the cluster's policy (the same on promotion and on start).
    fn primary_settings(&self) -> ManagedSettings {
        ManagedSettings {
            upstream: None,
            synchronous_standby_names: decision::standby_names(
                &self.synchronous_set,
                self.config.sync_policy(),
            ),
        }
    }

    fn other_pods(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| member.name.clone())
            .filter(|name| name != self.me())
            .collect()
    }

    /// Restarts a crashed PostgreSQL (primary or replica). Why the restart failed, if it did.
    async fn supervise(&mut self) -> Option<String> {
        let should_run = matches!(self.role, Role::Primary | Role::Replica { .. });
        if !should_run || self.postgres.is_running() {
            return None;
        }
        let renewed_recently = self
            .last_renewal
            .is_some_and(|at| at.elapsed() < self.config.renew_deadline());
        if self.role == Role::Primary
            && (self.lease.holder().as_deref() != Some(self.me()) || !renewed_recently)
        {
            return None;
        }
        warn!(role = ?self.role, "postgres is not running; restarting it");
        self.restarts += 1;
        self.restarts_since_ready += 1;
        self.postgres_down_since.get_or_insert_with(Instant::now);
        self.roles.reset();
        match self.postgres.start(Duration::ZERO).await {
            Ok(()) => None,
            // Started, still recovering: readiness is checked every tick.
            Err(_) if self.postgres.is_running() => None,
            Err(error) => {
                debug!(%error, "postgres restart failed");
                Some(format!("restarting PostgreSQL: {error}"))
            }
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
                if let Some(why) = again.filter(|_| !self.initdb_failed) {
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
                    // A replica cluster's roles are its source's until it is promoted: none to
                    // make now (its primary is read-only), so none is waited for.
                    if !self.follows_source() {
                        self.roles.new_cluster();
                    }
                    self.bootstrap_from_backup(recovery).await?;
                    self.last_join = Some("restore".into());
                    return Ok(Role::Primary);
                }
                info!("bootstrapping a new cluster with initdb");
                std::fs::write(&initdb_marker, b"")
                    .map_err(Error::io("writing the initdb marker"))?;
                self.roles.new_cluster();
                if let Err(error) = self.postgres.initdb(&self.superuser).await {
                    // Said once as an event (the recorder counts repeats) and every tick in the
                    // status; retried, as a cause outside the spec (a full disk) may go away.
                    self.initdb_failed = true;
                    if let Err(event_error) = self
                        .cluster
                        .warning_event("InitdbFailed", error.to_string())
                        .await
                    {
                        debug!(error = %event_error, "recording the initdb event failed");
                    }
                    return Err(error);
                }
                self.initdb_failed = false;
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
        let restored = crate::volume_backup::restored_marker(self.postgres.pgdata());
        // Restored and not started yet: the first start, or a restart of the manager during
        // the archive recovery that follows it (its own Lease then).
        let resuming = holder.as_deref() == Some(me.as_str());
        if restored.exists() && (resuming || (holder.is_none() && !self.lease.ever_held())) {
            return self.start_restored_volume(&restored, resuming).await;
        }
        self.postgres.stop(StopMode::Fast).await;
        let standby = self.postgres.is_standby_configured();
        match holder {
            Some(holder) if holder == me => {
                if standby && !self.follows_source() {
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
}
