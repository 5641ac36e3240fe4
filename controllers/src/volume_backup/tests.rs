//! Unit tests of the volume backup and restore Jobs and of how a finished Job is read.

use super::*;
use api::backup::BackupJobSpec;
use api::common::ClusterReference;
use api::postgres_cluster::{BootstrapSpec, PostgresClusterSpec, TlsMode, VolumeBootstrap};
use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
};

fn cluster(wal: bool) -> PostgresCluster {
    let mut spec = PostgresClusterSpec::with_image(2, "pg:18.1");
    spec.bootstrap = Some(BootstrapSpec {
        volume: Some(VolumeBootstrap {
            claim_name: "nightly".into(),
        }),
        ..Default::default()
    });
    if wal {
        spec.wal_storage = Some(StorageSpec {
            size: "2Gi".into(),
            storage_class: Some("fast".into()),
        });
    }
    let mut cluster = PostgresCluster::new("db", spec);
    cluster.metadata.namespace = Some("team".into());
    cluster.metadata.uid = Some("uid-cluster".into());
    cluster
}

fn instance_template(cluster: &PostgresCluster) -> PodTemplateSpec {
    builders::pod_template(
        cluster,
        &builders::Resolved {
            image: "pg:18.1".into(),
            instance_manager_image: "manager:1".into(),
            app_secret: "db-app".into(),
        },
    )
}

fn backup_job_object() -> BackupJob {
    let mut job = BackupJob::new(
        "nightly",
        BackupJobSpec {
            cluster: ClusterReference { name: "db".into() },
            action: Default::default(),
            method: Default::default(),
            backup_type: Default::default(),
            prefer_replica: true,
            volume: Some(StorageSpec {
                size: "5Gi".into(),
                storage_class: Some("standard".into()),
            }),
        },
    );
    job.metadata.namespace = Some("team".into());
    job.metadata.uid = Some("uid-job".into());
    job
}

fn pod_spec(job: &Job) -> PodSpec {
    job.spec.clone().unwrap().template.spec.unwrap()
}

fn mount_paths(spec: &PodSpec) -> BTreeMap<String, String> {
    spec.containers[0]
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|mount| (mount.name, mount.mount_path))
        .collect()
}

#[test]
fn long_names_are_cut_to_63_characters_with_a_stable_hash() {
    assert_eq!(short_name("db", "-restore"), "db-restore");
    let long = "a".repeat(80);
    let name = short_name(&long, "-restore");
    assert_eq!(name.len(), 63, "{name}");
    assert!(name.ends_with("-restore"));
    assert_eq!(name, short_name(&long, "-restore"));
    assert_ne!(name, short_name(&"b".repeat(80), "-restore"));
}

#[test]
fn the_backup_claim_is_sized_as_asked_and_owned_by_nothing() {
    let job = backup_job_object();
    let claim = backup_claim(&job, job.spec.volume.as_ref().unwrap());
    assert_eq!(claim.metadata.name.as_deref(), Some("nightly"));
    assert!(
        claim.metadata.owner_references.is_none(),
        "the backup outlives its BackupJob"
    );
    assert_eq!(claim.labels()[LABEL_BACKUP_JOB], "nightly");
    assert_eq!(claim.labels()[contract::LABEL_CLUSTER], "db");
    let spec = claim.spec.unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("standard"));
    assert_eq!(
        spec.resources.unwrap().requests.unwrap()["storage"].0,
        "5Gi"
    );
}

#[test]
fn the_backup_job_copies_the_chosen_instance_with_the_replication_certificate() {
    let cluster = cluster(false);
    let job = backup_job(
        &backup_job_object(),
        &instance_template(&cluster),
        "10.0.0.7",
        5432,
        true,
    );
    assert_eq!(
        job.metadata.owner_references.as_ref().unwrap()[0].uid,
        "uid-job"
    );
    assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));
    let spec = pod_spec(&job);
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(
        spec.security_context,
        instance_template(&cluster).spec.unwrap().security_context
    );
    assert_eq!(
        spec.init_containers.as_ref().unwrap()[0].image.as_deref(),
        Some("manager:1")
    );
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some("pg:18.1"));
    let args = container.args.clone().unwrap();
    assert_eq!(args[0], volume_backup::BACKUP_SUBCOMMAND);
    for wanted in ["--host=10.0.0.7", "--port=5432", "--label=nightly"] {
        assert!(args.contains(&wanted.to_string()), "{args:?}");
    }
    assert!(
        !args.iter().any(|arg| arg.starts_with("--password-file")),
        "{args:?}"
    );
    let env: Vec<_> = container
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        env.contains(&contract::ENV_TLS_DIR.to_string())
            && env.contains(&contract::env::PG_BIN.to_string()),
        "{env:?}"
    );
    let mounts = mount_paths(&spec);
    assert_eq!(mounts["backup"], volume_backup::MOUNT_PATH);
    assert_eq!(
        mounts["tls-replication"],
        format!("{}/replication", contract::TLS_MOUNT_PATH)
    );
    // Of the server Secret only the CA: the server's key stays in the instances.
    let volumes = spec.volumes.unwrap();
    let server = volumes.iter().find(|v| v.name == "tls-server").unwrap();
    let items = server.secret.as_ref().unwrap().items.clone().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].key, contract::tls_keys::CA);
    let backup = volumes.iter().find(|v| v.name == "backup").unwrap();
    assert_eq!(
        backup.persistent_volume_claim.as_ref().unwrap().claim_name,
        "nightly"
    );
}

