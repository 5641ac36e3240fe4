//! ScheduledBackup reconciler: creates a BackupJob (owned by the schedule, labelled with its name)
//! each time the cron schedule fires, right away when `immediate`, never while `suspend`, and
//! deletes finished BackupJobs beyond `keepJobs`. The backups themselves stay in the repository
//! until the cluster's retention (`spec.backup.retention`) expires them: the BackupJob reconciler
//! applies it after each completed backup. A schedule of backups to a volume (`spec.volume`)
//! deletes the claim of each BackupJob it prunes: `keepJobs` is then the number of backups kept.
//!
//! Stages: validate (the schedule) → plan ([`plan`], pure) → apply (create, delete) → update
//! status.

pub mod cron;

use std::sync::Arc;
use std::time::Duration;

use api::backup::{BackupJob, ScheduledBackup, ScheduledBackupStatus};
use api::common::{new_condition, set_condition};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::{Api, Resource, ResourceExt};

use crate::postgres_cluster::{Context, FIELD_MANAGER};

/// Label on the BackupJobs a schedule creates: the schedule's name.
pub const LABEL_SCHEDULE: &str = "postgres.keiailab.io/scheduled-backup";
/// Condition type: True while the schedule creates jobs.
pub const CONDITION_SCHEDULED: &str = "Scheduled";

/// Errors of a reconciliation, one per stage that talks to the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listing the schedule's BackupJobs failed.
    #[error("listing the BackupJobs of {name} failed: {source}")]
    List {
        /// Schedule name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Creating or deleting a BackupJob failed.
    #[error("{what} failed: {source}")]
    Apply {
        /// What was done.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("updating the status of ScheduledBackup {name} failed: {source}")]
    UpdateStatus {
        /// Schedule name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// One existing BackupJob of the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobView {
    /// Name.
    pub name: String,
    /// Creation time.
    pub created: Timestamp,
    /// Completed or Failed.
    pub finished: bool,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Create a BackupJob now.
    pub create: bool,
    /// When the schedule fires next.
    pub next: Option<Timestamp>,
    /// Finished BackupJobs to delete (beyond keepJobs), oldest first.
    pub delete: Vec<String>,
}

/// Decides from the schedule, the last run, the time and the existing jobs.
pub fn plan(
    schedule: &cron::Schedule,
    spec: &api::backup::ScheduledBackupSpec,
    created: Timestamp,
    last: Option<Timestamp>,
    now: Timestamp,
    jobs: &[JobView],
) -> Plan {
    let due = match last {
        None if spec.immediate => true,
        None => schedule.next_after(created).is_some_and(|next| next <= now),
        Some(last) => schedule.next_after(last).is_some_and(|next| next <= now),
    };
    let create = due && !spec.suspend;
    let mut finished: Vec<&JobView> = jobs.iter().filter(|job| job.finished).collect();
    finished.sort_by_key(|job| (job.created, job.name.clone()));
    let keep = spec.keep_jobs.max(1) as usize;
    let delete = finished
        .iter()
        .take(finished.len().saturating_sub(keep))
        .map(|job| job.name.clone())
        .collect();
    Plan {
        create,
        next: if spec.suspend {
            None
        } else {
            schedule.next_after(now)
        },
        delete,
    }
}

/// Retry after an error.
pub fn error_policy(schedule: Arc<ScheduledBackup>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(schedule = %schedule.name_any(), %error, "scheduled backup reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One reconciliation.
pub async fn reconcile(schedule: Arc<ScheduledBackup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = schedule.name_any();
    let namespace = schedule.namespace().unwrap_or_default();
    let mut status = schedule.status.clone().unwrap_or_default();
    let generation = schedule.metadata.generation;
    let parsed = match cron::Schedule::parse(&schedule.spec.schedule) {
        Ok(parsed) => parsed,
        Err(error) => {
            set_condition(
                &mut status.conditions,
                new_condition(
                    CONDITION_SCHEDULED,
                    false,
                    "InvalidSchedule",
                    format!("spec.schedule {:?}: {error}", schedule.spec.schedule),
                    generation,
                ),
            );
            write_status(&schedule, &ctx, status).await?;
            return Ok(Action::await_change());
        }
    };
    let jobs_api: Api<BackupJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let jobs = jobs_api
        .list(&ListParams::default().labels(&format!("{LABEL_SCHEDULE}={name}")))
        .await
        .map_err(|source| Error::List {
            name: name.clone(),
            source,
        })?;
    let views: Vec<JobView> = jobs
        .items
        .iter()
        .map(|job| JobView {
            name: job.name_any(),
            created: job
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0)
                .unwrap_or_else(Timestamp::now),
            finished: matches!(
                job.status
                    .as_ref()
                    .and_then(|status| status.phase.as_deref()),
                Some("Completed") | Some("Failed")
            ),
        })
        .collect();
    let now = Timestamp::now();
    let created = schedule
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|time| time.0)
        .unwrap_or(now);
    let last = status.last_schedule_time.as_ref().map(|time| time.0);
    let decided = plan(&parsed, &schedule.spec, created, last, now, &views);

    if decided.create {
        let job_name = format!("{name}-{}", now.strftime("%Y%m%d%H%M%S"));
        let owner = schedule
            .controller_owner_ref(&())
            .into_iter()
            .collect::<Vec<_>>();
        let job: BackupJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "BackupJob",
            "metadata": {"name": job_name, "labels": {LABEL_SCHEDULE: name}, "ownerReferences": owner},
            "spec": {
                "cluster": schedule.spec.cluster,
                "method": schedule.spec.method,
                "backupType": schedule.spec.backup_type,
                "preferReplica": schedule.spec.prefer_replica,
                "volume": schedule.spec.volume,
            },
        }))
        .expect("a BackupJob built from a valid ScheduledBackup");
        match jobs_api.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => {
                return Err(Error::Apply {
                    what: format!("creating BackupJob {job_name}"),
                    source,
                });
            }
        }
        status.last_schedule_time = Some(Time(now));
        status.last_backup_job = Some(job_name);
    }
    for old in &decided.delete {
        match jobs_api.delete(old, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(Error::Apply {
                    what: format!("deleting BackupJob {old}"),
                    source,
                });
            }
        }
        if schedule.spec.volume.is_some() {
            delete_backup_claim(&ctx, &namespace, old).await?;
        }
    }
    status.next_schedule_time = decided.next.map(Time);
    let (state, reason, message) = if schedule.spec.suspend {
        (
            false,
            "Suspended",
            "spec.suspend is set: no BackupJob is created".to_string(),
        )
    } else {
        (
            true,
            "Scheduled",
            match decided.next {
                Some(next) => format!("next BackupJob at {next}"),
                None => "the schedule never fires".to_string(),
            },
        )
    };
    set_condition(
        &mut status.conditions,
        new_condition(CONDITION_SCHEDULED, state, reason, message, generation),
    );
    write_status(&schedule, &ctx, status).await?;
    let wait = decided
        .next
        .map(|next| {
            Duration::from_millis((next.as_millisecond() - now.as_millisecond()).max(1000) as u64)
        })
        .unwrap_or(Duration::from_secs(3600));
    // Jobs finish on their own time: look again soon to prune them.
    Ok(Action::requeue(wait.min(Duration::from_secs(30))))
}

