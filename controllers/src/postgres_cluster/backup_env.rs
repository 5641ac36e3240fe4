//! What the instance manager needs for backups, as environment of the PostgreSQL container:
//! `spec.backup` and `spec.bootstrap.recovery` as JSON, and the stores' keys (`ACCESS_KEY_ID`,
//! `ACCESS_SECRET_KEY`) and CA certificates (`caSecret`) from their Secrets as secret references, so no key is ever written into an
//! object the operator owns.

use api::backup::instance_env as env;
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};

use super::replica::{is_replica_cluster, streaming_source};

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                // A missing Secret must not keep PostgreSQL from starting: the uploads fail
                // instead, and ContinuousArchiving says so.
                optional: Some(true),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn json_env(name: &str, value: &impl serde::Serialize) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: serde_json::to_string(value).ok(),
        value_from: None,
    }
}

/// The backup environment of the cluster's instance containers (empty without `spec.backup`
/// and `spec.bootstrap.recovery`).
pub fn instance_env(cluster: &PostgresCluster) -> Vec<EnvVar> {
    let mut vars = Vec::new();
    if let Some(backup) = &cluster.spec.backup {
        vars.push(json_env(env::BACKUP_REPOSITORY, backup));
        let secret = &backup.s3.credentials_secret.name;
        vars.push(secret_env(
            env::AWS_ACCESS_KEY_ID,
            secret,
            env::SECRET_KEY_ACCESS_KEY_ID,
        ));
        vars.push(secret_env(
            env::AWS_SECRET_ACCESS_KEY,
            secret,
            env::SECRET_KEY_SECRET_ACCESS_KEY,
        ));
        if let Some(ca) = &backup.s3.ca_secret {
            vars.push(secret_env(env::BACKUP_CA_BUNDLE, &ca.name, &ca.key));
        }
    }
    if let Some(recovery) = cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|bootstrap| bootstrap.recovery.as_ref())
    {
        vars.push(json_env(env::BOOTSTRAP_RECOVERY, recovery));
        let secret = &recovery.source.credentials_secret.name;
        vars.push(secret_env(
            env::RECOVERY_AWS_ACCESS_KEY_ID,
            secret,
            env::SECRET_KEY_ACCESS_KEY_ID,
        ));
        vars.push(secret_env(
            env::RECOVERY_AWS_SECRET_ACCESS_KEY,
            secret,
            env::SECRET_KEY_SECRET_ACCESS_KEY,
        ));
        if let Some(ca) = &recovery.source.ca_secret {
            vars.push(secret_env(env::RECOVERY_CA_BUNDLE, &ca.name, &ca.key));
        }
        // Turning it off changes the pods' spec: the rolling update that follows promotes the
        // cluster (the instance that takes over as primary without it promotes PostgreSQL).
        if is_replica_cluster(cluster) {
            let plain = |name: &str, value: String| EnvVar {
                name: name.to_string(),
                value: Some(value),
                value_from: None,
            };
            vars.push(plain(env::REPLICA_CLUSTER, "true".to_string()));
            if let Some(streaming) = streaming_source(cluster) {
                vars.push(plain(env::REPLICA_SOURCE_HOST, streaming.host.clone()));
                vars.push(plain(env::REPLICA_SOURCE_PORT, streaming.port.to_string()));
            }
        }
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_and_recovery_reach_the_instance_without_their_keys() {
        let cluster: PostgresCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "PostgresCluster",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {
                "image": "postgres:18",
                "backup": {"s3": {"endpoint": "http://s3:9000", "bucket": "backups", "credentialsSecret": {"name": "s3-keys"}}, "retention": "7d"},
                "bootstrap": {"recovery": {"source": {"endpoint": "http://s3:9000", "bucket": "old", "credentialsSecret": {"name": "old-keys"}}, "sourceCluster": "old", "target": {"name": "before"}}}
            }
        }))
        .unwrap();
        let vars = instance_env(&cluster);
        let value = |name: &str| {
            vars.iter()
                .find(|var| var.name == name)
                .and_then(|var| var.value.clone())
        };
        let repository: serde_json::Value =
            serde_json::from_str(&value(env::BACKUP_REPOSITORY).unwrap()).unwrap();
        assert_eq!(repository["retention"], "7d");
        let recovery: serde_json::Value =
            serde_json::from_str(&value(env::BOOTSTRAP_RECOVERY).unwrap()).unwrap();
        assert_eq!(recovery["target"]["name"], "before");
        let key = vars
            .iter()
            .find(|var| var.name == env::RECOVERY_AWS_SECRET_ACCESS_KEY)
            .unwrap();
        assert!(key.value.is_none());
        let reference = key
            .value_from
            .as_ref()
            .and_then(|source| source.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!(reference.name, "old-keys");
        assert_eq!(reference.key, "ACCESS_SECRET_KEY");
        assert_eq!(value(env::REPLICA_CLUSTER), None, "not a replica cluster");
    }

    #[test]
    fn a_replica_cluster_says_so_until_it_is_promoted() {
        let mut cluster: PostgresCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "PostgresCluster",
            "metadata": {"name": "dr", "namespace": "default"},
            "spec": {
                "image": "postgres:18",
                "replica": {"enabled": true, "streaming": {"host": "main-rw.eu.svc", "certificateSecret": {"name": "main-replication-tls"}}},
                "bootstrap": {"recovery": {"source": {"endpoint": "http://s3:9000", "bucket": "main", "credentialsSecret": {"name": "keys"}}, "sourceCluster": "main"}}
            }
        }))
        .unwrap();
        let value = |cluster: &PostgresCluster, name: &str| {
            instance_env(cluster)
                .into_iter()
                .find(|var| var.name == name)
                .and_then(|var| var.value)
        };
        let flag = |cluster: &PostgresCluster| value(cluster, env::REPLICA_CLUSTER);
        assert!(is_replica_cluster(&cluster));
        assert_eq!(flag(&cluster).as_deref(), Some("true"));
        assert_eq!(
            value(&cluster, env::REPLICA_SOURCE_HOST).as_deref(),
            Some("main-rw.eu.svc")
        );
        assert_eq!(
            value(&cluster, env::REPLICA_SOURCE_PORT).as_deref(),
            Some("5432")
        );
        cluster.spec.replica = Some(api::postgres_cluster::ReplicaSpec {
            enabled: false,
            ..Default::default()
        });
        assert!(!is_replica_cluster(&cluster));
        assert_eq!(
            flag(&cluster),
            None,
            "promoted: the instances drop the flag"
        );
        assert_eq!(value(&cluster, env::REPLICA_SOURCE_HOST), None);
    }
}
