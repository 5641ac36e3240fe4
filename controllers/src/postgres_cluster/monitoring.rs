//! What `spec.monitoring` changes in the instance pods: whether the instance manager reads
//! figures from PostgreSQL on `/metrics`, and the ConfigMap of user-defined queries mounted where
//! it re-reads them.

use api::postgres_cluster::MonitoringSpec;
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EnvVar, KeyToPath, PodTemplateSpec, Volume, VolumeMount,
};

/// Folder of the user-defined queries in the PostgreSQL container.
pub const CUSTOM_QUERIES_MOUNT_PATH: &str = "/etc/postgres-operator/metrics";
/// File name of the user-defined queries in that folder.
const CUSTOM_QUERIES_FILE: &str = "queries.yaml";
const CUSTOM_QUERIES_VOLUME: &str = "custom-queries";

/// Adds the monitoring settings to the instance pod template (environment of the instance
/// manager, and the ConfigMap volume of user-defined queries).
pub fn configure_pod(template: &mut PodTemplateSpec, monitoring: &MonitoringSpec) {
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    let Some(container) = pod.containers.first_mut() else {
        return;
    };
    let env = container.env.get_or_insert_with(Vec::new);
    env.push(EnvVar {
        name: "METRICS_DATABASE".to_string(),
        value: Some(monitoring.enabled.to_string()),
        value_from: None,
    });
    let Some(source) = &monitoring.custom_queries else {
        return;
    };
    env.push(EnvVar {
        name: "METRICS_CUSTOM_QUERIES".to_string(),
        value: Some(format!("{CUSTOM_QUERIES_MOUNT_PATH}/{CUSTOM_QUERIES_FILE}")),
        value_from: None,
    });
    container
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: CUSTOM_QUERIES_VOLUME.to_string(),
            mount_path: CUSTOM_QUERIES_MOUNT_PATH.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: CUSTOM_QUERIES_VOLUME.to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: source.name.clone(),
            items: Some(vec![KeyToPath {
                key: source.key.clone(),
                path: CUSTOM_QUERIES_FILE.to_string(),
                mode: None,
            }]),
            // A missing ConfigMap must not keep PostgreSQL from starting: the file is then
            // absent and the instance reports pg_instance_custom_queries_config_error.
            optional: Some(true),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::CustomQueriesSource;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn template() -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container::default()],
                ..PodSpec::default()
            }),
        }
    }

    fn env(template: &PodTemplateSpec, name: &str) -> Option<String> {
        template.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn custom_queries_config_map_is_mounted_and_named_to_the_instance() {
        let mut pod = template();
        configure_pod(
            &mut pod,
            &MonitoringSpec {
                custom_queries: Some(CustomQueriesSource {
                    name: "my-queries".into(),
                    key: "orders.yaml".into(),
                }),
                ..MonitoringSpec::default()
            },
        );
        assert_eq!(env(&pod, "METRICS_DATABASE").as_deref(), Some("true"));
        assert_eq!(
            env(&pod, "METRICS_CUSTOM_QUERIES").as_deref(),
            Some("/etc/postgres-operator/metrics/queries.yaml")
        );
        let volume = &pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        let config_map = volume.config_map.as_ref().unwrap();
        assert_eq!(config_map.name, "my-queries");
        assert_eq!(config_map.items.as_ref().unwrap()[0].key, "orders.yaml");
    }

    #[test]
    fn disabled_monitoring_turns_off_database_figures() {
        let mut pod = template();
        configure_pod(
            &mut pod,
            &MonitoringSpec {
                enabled: false,
                ..MonitoringSpec::default()
            },
        );
        assert_eq!(env(&pod, "METRICS_DATABASE").as_deref(), Some("false"));
        assert!(env(&pod, "METRICS_CUSTOM_QUERIES").is_none());
        assert!(pod.spec.unwrap().volumes.is_none());
    }
}
