//! A cluster restored from a BackupJob's volume (`spec.bootstrap.volume`): before its
//! StatefulSet exists, the first instance's claims are made (with the names the StatefulSet
//! gives them, so that it adopts them) and a Job copies the backup into them. The StatefulSet is
//! only made once that Job succeeded; its first instance then finds the restored data and the
//! marker the Job left, takes the Lease and starts the data as the new cluster's primary (with
//! `bootstrap.recovery` as well: replays the source's archive from there, see the instance
//! manager's `start_restored_volume`).
//!
//! Until then the cluster is `Creating` (reason `RestoringFromVolume`); a missing claim, a
//! backup of another cluster than the archive to replay, or a failed copy is a problem with a
//! reason and a message that says what to do, and nothing is started on half-restored data.

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
    let Some(backup) = claims.get_opt(source).await.map_err(kube_error(format!(
        "reading PersistentVolumeClaim {source}"
    )))?
    else {
        return Ok(Some(Problem {
            reason: "BackupVolumeNotFound",
            message: format!(
                "PersistentVolumeClaim {source} (spec.bootstrap.volume.claimName) does not exist in {namespace}: name the claim of a completed BackupJob with spec.volume (its status.volumeClaim)"
            ),
        }));
    };
    if let Some(problem) = wal_source_mismatch(cluster, &backup) {
        return Ok(Some(problem));
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
            reason: RESTORING_FROM_VOLUME,
            message: format!(
                "Job {job_name} copies the backup in claim {source} into the first instance's volume; the instance starts when it is done"
            ),
        }),
        Outcome::Failed(why) => Some(Problem {
            reason: "VolumeRestoreFailed",
            message: format!(
                "restoring the backup in claim {source} failed: {why}; see `kubectl logs job/{job_name}`. No instance was started: once the cause is fixed, delete Job {job_name} and the restore runs again"
            ),
        }),
    })
}

/// With `bootstrap.recovery` beside the volume, the WAL replayed after the backup comes from
/// `recovery.sourceCluster`'s archive: a backup of another cluster would stop at its end (the
/// archive's segments are of another system) and come up without the WAL asked for, so it is
/// refused before anything is copied. The claim's cluster label says whose backup it is; a claim
/// without one (made by hand) is trusted, PostgreSQL still checks the system identifier.
pub(super) fn wal_source_mismatch(
    cluster: &PostgresCluster,
    backup: &PersistentVolumeClaim,
) -> Option<Problem> {
    let recovery = cluster.spec.bootstrap.as_ref()?.recovery.as_ref()?;
    let taken_of = backup.labels().get(api::contract::LABEL_CLUSTER)?;
    (*taken_of != recovery.source_cluster).then(|| Problem {
        reason: "VolumeSourceMismatch",
        message: format!(
            "claim {} holds a backup of cluster {taken_of}, but spec.bootstrap.recovery.sourceCluster is {}: the WAL replayed after a volume backup must be its own cluster's archive; name {taken_of}'s archive in recovery, or restore without recovery",
            backup.name_any(),
            recovery.source_cluster
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(bootstrap: serde_json::Value) -> PostgresCluster {
        serde_json::from_value(json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": "copy", "namespace": "ns"},
            "spec": {"bootstrap": bootstrap}
        }))
        .expect("a cluster")
    }

    fn claim(cluster: Option<&str>) -> PersistentVolumeClaim {
        let mut claim = PersistentVolumeClaim::default();
        claim.metadata.name = Some("nightly".into());
        claim.metadata.labels = cluster
            .map(|name| [(api::contract::LABEL_CLUSTER.to_string(), name.to_string())].into());
        claim
    }

    #[test]
    fn the_archive_replayed_after_a_volume_must_be_the_backed_up_clusters() {
        let recovery = json!({"volume": {"claimName": "nightly"}, "recovery": {
            "source": {"endpoint": "http://s3:9000", "bucket": "b", "credentialsSecret": {"name": "s3"}},
            "sourceCluster": "src"}});
        let problem = wal_source_mismatch(&cluster(recovery.clone()), &claim(Some("other")))
            .expect("refused");
        assert_eq!(problem.reason, "VolumeSourceMismatch");
        assert!(
            problem.message.contains("cluster other") && problem.message.contains("is src"),
            "{}",
            problem.message
        );
        assert!(wal_source_mismatch(&cluster(recovery.clone()), &claim(Some("src"))).is_none());
        assert!(
            wal_source_mismatch(&cluster(recovery), &claim(None)).is_none(),
            "a claim made by hand is trusted"
        );
        let volume_only = cluster(json!({"volume": {"claimName": "nightly"}}));
        assert!(wal_source_mismatch(&volume_only, &claim(Some("other"))).is_none());
    }
}
