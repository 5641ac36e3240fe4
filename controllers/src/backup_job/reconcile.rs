//! The acting part of the BackupJob reconciler: reads the cluster and its pods, calls the chosen
//! instance manager, writes the status (phase, conditions, events).

use std::sync::Arc;
use std::time::Duration;

use api::BackupJob;
use api::backup::BackupJobStatus;
use api::common::{new_condition, set_condition};
use api::contract;
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::Error;
use super::decide::{self, Run};
use crate::postgres_cluster::{Context, FIELD_MANAGER};

/// Condition type of a BackupJob: True once the backup is in the repository.
pub const CONDITION_COMPLETED: &str = "Completed";
/// Phases.
pub mod phase {
    /// Waiting for an instance to take it.
    pub const PENDING: &str = "Pending";
    /// Being taken.
    pub const RUNNING: &str = "Running";
    /// In the repository.
    pub const COMPLETED: &str = "Completed";
    /// Failed; the condition says why.
    pub const FAILED: &str = "Failed";
}

/// How often a running backup is polled.
const POLL: Duration = Duration::from_secs(2);
/// How long the HTTP calls to an instance manager may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One reconciliation of a BackupJob.
pub async fn reconcile(job: Arc<BackupJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = job.name_any();
    let namespace = job
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let status = job.status.clone().unwrap_or_default();
    match status.phase.as_deref() {
        Some(phase::COMPLETED) => {
            // Every completed job is seen again when the operator starts: the figure the
            // PostgresBackupTooOld alert reads survives restarts of the operator and the pods.
            if let Some(completed) = &status.completed_at {
                ctx.metrics.observe_backup_completed(
                    &namespace,
                    &job.spec.cluster.name,
                    completed.0.as_millisecond() as f64 / 1000.0,
                );
            }
            return Ok(Action::await_change());
        }
        Some(phase::FAILED) => return Ok(Action::await_change()),
        Some(phase::RUNNING) if job.spec.volume.is_some() => {
            return super::volume::follow(&job, &ctx, &namespace, status).await;
        }
        Some(phase::RUNNING) => return follow(&job, &ctx, &namespace, status).await,
        _ => {}
    }

    // Dereference and validate.
    let cluster_name = &job.spec.cluster.name;
    let clusters: Api<PostgresCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let cluster = clusters
        .get_opt(cluster_name)
        .await
        .map_err(|source| Error::Dereference {
            what: format!("PostgresCluster {namespace}/{cluster_name}"),
            source,
        })?;
    let Some(cluster) = cluster else {
        return wait(&job, &ctx, status, "ClusterNotFound", format!("PostgresCluster {cluster_name} does not exist (yet): create it, or fix spec.cluster.name")).await;
    };
    if cluster.spec.backup.is_none() && job.spec.volume.is_none() {
        return fail(&job, &ctx, status, "NoBackupRepository", format!("PostgresCluster {cluster_name} has no spec.backup: add a backup repository (s3 endpoint, bucket, credentialsSecret), or back up to a volume (spec.volume), in a new BackupJob")).await;
    }

    if job.spec.volume.is_some()
        && let Some(problem) = super::volume::claim_taken(&job, &ctx, &namespace).await?
    {
        // Said at once, not after the jobs queued before this one.
        return fail(&job, &ctx, status, "ClaimExists", problem).await;
    }

    // One base backup of a cluster to its store at a time, oldest job first (`decide::turn`).
    // The start lock, held until the backup has started, makes "no other job runs" and "this
    // one runs now" one step: two jobs reconciled at once would both see the other still
    // Pending. A backup to a volume goes into a claim of its own: it neither queues nor locks.
    let _starting = match &job.spec.volume {
        Some(_) => None,
        None => {
            let starting = start_lock(&namespace, cluster_name).lock_owned().await;
            let all_jobs = Api::<BackupJob>::namespaced(ctx.client.clone(), &namespace)
                .list(&ListParams::default())
                .await
                .map_err(|source| Error::Dereference {
                    what: format!("BackupJobs of {namespace}"),
                    source,
                })?;
            match decide::turn(&job, &all_jobs.items) {
                decide::Turn::Go => {}
                decide::Turn::Running(other) => {
                    return wait(&job, &ctx, status, "BackupRunning", format!("BackupJob {other} is backing up {cluster_name} to its store; this one starts when it ends (one base backup of a cluster to its store at a time)")).await;
                }
                decide::Turn::Queued(other) => {
                    return wait(&job, &ctx, status, "Queued", format!("BackupJob {other} of {cluster_name} is older and goes first; this one follows (one base backup of a cluster to its store at a time)")).await;
                }
            }
            Some(starting)
        }
    };

    // Start: pick the instance and ask it.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("{}={cluster_name}", contract::LABEL_CLUSTER)))
        .await
        .map_err(|source| Error::Dereference {
            what: format!("pods of PostgresCluster {namespace}/{cluster_name}"),
            source,
        })?;
    let designated = crate::postgres_cluster::replica::is_replica_cluster(&cluster);
    let candidates: Vec<decide::Candidate> = list
        .items
        .iter()
        .filter_map(|pod| decide::candidate(pod, designated))
        .collect();
    let Some(chosen) = decide::pick(&candidates, job.spec.prefer_replica) else {
        return wait(
            &job,
            &ctx,
            status,
            "NoHealthyInstance",
            format!("no healthy instance of {cluster_name} can take the backup yet; waiting"),
        )
        .await;
    };
    if let Some(storage) = &job.spec.volume {
        return super::volume::start(&job, &ctx, &namespace, chosen, storage, status).await;
    }
    match call(
        &chosen.ip,
        chosen.http_port,
        "POST",
        &format!("/backups/{name}"),
    )
    .await
    {
        Ok((202, _)) => {
            mark_running(
                &job,
                &ctx,
                status,
                &chosen.name,
                format!("base backup running on {} ({})", chosen.name, chosen.role),
                format!("base backup started on {} ({})", chosen.name, chosen.role),
            )
            .await?;
            Ok(Action::requeue(POLL))
        }
        Ok((code, body)) if code == 409 || code == 0 => {
            wait(
                &job,
                &ctx,
                status,
                "InstanceBusy",
                format!(
                    "{} cannot take the backup yet ({code}: {}); retrying",
                    chosen.name,
                    body.trim()
                ),
            )
            .await
        }
        Ok((code, body)) => {
            fail(
                &job,
                &ctx,
                status,
                "Refused",
                format!(
                    "{} refused the backup ({code}): {}",
                    chosen.name,
                    body.trim()
                ),
            )
            .await
        }
        Err(error) => {
            wait(
                &job,
                &ctx,
                status,
                "InstanceUnreachable",
                format!(
                    "the instance manager of {} is unreachable ({error}); retrying",
                    chosen.name
                ),
            )
            .await
        }
    }
}

