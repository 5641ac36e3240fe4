//! Base backups to a volume and restores from one (pure): the Kubernetes Jobs that run
//! `pg-instance volume-backup` (a BackupJob with `spec.volume`) and `pg-instance volume-restore`
//! (a cluster with `spec.bootstrap.volume`), and how a finished Job is read.
//!
//! Both Jobs run in the cluster's own PostgreSQL image with the instance manager copied in, as
//! the instance pods do (their pod template is the source of the image, the security context and
//! the init container), so a backup is taken and restored by the same PostgreSQL build that runs
//! the data. The backup Job reports the backup in its termination message (what the kubelet keeps
//! of `/dev/termination-log`): no API access is given to it.

use std::collections::BTreeMap;

use api::contract::{self, volume_backup};
use api::postgres_cluster::PostgresCluster;
use api::{BackupJob, common::StorageSpec};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod,
    PodSpec, PodTemplateSpec, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::postgres_cluster::builders::{self, POSTGRES_CONTAINER, mount};

/// Label on a backup's claim and Job: the BackupJob that made them.
pub const LABEL_BACKUP_JOB: &str = "postgres.keiailab.io/backup-job";
/// Label the Job controller puts on a Job's pods.
pub const LABEL_JOB_NAME: &str = "batch.kubernetes.io/job-name";

/// A Kubernetes name of at most 63 characters (a Job's name is a label value of its pods):
/// `base` + `suffix`, or a cut `base` with a hash of it when too long.
pub fn short_name(base: &str, suffix: &str) -> String {
    if base.len() + suffix.len() <= 63 {
        return format!("{base}{suffix}");
    }
    let hash = format!("{:08x}", builders::fnv1a64(base.as_bytes()) as u32);
    let keep = 63 - suffix.len() - hash.len() - 1;
    let cut = base[..keep].trim_end_matches(['-', '.']);
    format!("{cut}-{hash}{suffix}")
}

/// Name of the claim holding the backup of `job`.
pub fn backup_claim_name(job: &BackupJob) -> String {
    job.name_any()
}

/// Name of the Kubernetes Job that takes the backup of `job`.
pub fn backup_job_name(job: &BackupJob) -> String {
    short_name(&job.name_any(), "")
}

/// Name of the Kubernetes Job that restores `cluster` from its `bootstrap.volume`.
pub fn restore_job_name(cluster: &str) -> String {
    short_name(cluster, "-restore")
}