/// Deletes the claim holding the backup of the pruned BackupJob `job` (a backup to a volume),
/// only if that BackupJob made it: the backup count is the schedule's `keepJobs`.
async fn delete_backup_claim(ctx: &Context, namespace: &str, job: &str) -> Result<(), Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let apply_error = |what: String| move |source| Error::Apply { what, source };
    let Some(claim) = claims
        .get_opt(job)
        .await
        .map_err(apply_error(format!("reading PersistentVolumeClaim {job}")))?
    else {
        return Ok(());
    };
    if claim
        .labels()
        .get(crate::volume_backup::LABEL_BACKUP_JOB)
        .map(String::as_str)
        != Some(job)
    {
        return Ok(());
    }
    match claims.delete(job, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Apply {
            what: format!("deleting PersistentVolumeClaim {job}"),
            source,
        }),
    }
}

async fn write_status(
    schedule: &ScheduledBackup,
    ctx: &Context,
    mut status: ScheduledBackupStatus,
) -> Result<(), Error> {
    let name = schedule.name_any();
    status.observed_generation = schedule.metadata.generation;
    let api: Api<ScheduledBackup> = Api::namespaced(
        ctx.client.clone(),
        &schedule.namespace().unwrap_or_default(),
    );
    let patch = serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "ScheduledBackup",
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::UpdateStatus { name, source })?;
    Ok(())
}

/// Runs the ScheduledBackup controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let namespace = namespace.as_deref();
    let schedules: Api<ScheduledBackup> = crate::postgres_cluster::scoped(&ctx.client, namespace);
    let jobs: Api<BackupJob> = crate::postgres_cluster::scoped(&ctx.client, namespace);
    let controller = Controller::new(schedules, ctx.settings.watch_config())
        .owns(jobs, ctx.settings.watch_config().labels(LABEL_SCHEDULE))
        .trigger_backoff(crate::watches::TriggerBackoff::default())
        .with_config(ControllerConfig::default().concurrency(4));
    crate::telemetry::run_until_shutdown(
        controller,
        "scheduledbackup",
        crate::telemetry::traced_and_measured(reconcile),
        error_policy,
        ctx,
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(immediate: bool, suspend: bool, keep_jobs: i32) -> api::backup::ScheduledBackupSpec {
        serde_json::from_value(serde_json::json!({
            "cluster": {"name": "db"}, "schedule": "0 3 * * *",
            "immediate": immediate, "suspend": suspend, "keepJobs": keep_jobs,
        }))
        .unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn job(name: &str, created: &str, finished: bool) -> JobView {
        JobView {
            name: name.into(),
            created: at(created),
            finished,
        }
    }

    #[test]
    fn immediate_suspend_schedule_and_keep_jobs() {
        let schedule = cron::Schedule::parse("0 3 * * *").unwrap();
        let created = at("2026-12-04T01:00:00Z");
        let now = at("2026-12-04T02:00:00Z");
        assert!(plan(&schedule, &spec(true, false, 7), created, None, now, &[]).create);
        assert!(!plan(&schedule, &spec(false, false, 7), created, None, now, &[]).create);
        assert!(!plan(&schedule, &spec(true, true, 7), created, None, now, &[]).create);
        let later = at("2026-12-04T03:00:05Z");
        let decided = plan(
            &schedule,
            &spec(false, false, 7),
            created,
            Some(now),
            later,
            &[],
        );
        assert!(decided.create);
        assert_eq!(decided.next, Some(at("2026-12-05T03:00:00Z")));
        assert!(
            !plan(
                &schedule,
                &spec(false, true, 7),
                created,
                Some(now),
                later,
                &[]
            )
            .create
        );
        let jobs = [
            job("s-3", "2026-12-03T03:00:00Z", true),
            job("s-1", "2026-12-01T03:00:00Z", true),
            job("s-2", "2026-12-02T03:00:00Z", false),
            job("s-0", "2026-11-30T03:00:00Z", true),
        ];
        let decided = plan(
            &schedule,
            &spec(false, false, 1),
            created,
            Some(later),
            later,
            &jobs,
        );
        assert_eq!(decided.delete, vec!["s-0".to_string(), "s-1".to_string()]);
    }
}