/// The lock under which a job of the cluster `namespace/cluster` decides to start and starts.
/// One per cluster, for the operator process (the elected leader is the only one reconciling).
fn start_lock(namespace: &str, cluster: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut locks = LOCKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Locks nobody holds or waits for are dropped, so that deleted clusters leave none behind.
    locks.retain(|_, lock| Arc::strong_count(lock) > 1);
    locks
        .entry(format!("{namespace}/{cluster}"))
        .or_default()
        .clone()
}

/// Follows a running backup on its instance.
async fn follow(
    job: &BackupJob,
    ctx: &Context,
    namespace: &str,
    status: BackupJobStatus,
) -> Result<Action, Error> {
    let name = job.name_any();
    let Some(instance) = status.instance.clone() else {
        return fail(
            job,
            ctx,
            status,
            "Lost",
            "the job runs on no known instance".into(),
        )
        .await;
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let pod = pods
        .get_opt(&instance)
        .await
        .map_err(|source| Error::Dereference {
            what: format!("pod {namespace}/{instance}"),
            source,
        })?;
    // Only its address is used here (its health was judged when the job started).
    let Some(candidate) = pod.as_ref().and_then(|pod| decide::candidate(pod, false)) else {
        return fail(
            job,
            ctx,
            status,
            "InstanceGone",
            format!("pod {instance} went away during the backup; create a new BackupJob"),
        )
        .await;
    };
    let lost = |detail: String| {
        format!(
            "the instance manager of {instance} lost the backup run ({detail}): it was killed or restarted during the backup; create a new BackupJob"
        )
    };
    match call(
        &candidate.ip,
        candidate.http_port,
        "GET",
        &format!("/backups/{name}"),
    )
    .await
    {
        Ok((200, body)) => {
            let run: Run = serde_json::from_str(&body).unwrap_or_default();
            match run.phase.as_str() {
                "Completed" => complete(job, ctx, status, &instance, run).await,
                "Failed" => {
                    let reason = decide::failure_reason(
                        &instance,
                        run.error.as_deref().unwrap_or("unknown error"),
                    );
                    fail(job, ctx, status, "BackupFailed", reason).await
                }
                _ => Ok(Action::requeue(POLL)),
            }
        }
        Ok((404, _)) => fail(job, ctx, status, "RunLost", lost("no such run".into())).await,
        Ok((code, body)) => {
            fail(
                job,
                ctx,
                status,
                "RunLost",
                lost(format!("{code}: {}", body.trim())),
            )
            .await
        }
        Err(error) => fail(job, ctx, status, "RunLost", lost(error.to_string())).await,
    }
}

async fn complete(
    job: &BackupJob,
    ctx: &Context,
    mut status: BackupJobStatus,
    instance: &str,
    run: Run,
) -> Result<Action, Error> {
    let backup = run.backup.unwrap_or_default();
    status.backup_id = Some(backup.backup_id.clone());
    status.begin_lsn = backup.begin_lsn;
    status.end_lsn = backup.end_lsn;
    status.begin_time = backup.begin_time;
    status.end_time = backup.end_time;
    status.size_bytes = backup.size_bytes;
    let message = format!("backup {} taken on {instance}", backup.backup_id);
    mark_completed(job, ctx, status, message).await?;
    apply_retention(job, ctx, instance).await;
    Ok(Action::await_change())
}

/// Marks the job Running on `instance` (the fields a start adds are in `status` already), with
/// `condition` in its Completed condition and `event` as the Started event.
pub(super) async fn mark_running(
    job: &BackupJob,
    ctx: &Context,
    mut status: BackupJobStatus,
    instance: &str,
    condition: String,
    event: String,
) -> Result<(), Error> {
    status.phase = Some(phase::RUNNING.into());
    status.instance = Some(instance.to_string());
    status.started_at = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    set_condition(
        &mut status.conditions,
        new_condition(
            CONDITION_COMPLETED,
            false,
            "Running",
            condition,
            job.metadata.generation,
        ),
    );
    write_status(job, ctx, status).await?;
    publish(ctx, job, EventType::Normal, "Started", event).await;
    Ok(())
}

/// Ends the job as Completed (the backup's figures are in `status` already), with the
/// condition and the event saying `message`.
pub(super) async fn mark_completed(
    job: &BackupJob,
    ctx: &Context,
    mut status: BackupJobStatus,
    message: String,
) -> Result<(), Error> {
    status.phase = Some(phase::COMPLETED.into());
    status.completed_at = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    status.failure_reason = None;
    set_condition(
        &mut status.conditions,
        new_condition(
            CONDITION_COMPLETED,
            true,
            "Completed",
            message.clone(),
            job.metadata.generation,
        ),
    );
    write_status(job, ctx, status).await?;
    publish(ctx, job, EventType::Normal, "Completed", message).await;
    Ok(())
}

/// Applies the cluster's `spec.backup.retention` after a completed backup, on the instance that
/// took it (the engine never deletes the base backup the recovery window starts from); the
/// outcome is an event.
async fn apply_retention(job: &BackupJob, ctx: &Context, instance: &str) {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let Some(candidate) = pods
        .get_opt(instance)
        .await
        .ok()
        .flatten()
        .as_ref()
        // Only its address is used here.
        .and_then(|pod| decide::candidate(pod, false))
    else {
        return;
    };
    match call(&candidate.ip, candidate.http_port, "POST", "/retention").await {
        Ok((200, _)) => {
            publish(
                ctx,
                job,
                EventType::Normal,
                "RetentionApplied",
                "backups outside spec.backup.retention deleted".into(),
            )
            .await
        }
        Ok((code, body)) => {
            publish(
                ctx,
                job,
                EventType::Warning,
                "RetentionFailed",
                format!(
                    "applying spec.backup.retention failed ({code}): {}",
                    body.trim()
                ),
            )
            .await
        }
        Err(error) => {
            publish(
                ctx,
                job,
                EventType::Warning,
                "RetentionFailed",
                format!("applying spec.backup.retention failed: {error}"),
            )
            .await
        }
    }
}

pub(super) async fn fail(
    job: &BackupJob,
    ctx: &Context,
    mut status: BackupJobStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    status.phase = Some(phase::FAILED.into());
    status.failure_reason = Some(message.clone());
    status.completed_at = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    set_condition(
        &mut status.conditions,
        new_condition(
            CONDITION_COMPLETED,
            false,
            reason,
            message.clone(),
            job.metadata.generation,
        ),
    );
    write_status(job, ctx, status).await?;
    publish(ctx, job, EventType::Warning, reason, message).await;
    Ok(Action::await_change())
}

pub(super) async fn wait(
    job: &BackupJob,
    ctx: &Context,
    mut status: BackupJobStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    status.phase = Some(phase::PENDING.into());
    set_condition(
        &mut status.conditions,
        new_condition(
            CONDITION_COMPLETED,
            false,
            reason,
            message,
            job.metadata.generation,
        ),
    );
    write_status(job, ctx, status).await?;
    Ok(Action::requeue(Duration::from_secs(5)))
}

pub(super) async fn write_status(
    job: &BackupJob,
    ctx: &Context,
    mut status: BackupJobStatus,
) -> Result<(), Error> {
    let name = job.name_any();
    status.observed_generation = job.metadata.generation;
    let jobs: Api<BackupJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "BackupJob",
        "status": status,
    });
    jobs.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::UpdateStatus { name, source })?;
    Ok(())
}

pub(super) async fn publish(
    ctx: &Context,
    job: &BackupJob,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Backup".to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        tracing::warn!(job = %job.name_any(), %error, "publishing an event failed");
    }
}

/// One HTTP/1.0 call to an instance manager: (status code, body).
async fn call(host: &str, port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream
            .write_all(
                format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 10 s",
            ))
        })
}
