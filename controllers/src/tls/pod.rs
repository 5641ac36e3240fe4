//! What TLS changes in the instance pods (pure): the server and replication certificate Secrets
//! mounted under [`contract::TLS_MOUNT_PATH`], and the instance manager told where they are.

use api::contract;
use api::postgres_cluster::{PostgresCluster, TlsMode};
use k8s_openapi::api::core::v1::{
    EnvVar, PodTemplateSpec, SecretVolumeSource, Volume, VolumeMount,
};

/// Whether the cluster's instances speak TLS (mode `OperatorCA` or `CertManager`).
pub fn enabled(cluster: &PostgresCluster) -> bool {
    cluster.spec.tls.mode != TlsMode::Disabled
}

/// Adds the TLS Secrets and `TLS_DIR` to the instance pod template, unless TLS is disabled.
/// The instance manager copies the files to a private folder with the modes PostgreSQL demands
/// and watches the mounts, so a renewed Secret reaches PostgreSQL by a reload.
pub fn configure_pod(template: &mut PodTemplateSpec, cluster: &PostgresCluster) {
    if !enabled(cluster) {
        return;
    }
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    let Some(container) = pod.containers.first_mut() else {
        return;
    };
    container.env.get_or_insert_with(Vec::new).push(EnvVar {
        name: contract::ENV_TLS_DIR.to_string(),
        value: Some(contract::TLS_MOUNT_PATH.to_string()),
        value_from: None,
    });
    let mut secrets = vec![
        ("tls-server", contract::tls_server_secret(&name)),
        ("tls-replication", contract::tls_replication_secret(&name)),
    ];
    // A replica cluster streaming from its source: the source's CA and replication client
    // certificate, in `source/` beside the cluster's own.
    if let Some(streaming) = crate::postgres_cluster::replica::streaming_source(cluster) {
        secrets.push(("tls-source", streaming.certificate_secret.name.clone()));
    }
    for (volume, secret) in secrets {
        let folder = volume.trim_start_matches("tls-");
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: volume.to_string(),
                mount_path: format!("{}/{folder}", contract::TLS_MOUNT_PATH),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: volume.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::PostgresClusterSpec;

    fn template() -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                containers: vec![Default::default()],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn tls_secrets_are_mounted_unless_disabled() {
        let mut cluster = PostgresCluster::new("db", PostgresClusterSpec::with_image(1, "pg"));
        let mut with_tls = template();
        configure_pod(&mut with_tls, &cluster);
        let pod = with_tls.spec.unwrap();
        let secrets: Vec<String> = pod
            .volumes
            .unwrap()
            .iter()
            .filter_map(|volume| volume.secret.as_ref()?.secret_name.clone())
            .collect();
        assert_eq!(secrets, ["db-server-tls", "db-replication-tls"]);
        let container = &pod.containers[0];
        let mounts: Vec<&str> = container
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|mount| mount.mount_path.as_str())
            .collect();
        assert_eq!(
            mounts,
            [
                "/etc/postgres-operator/tls/server",
                "/etc/postgres-operator/tls/replication"
            ]
        );
        assert!(
            container
                .env
                .as_ref()
                .unwrap()
                .iter()
                .any(|env| env.name == "TLS_DIR")
        );

        cluster.spec.tls.mode = TlsMode::Disabled;
        let mut without = template();
        configure_pod(&mut without, &cluster);
        assert_eq!(without, template());
    }

    #[test]
    fn a_streaming_replica_cluster_mounts_the_sources_certificates_until_promoted() {
        let mut cluster: PostgresCluster = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "dr"},
            "spec": {
                "image": "pg",
                "replica": {"enabled": true, "streaming": {"host": "main-rw.eu.svc", "certificateSecret": {"name": "main-replication-tls"}}},
                "bootstrap": {"recovery": {"source": {"endpoint": "http://s3:9000", "bucket": "main", "credentialsSecret": {"name": "keys"}}, "sourceCluster": "main"}}
            }
        }))
        .unwrap();
        let mounted = |cluster: &PostgresCluster| {
            let mut pod = template();
            configure_pod(&mut pod, cluster);
            pod.spec.unwrap().containers[0]
                .volume_mounts
                .clone()
                .unwrap_or_default()
                .iter()
                .map(|mount| mount.mount_path.clone())
                .collect::<Vec<_>>()
        };
        assert!(
            mounted(&cluster).contains(&"/etc/postgres-operator/tls/source".to_string()),
            "{:?}",
            mounted(&cluster)
        );
        if let Some(replica) = cluster.spec.replica.as_mut() {
            replica.enabled = false;
        }
        assert_eq!(mounted(&cluster).len(), 2, "promoted: no source mounted");
    }
}
