//! A cluster restored from a BackupJob's volume (`spec.bootstrap.volume`): before its
//! StatefulSet exists, the first instance's claims are made (with the names the StatefulSet
//! gives them, so that it adopts them) and a Job copies the backup into them. The StatefulSet is
//! only made once that Job succeeded; its first instance then finds the restored data and the
//! marker the Job left, takes the Lease and starts the data as the new cluster's primary.
//!
//! Until then the cluster is `Creating` (reason `RestoringFromVolume`); a missing claim or a
//! failed copy is a problem with a reason and a message that says what to do, and nothing is
//! started on half-restored data.

use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};

use super::builders::{self, Resolved};
use super::status::{Problem, RESTORING_FROM_VOLUME};
use super::{Context, Error, kube_error};
use crate::volume_backup::{self, LABEL_JOB_NAME, Outcome};

/// Whether the StatefulSet may be applied: `None` when it may (no `bootstrap.volume`, the
/// StatefulSet exists already, or the restore succeeded), else why not yet.
pub(super) async fn ensure(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
    resolved: &Resolved,
) -> Result<Option<Problem>, Error> {
    let Some(volume) = cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|bootstrap| bootstrap.volume.as_ref())
    else {
        return Ok(None);
    };
    let name = cluster.name_any();
    // Once the StatefulSet exists the bootstrap is over: nothing is restored twice.
    if Api::<StatefulSet>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(kube_error(format!("reading StatefulSet {name}")))?
        .is_some()
    {
        return Ok(None);
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let source = &volume.claim_name;
    if claims
        .get_opt(source)
        .await
        .map_err(kube_error(format!(
            "reading PersistentVolumeClaim {source}"
        )))?
        .is_none()
    {
        return Ok(Some(Problem {
            reason: "BackupVolumeNotFound".into(),
            message: format!(
                "PersistentVolumeClaim {source} (spec.bootstrap.volume.claimName) does not exist in {namespace}: name the claim of a completed BackupJob with spec.volume (its status.volumeClaim)"
            ),
        }));
    }
    for claim in volume_backup::first_instance_claims(cluster) {
        let claim_name = claim.name_any();
        if claims
            .get_opt(&claim_name)
            .await
            .map_err(kube_error(format!(
                "reading PersistentVolumeClaim {claim_name}"
            )))?
            .is_none()
        {
            claims
                .create(&PostParams::default(), &claim)
                .await
                .map_err(kube_error(format!(
                    "creating PersistentVolumeClaim {claim_name}"
                )))?;
        }
    }
    let instance = builders::pod_template(cluster, resolved);
    let job = volume_backup::restore_job(cluster, &instance, source);
    let job_name = job.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = match jobs
        .get_opt(&job_name)
        .await
        .map_err(kube_error(format!("reading Job {job_name}")))?
    {
        Some(existing) => existing,
        None => jobs
            .create(&PostParams::default(), &job)
            .await
            .map_err(kube_error(format!("creating Job {job_name}")))?,
    };
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{LABEL_JOB_NAME}={job_name}")))
        .await
        .map_err(kube_error(format!("listing the pods of Job {job_name}")))?;
    Ok(match volume_backup::outcome(&existing, &pods.items) {
        Outcome::Succeeded(_) => None,
        Outcome::Running => Some(Problem {
            reason: RESTORING_FROM_VOLUME.into(),
            message: format!(
                "Job {job_name} copies the backup in claim {source} into the first instance's volume; the instance starts when it is done"
            ),
        }),
        Outcome::Failed(why) => Some(Problem {
            reason: "VolumeRestoreFailed".into(),
            message: format!(
                "restoring the backup in claim {source} failed: {why}; see `kubectl logs job/{job_name}`. No instance was started: once the cause is fixed, delete Job {job_name} and the restore runs again"
            ),
        }),
    })
}