#[test]
fn without_tls_the_backup_job_logs_in_with_the_replication_password() {
    let mut cluster = cluster(false);
    cluster.spec.tls.mode = TlsMode::Disabled;
    let job = backup_job(
        &backup_job_object(),
        &instance_template(&cluster),
        "10.0.0.7",
        5432,
        false,
    );
    let spec = pod_spec(&job);
    let args = spec.containers[0].args.clone().unwrap();
    let folder = format!("{}/replication", contract::SECRETS_MOUNT_PATH);
    assert!(
        args.contains(&format!("--password-file={folder}/password")),
        "{args:?}"
    );
    assert_eq!(mount_paths(&spec)["replication"], folder);
    assert!(!mount_paths(&spec).contains_key("tls-replication"));
}

#[test]
fn the_restore_job_fills_the_first_instances_claims_from_the_backup_read_only() {
    let cluster = cluster(true);
    let claims: Vec<_> = first_instance_claims(&cluster)
        .into_iter()
        .map(|claim| claim.metadata.name.unwrap())
        .collect();
    assert_eq!(claims, ["pgdata-db-0", "pg-wal-db-0"]);
    let job = restore_job(&cluster, &instance_template(&cluster), "nightly");
    assert_eq!(job.metadata.name.as_deref(), Some("db-restore"));
    assert_eq!(
        job.metadata.owner_references.as_ref().unwrap()[0].uid,
        "uid-cluster"
    );
    let spec = pod_spec(&job);
    let volumes = spec.volumes.clone().unwrap();
    let claim_of = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.persistent_volume_claim.clone())
            .unwrap()
    };
    assert_eq!(claim_of("backup").claim_name, "nightly");
    assert_eq!(claim_of("backup").read_only, Some(true));
    assert_eq!(claim_of(builders::DATA_VOLUME).claim_name, "pgdata-db-0");
    assert_eq!(claim_of(builders::WAL_VOLUME).claim_name, "pg-wal-db-0");
    let mounts = mount_paths(&spec);
    assert_eq!(mounts[builders::DATA_VOLUME], contract::DATA_MOUNT_PATH);
    assert_eq!(mounts[builders::WAL_VOLUME], contract::WAL_MOUNT_PATH);
    let env: BTreeMap<_, _> = spec.containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(
        env[contract::env::PGDATA],
        format!("{}/pgdata", contract::DATA_MOUNT_PATH)
    );
    assert_eq!(
        env[contract::env::PGWAL],
        format!("{}/pg_wal", contract::WAL_MOUNT_PATH)
    );
    assert_eq!(
        spec.containers[0].args.clone().unwrap(),
        [volume_backup::RESTORE_SUBCOMMAND]
    );
}

fn pod(phase: &str, message: Option<&str>) -> Pod {
    Pod {
        status: Some(PodStatus {
            phase: Some(phase.into()),
            container_statuses: Some(vec![ContainerStatus {
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        message: message.map(str::to_string),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn job_with(status: JobStatus) -> Job {
    Job {
        status: Some(status),
        ..Default::default()
    }
}

#[test]
fn a_jobs_outcome_carries_its_pods_termination_message() {
    assert_eq!(
        outcome(&job_with(JobStatus::default()), &[]),
        Outcome::Running
    );
    let done = job_with(JobStatus {
        succeeded: Some(1),
        ..Default::default()
    });
    assert_eq!(
        outcome(
            &done,
            &[pod("Succeeded", Some(r#"{"endLsn":"0/3000100"}"#))]
        ),
        Outcome::Succeeded(Some(r#"{"endLsn":"0/3000100"}"#.into()))
    );
    let failed = job_with(JobStatus {
        failed: Some(1),
        conditions: Some(vec![JobCondition {
            type_: "Failed".into(),
            status: "True".into(),
            reason: Some("BackoffLimitExceeded".into()),
            message: Some("Job has reached the specified backoff limit".into()),
            ..Default::default()
        }]),
        ..Default::default()
    });
    assert_eq!(
        outcome(&failed, &[pod("Failed", Some("disk full"))]),
        Outcome::Failed("disk full".into())
    );
    assert_eq!(
        outcome(&failed, &[pod("Failed", None)]),
        Outcome::Failed("Job has reached the specified backoff limit".into())
    );
}

#[test]
fn a_report_is_read_or_said_to_be_missing() {
    let report = report(Some(
        r#"{"backupId":"nightly","endLsn":"0/3000100","sizeBytes":42}"#,
    ))
    .unwrap();
    assert_eq!(report.backup_id.as_deref(), Some("nightly"));
    assert_eq!(report.size_bytes, Some(42));
    assert!(
        super::report(None)
            .unwrap_err()
            .contains("no termination message")
    );
    assert!(
        super::report(Some("not json"))
            .unwrap_err()
            .contains("unreadable")
    );
}