/// A claim of `size` in the namespace of `owner_meta`.
fn claim(
    name: String,
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    storage: &StorageSpec,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name),
            namespace,
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: storage.storage_class.clone(),
            resources: Some(k8s_openapi::api::core::v1::VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity(storage.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The claim a backup goes into: labelled with its cluster and BackupJob, owned by nothing (the
/// backup outlives the BackupJob; deleting the claim deletes the backup).
pub fn backup_claim(job: &BackupJob, storage: &StorageSpec) -> PersistentVolumeClaim {
    let mut labels = builders::labels(&job.spec.cluster.name);
    labels.insert(LABEL_BACKUP_JOB.to_string(), job.name_any());
    claim(backup_claim_name(job), job.namespace(), labels, storage)
}

/// The Job that takes `job`'s backup from the instance at `host:port` into its claim.
/// `instance` is the cluster's instance pod template (the StatefulSet's).
pub fn backup_job(
    job: &BackupJob,
    instance: &PodTemplateSpec,
    host: &str,
    port: u16,
    tls: bool,
) -> Job {
    let cluster = &job.spec.cluster.name;
    let mut args = vec![
        volume_backup::BACKUP_SUBCOMMAND.to_string(),
        format!("--host={host}"),
        format!("--port={port}"),
        format!("--label={}", job.name_any()),
    ];
    let mut volumes = vec![claim_volume("backup", &backup_claim_name(job), false)];
    let mut mounts = vec![mount("backup", volume_backup::MOUNT_PATH, false)];
    let mut env = Vec::new();
    if tls {
        // The cluster's CA (only that key of the server Secret) and the replication client
        // certificate, as an instance has them.
        volumes.push(secret_volume(
            "tls-server",
            contract::tls_server_secret(cluster),
            Some(contract::tls_keys::CA),
        ));
        volumes.push(secret_volume(
            "tls-replication",
            contract::tls_replication_secret(cluster),
            None,
        ));
        for folder in ["server", "replication"] {
            mounts.push(mount(
                &format!("tls-{folder}"),
                &format!("{}/{folder}", contract::TLS_MOUNT_PATH),
                true,
            ));
        }
        env.push(EnvVar {
            name: contract::ENV_TLS_DIR.to_string(),
            value: Some(contract::TLS_MOUNT_PATH.to_string()),
            value_from: None,
        });
    } else {
        let folder = format!("{}/replication", contract::SECRETS_MOUNT_PATH);
        volumes.push(secret_volume(
            "replication",
            contract::replication_secret(cluster),
            None,
        ));
        mounts.push(mount("replication", &folder, true));
        args.push(format!("--password-file={folder}/password"));
    }
    let mut labels = builders::labels(cluster);
    labels.insert(LABEL_BACKUP_JOB.to_string(), job.name_any());
    let owner = job.controller_owner_ref(&()).into_iter().collect();
    make_job(
        backup_job_name(job),
        job.namespace(),
        labels,
        owner,
        pod_template(instance, "backup", args, volumes, mounts, env),
    )
}

/// The claims of the first instance (`<template>-<cluster>-0`: the names the StatefulSet gives
/// its first pod's claims, so that it adopts them) as the StatefulSet would make them.
pub fn first_instance_claims(cluster: &PostgresCluster) -> Vec<PersistentVolumeClaim> {
    let name = builders::name_of(cluster);
    let stateful_set = builders::stateful_set(
        cluster,
        &builders::Resolved {
            image: String::new(),
            instance_manager_image: String::new(),
            app_secret: String::new(),
        },
    );
    stateful_set
        .spec
        .and_then(|spec| spec.volume_claim_templates)
        .unwrap_or_default()
        .into_iter()
        .map(|mut claim| {
            let template = claim.metadata.name.clone().unwrap_or_default();
            claim.metadata.name = Some(format!("{template}-{name}-0"));
            claim.metadata.namespace = cluster.namespace();
            claim
        })
        .collect()
}

/// The Job that copies the backup in `claim_name` into the first instance's claims, owned by
/// the cluster. `instance` is the pod template the StatefulSet will have.
pub fn restore_job(cluster: &PostgresCluster, instance: &PodTemplateSpec, claim_name: &str) -> Job {
    let name = builders::name_of(cluster);
    let mut volumes = vec![claim_volume("backup", claim_name, true)];
    let mut mounts = vec![mount("backup", volume_backup::MOUNT_PATH, true)];
    let mut env = Vec::new();
    let postgres = instance_container(instance);
    for claim in first_instance_claims(cluster) {
        let claim_name = claim.metadata.name.unwrap_or_default();
        let template = claim_name
            .trim_end_matches(&format!("-{name}-0"))
            .to_string();
        volumes.push(claim_volume(&template, &claim_name, false));
    }
    // The instance's own mounts of those claims and its PGDATA / PGWAL.
    for volume_mount in postgres.volume_mounts.clone().unwrap_or_default() {
        if volumes.iter().skip(1).any(|v| v.name == volume_mount.name) {
            mounts.push(volume_mount);
        }
    }
    for variable in postgres.env.clone().unwrap_or_default() {
        if [contract::env::PGDATA, contract::env::PGWAL].contains(&variable.name.as_str()) {
            env.push(variable);
        }
    }
    let owner = cluster.controller_owner_ref(&()).into_iter().collect();
    make_job(
        restore_job_name(&name),
        cluster.namespace(),
        builders::labels(&name),
        owner,
        pod_template(
            instance,
            "restore",
            vec![volume_backup::RESTORE_SUBCOMMAND.to_string()],
            volumes,
            mounts,
            env,
        ),
    )
}

/// How a Job ended, from it and its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still running (or not started).
    Running,
    /// Done; the termination message of the pod that succeeded.
    Succeeded(Option<String>),
    /// Failed; the termination message of a failed pod, or the Job's reason.
    Failed(String),
}

/// Reads a Job's outcome.
pub fn outcome(job: &Job, pods: &[Pod]) -> Outcome {
    let status = job.status.clone().unwrap_or_default();
    let message = |phase: &str| {
        pods.iter()
            .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase))
            .flat_map(|pod| {
                pod.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.clone())
                    .unwrap_or_default()
            })
            .filter_map(|container| container.state?.terminated?.message)
            .find(|message| !message.trim().is_empty())
    };
    if status.succeeded.unwrap_or(0) > 0 {
        return Outcome::Succeeded(message("Succeeded"));
    }
    let failed_condition = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| (c.type_ == "Failed" || c.type_ == "FailureTarget") && c.status == "True");
    if failed_condition.is_some() || status.failed.unwrap_or(0) > 0 {
        let fallback = failed_condition
            .and_then(|c| c.message.or(c.reason))
            .unwrap_or_else(|| "its pod failed".to_string());
        return Outcome::Failed(message("Failed").unwrap_or(fallback));
    }
    Outcome::Running
}

