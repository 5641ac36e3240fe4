//! A BackupJob with `spec.volume`: a claim of its own and a Kubernetes Job that runs
//! pg_basebackup from the chosen instance into it ([`crate::volume_backup`] builds both); the
//! Job's report (its termination message) becomes the status.

use api::BackupJob;
use api::backup::BackupJobStatus;
use api::common::StorageSpec;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::Error;
use super::decide::Candidate;
use super::reconcile::{fail, mark_completed, mark_running, wait};
use crate::postgres_cluster::Context;
use crate::volume_backup::{self, LABEL_BACKUP_JOB, LABEL_JOB_NAME, Outcome};

/// How often a running backup Job is looked at.
const POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Creates the claim and the Job (each once: a claim or Job of that name that another BackupJob
/// made fails this one), and marks the BackupJob running.
pub(super) async fn start(
    job: &BackupJob,
    ctx: &Context,
    namespace: &str,
    chosen: &Candidate,
    storage: &StorageSpec,
    mut status: BackupJobStatus,
) -> Result<Action, Error> {
    let cluster = &job.spec.cluster.name;
    let dereference = |what: String| move |source| Error::Dereference { what, source };
    let stateful_set = Api::<StatefulSet>::namespaced(ctx.client.clone(), namespace)
        .get_opt(cluster)
        .await
        .map_err(dereference(format!("StatefulSet {namespace}/{cluster}")))?;
    let Some(template) = stateful_set
        .and_then(|set| set.spec)
        .map(|spec| spec.template)
    else {
        return wait(
            job,
            ctx,
            status,
            "ClusterNotReady",
            format!("PostgresCluster {cluster} has no instances yet; waiting"),
        )
        .await;
    };
    let clusters: Api<api::postgres_cluster::PostgresCluster> =
        Api::namespaced(ctx.client.clone(), namespace);
    let tls = clusters
        .get_opt(cluster)
        .await
        .map_err(dereference(format!(
            "PostgresCluster {namespace}/{cluster}"
        )))?
        .is_some_and(|cluster| crate::tls::pod::enabled(&cluster));

    let claim = volume_backup::backup_claim(job, storage);
    let claim_name = volume_backup::backup_claim_name(job);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    if let Some(problem) = create_once(&claims, &claim, job, "PersistentVolumeClaim").await? {
        return fail(job, ctx, status, "ClaimExists", problem).await;
    }
    let kube_job = volume_backup::backup_job(job, &template, &chosen.ip, chosen.postgres_port, tls);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    if let Some(problem) = create_once(&jobs, &kube_job, job, "Job").await? {
        return fail(job, ctx, status, "JobExists", problem).await;
    }

    let message = format!(
        "pg_basebackup from {} ({}) into claim {claim_name} (Job {})",
        chosen.name,
        chosen.role,
        kube_job.name_any()
    );
    status.volume_claim = Some(claim_name);
    mark_running(job, ctx, status, &chosen.name, message.clone(), message).await?;
    Ok(Action::requeue(POLL))
}

/// Why the job's claim cannot be made, when a claim of its name exists that is not the job's.
pub(super) async fn claim_taken(
    job: &BackupJob,
    ctx: &Context,
    namespace: &str,
) -> Result<Option<String>, Error> {
    let name = volume_backup::backup_claim_name(job);
    let existing = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(|source| Error::Dereference {
            what: format!("PersistentVolumeClaim {namespace}/{name}"),
            source,
        })?;
    Ok(existing
        .filter(|claim| !made_for(claim, job))
        .map(|_| taken("PersistentVolumeClaim", &name)))
}

/// Whether `object` was made for `job` (its label and owner).
fn made_for<K: kube::Resource>(object: &K, job: &BackupJob) -> bool {
    object.labels().get(LABEL_BACKUP_JOB) == Some(&job.name_any())
        && object
            .owner_references()
            .iter()
            .all(|owner| owner.uid == job.uid().unwrap_or_default())
}

/// The problem of an object of the job's name that is not the job's.
fn taken(kind: &str, name: &str) -> String {
    format!(
        "a {kind} named {name} exists already and is not this BackupJob's: a backup to a volume goes into a new claim of the BackupJob's name; delete that {kind} or give the BackupJob another name"
    )
}

/// Creates `object` unless it exists. One of that name made for this BackupJob (a reconcile that
/// was cut short) is fine; another is a problem to report.
async fn create_once<K>(
    api: &Api<K>,
    object: &K,
    job: &BackupJob,
    kind: &str,
) -> Result<Option<String>, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = object.name_any();
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api.get(&name).await.map_err(|source| Error::Dereference {
                what: format!("{kind} {name}"),
                source,
            })?;
            Ok((!made_for(&existing, job)).then(|| taken(kind, &name)))
        }
        Err(source) => Err(Error::Dereference {
            what: format!("creating {kind} {name}"),
            source,
        }),
    }
}

/// Follows the Job: its report completes the BackupJob, its failure fails it with the reason.
pub(super) async fn follow(
    job: &BackupJob,
    ctx: &Context,
    namespace: &str,
    mut status: BackupJobStatus,
) -> Result<Action, Error> {
    let name = volume_backup::backup_job_name(job);
    let dereference = |what: String| move |source| Error::Dereference { what, source };
    let kube_job = Api::<Job>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(dereference(format!("Job {namespace}/{name}")))?;
    let Some(kube_job) = kube_job else {
        return fail(
            job,
            ctx,
            status,
            "JobGone",
            format!("the backup's Job {name} was deleted before it finished; delete claim {} and create a new BackupJob", volume_backup::backup_claim_name(job)),
        )
        .await;
    };
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{LABEL_JOB_NAME}={name}")))
        .await
        .map_err(dereference(format!("pods of Job {namespace}/{name}")))?;
    let instance = status.instance.clone().unwrap_or_default();
    match volume_backup::outcome(&kube_job, &pods.items) {
        Outcome::Running => Ok(Action::requeue(POLL)),
        Outcome::Failed(why) => {
            let why = volume_backup::report(Some(&why))
                .ok()
                .and_then(|report| report.error)
                .unwrap_or(why);
            let message = format!(
                "the backup from {instance} into claim {} failed: {why}; see `kubectl logs job/{name}`, delete the claim and create a new BackupJob",
                volume_backup::backup_claim_name(job)
            );
            fail(job, ctx, status, "BackupFailed", message).await
        }
        Outcome::Succeeded(message) => {
            let report = match volume_backup::report(message.as_deref()) {
                Ok(report) => report,
                Err(why) => return fail(job, ctx, status, "NoReport", why).await,
            };
            let claim = volume_backup::backup_claim_name(job);
            status.backup_id = report.backup_id;
            status.begin_lsn = report.begin_lsn;
            status.end_lsn = report.end_lsn;
            status.begin_time = report.begin_time;
            status.end_time = report.end_time;
            status.size_bytes = report.size_bytes;
            let message = format!(
                "base backup of {instance} in claim {claim}: restore it with spec.bootstrap.volume.claimName: {claim}"
            );
            mark_completed(job, ctx, status, message).await?;
            Ok(Action::await_change())
        }
    }
}
