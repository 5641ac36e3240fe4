//! TLS between a Pooler's PgBouncer and PostgreSQL (pure): PgBouncer verifies the cluster's
//! server certificate against the cluster's CA Secret (`<cluster>-ca`, mounted) and the Service
//! name it connects to (`verify-full`), since the cluster refuses clients without TLS.

use api::contract::{self, tls_keys};
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{SecretVolumeSource, Volume, VolumeMount};

/// Where the cluster's CA Secret is mounted in the PgBouncer container.
pub const CA_MOUNT_PATH: &str = "/etc/pgbouncer/tls";
const CA_VOLUME: &str = "cluster-ca";

/// pgbouncer.ini lines (section `[pgbouncer]`, appended last so that they win) for the
/// connections to `cluster`: `verify-full` against its CA, or nothing when its TLS is disabled.
pub fn server_tls_lines(cluster: &PostgresCluster) -> String {
    if !super::pod::enabled(cluster) {
        return String::new();
    }
    format!(
        "server_tls_sslmode = verify-full\nserver_tls_ca_file = {CA_MOUNT_PATH}/{}\nserver_tls_protocols = secure\n",
        tls_keys::CA
    )
}

/// Mounts the cluster's CA Secret into PgBouncer's container (optional: a cluster with TLS
/// disabled has none).
pub fn mount_cluster_ca(deployment: &mut Deployment, cluster: &str) {
    let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|spec| spec.template.spec.as_mut())
    else {
        return;
    };
    if let Some(container) = pod.containers.first_mut() {
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: CA_VOLUME.to_string(),
                mount_path: CA_MOUNT_PATH.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
    }
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: CA_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(contract::tls_ca_secret(cluster)),
            optional: Some(true),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::{PostgresClusterSpec, TlsMode};
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};

    #[test]
    fn pgbouncer_verifies_the_cluster_certificate_unless_tls_is_disabled() {
        let mut cluster = PostgresCluster::new("db", PostgresClusterSpec::with_image(1, "pg"));
        let lines = server_tls_lines(&cluster);
        assert!(lines.contains("server_tls_sslmode = verify-full\n"));
        assert!(lines.contains("server_tls_ca_file = /etc/pgbouncer/tls/ca.crt\n"));
        cluster.spec.tls.mode = TlsMode::Disabled;
        assert_eq!(server_tls_lines(&cluster), "");

        let mut deployment = Deployment {
            spec: Some(DeploymentSpec {
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(PodSpec {
                        containers: vec![Default::default()],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        mount_cluster_ca(&mut deployment, "db");
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let volume = &pod.volumes.unwrap()[0];
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("db-ca"));
        assert_eq!(secret.optional, Some(true));
        assert_eq!(
            pod.containers[0].volume_mounts.as_ref().unwrap()[0].mount_path,
            CA_MOUNT_PATH
        );
    }
}