/// The backup a succeeded backup Job reported, or why its report cannot be read.
pub fn report(message: Option<&str>) -> Result<volume_backup::Report, String> {
    let text = message.ok_or("the backup Job reported nothing (no termination message)")?;
    serde_json::from_str(text)
        .map_err(|error| format!("the backup Job's report is unreadable: {error}"))
}

fn make_job(
    name: String,
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    owner_references: Vec<OwnerReference>,
    template: PodTemplateSpec,
) -> Job {
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace,
            labels: Some(labels),
            owner_references: Some(owner_references),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            // A failed copy is reported, not retried: what failed (a full volume, an instance
            // that went away) is for the user to look at, and a new BackupJob starts afresh.
            backoff_limit: Some(0),
            template,
            ..JobSpec::default()
        }),
        status: None,
    }
}

fn instance_container(instance: &PodTemplateSpec) -> Container {
    instance
        .spec
        .as_ref()
        .and_then(|spec| {
            spec.containers
                .iter()
                .find(|c| c.name == POSTGRES_CONTAINER)
        })
        .cloned()
        .unwrap_or_default()
}

/// A Job's pod from the instance pod template: its image, PG_BIN, security context, init
/// container (the instance manager copied in) and placement constraints (node selector,
/// tolerations), with `pg-instance <args>` as the one container.
fn pod_template(
    instance: &PodTemplateSpec,
    container_name: &str,
    args: Vec<String>,
    mut volumes: Vec<Volume>,
    mut mounts: Vec<VolumeMount>,
    mut env: Vec<EnvVar>,
) -> PodTemplateSpec {
    let spec = instance.spec.clone().unwrap_or_default();
    let postgres = instance_container(instance);
    env.extend(
        postgres
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|variable| variable.name == contract::env::PG_BIN),
    );
    for (name, path) in [
        ("controller", contract::INSTANCE_MANAGER_MOUNT_PATH),
        ("tmp", "/tmp"),
    ] {
        volumes.push(Volume {
            name: name.to_string(),
            empty_dir: Some(Default::default()),
            ..Volume::default()
        });
        mounts.push(mount(name, path, name == "controller"));
    }
    let container = Container {
        name: container_name.to_string(),
        image: postgres.image.clone(),
        image_pull_policy: postgres.image_pull_policy.clone(),
        command: Some(vec![format!(
            "{}/pg-instance",
            contract::INSTANCE_MANAGER_MOUNT_PATH
        )]),
        args: Some(args),
        env: Some(env),
        security_context: Some(builders::restricted_container_security()),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("File".to_string()),
        ..Container::default()
    };
    PodTemplateSpec {
        metadata: None,
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_string()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: spec.security_context,
            init_containers: spec.init_containers,
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: spec.node_selector,
            tolerations: spec.tolerations,
            priority_class_name: spec.priority_class_name,
            ..PodSpec::default()
        }),
    }
}

fn claim_volume(name: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: name.to_string(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_string(),
            read_only: read_only.then_some(true),
        }),
        ..Volume::default()
    }
}

fn secret_volume(name: &str, secret: String, only_key: Option<&str>) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            items: only_key.map(|key| {
                vec![KeyToPath {
                    key: key.to_string(),
                    path: key.to_string(),
                    mode: None,
                }]
            }),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

#[cfg(test)]
mod tests;
