//! Typed Kubernetes API of postgres-operator (group `postgres.keiailab.io`, version `v1alpha1`).
//!
//! Types only: no client calls and no I/O. The CRD YAML, the Helm chart's CRDs and the OLM bundle's
//! manifests are all generated from these structs by `cargo xtask gen`.

pub mod backup;
pub mod common;
pub mod contract;
pub mod image_catalog;
pub mod pooler;
pub mod postgres_cluster;
pub mod postgres_database;
pub mod postgres_user;
pub mod sharding;

pub use backup::{BackupJob, BackupJobSpec, ScheduledBackup, ScheduledBackupSpec};
pub use image_catalog::{
    ClusterImageCatalog, ClusterImageCatalogSpec, ImageCatalog, ImageCatalogSpec,
};
pub use pooler::{Pooler, PoolerSpec};
pub use postgres_cluster::{PostgresCluster, PostgresClusterSpec, PostgresClusterStatus};
pub use postgres_database::{PostgresDatabase, PostgresDatabaseSpec};
pub use postgres_user::{PostgresUser, PostgresUserSpec};
pub use sharding::{ShardRange, ShardRangeSpec, ShardSplitJob, ShardSplitJobSpec};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CustomResourceDefinition of the API, in a stable order (the order of SPEC.md).
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        PostgresCluster::crd(),
        BackupJob::crd(),
        ScheduledBackup::crd(),
        PostgresDatabase::crd(),
        PostgresUser::crd(),
        Pooler::crd(),
        ImageCatalog::crd(),
        ClusterImageCatalog::crd(),
        ShardRange::crd(),
        ShardSplitJob::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn spec_schema(crd: &CustomResourceDefinition) -> Value {
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("every CRD has an OpenAPI v3 schema");
        serde_json::to_value(schema).unwrap()
    }

    fn rules(value: &Value) -> Vec<String> {
        let mut out = Vec::new();
        collect_rules(value, &mut out);
        out
    }

    fn collect_rules(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::Array(list)) = map.get("x-kubernetes-validations") {
                    for rule in list {
                        out.push(rule["rule"].as_str().unwrap().to_string());
                        assert!(
                            rule["message"].as_str().is_some_and(|m| !m.is_empty()),
                            "every CEL rule carries a message for the user: {rule}"
                        );
                    }
                }
                map.values().for_each(|v| collect_rules(v, out));
            }
            Value::Array(list) => list.iter().for_each(|v| collect_rules(v, out)),
            _ => {}
        }
    }

    #[test]
    fn there_are_ten_kinds_in_one_group_and_version() {
        let crds = all_crds();
        let kinds: Vec<_> = crds.iter().map(|c| c.spec.names.kind.clone()).collect();
        assert_eq!(
            kinds,
            [
                "PostgresCluster",
                "BackupJob",
                "ScheduledBackup",
                "PostgresDatabase",
                "PostgresUser",
                "Pooler",
                "ImageCatalog",
                "ClusterImageCatalog",
                "ShardRange",
                "ShardSplitJob"
            ]
        );
        for crd in &crds {
            assert_eq!(crd.spec.group, common::GROUP);
            assert_eq!(crd.spec.versions.len(), 1);
            assert_eq!(crd.spec.versions[0].name, common::VERSION);
            let expected_scope = if crd.spec.names.kind == "ClusterImageCatalog" {
                "Cluster"
            } else {
                "Namespaced"
            };
            assert_eq!(crd.spec.scope, expected_scope, "{}", crd.spec.names.kind);
        }
    }

    #[test]
    fn every_kind_with_state_has_a_status_subresource_conditions_and_observed_generation() {
        for crd in all_crds() {
            let kind = crd.spec.names.kind.clone();
            if kind.ends_with("ImageCatalog") {
                continue; // catalogs are plain data with no state to report
            }
            let version = &crd.spec.versions[0];
            assert!(
                version
                    .subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{kind} has a status subresource"
            );
            let status = &spec_schema(&crd)["properties"]["status"]["properties"];
            assert!(
                status["conditions"].is_object(),
                "{kind} status has conditions"
            );
            assert!(
                status["observedGeneration"].is_object(),
                "{kind} status has observedGeneration"
            );
        }
    }

    #[test]
    fn every_kind_has_printer_columns_and_documented_fields() {
        for crd in all_crds() {
            let kind = crd.spec.names.kind.clone();
            let columns = crd.spec.versions[0].additional_printer_columns.clone();
            assert!(
                columns.is_some_and(|c| !c.is_empty()),
                "{kind} has printer columns"
            );
            let spec = &spec_schema(&crd)["properties"]["spec"];
            for (field, schema) in spec["properties"].as_object().unwrap() {
                assert!(
                    schema["description"].as_str().is_some_and(|d| d.len() > 3),
                    "{kind}.spec.{field} is documented"
                );
            }
        }
    }

    #[test]
    fn postgres_cluster_schema_carries_defaults_and_cel_rules() {
        let schema = spec_schema(&PostgresCluster::crd());
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["properties"]["instances"]["default"], json!(1));
        assert_eq!(spec["properties"]["postgresVersion"]["default"], json!(18));
        assert_eq!(
            spec["properties"]["failover"]["properties"]["leaseDurationSeconds"]["default"],
            json!(4)
        );
        let all_rules = rules(&schema);
        for needle in [
            "self >= 18",
            "self >= 1",
            "self.replication.synchronous.number < self.instances",
            "self.storageClass == oldSelf.storageClass",
            "self.sharding.shards == oldSelf.sharding.shards",
            "has(self.image) != has(self.imageCatalogRef)",
        ] {
            assert!(
                all_rules.iter().any(|r| r.contains(needle)),
                "a CEL rule contains {needle:?}; rules: {all_rules:#?}"
            );
        }
    }

    #[test]
    fn scheduled_backup_validates_cron_syntax() {
        let all_rules = rules(&spec_schema(&ScheduledBackup::crd()));
        assert!(all_rules.iter().any(|r| r.contains("@(yearly")));
    }

    #[test]
    fn specs_round_trip_through_json_with_defaults_filled_in() {
        let cluster: PostgresCluster = serde_json::from_value(json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "PostgresCluster",
            "metadata": {"name": "demo", "namespace": "default"},
            "spec": {"instances": 3, "image": "postgres:18"}
        }))
        .unwrap();
        assert_eq!(cluster.spec.postgres_version, 18);
        assert_eq!(cluster.spec.storage.size, "1Gi");
        assert_eq!(cluster.spec.failover.renew_deadline_seconds, 2);
        assert!(cluster.spec.monitoring.enabled);
        let again: PostgresCluster =
            serde_json::from_value(serde_json::to_value(&cluster).unwrap()).unwrap();
        assert_eq!(again.spec, cluster.spec);

        let pooler: Pooler = serde_json::from_value(json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1",
            "kind": "Pooler",
            "metadata": {"name": "p"},
            "spec": {"cluster": {"name": "demo"}, "type": "ro"}
        }))
        .unwrap();
        assert_eq!(pooler.spec.type_, pooler::PoolerType::Ro);
        assert_eq!(
            pooler.spec.pgbouncer.pool_mode,
            pooler::PoolMode::Transaction
        );
        let value = serde_json::to_value(&pooler).unwrap();
        assert_eq!(value["spec"]["type"], "ro");
        assert_eq!(value["spec"]["pgbouncer"]["poolMode"], "transaction");
    }

    #[test]
    fn catalog_lookup_finds_the_image_of_a_major_version() {
        let images = vec![
            image_catalog::CatalogImage {
                major: 18,
                image: "pg:18.1".into(),
            },
            image_catalog::CatalogImage {
                major: 19,
                image: "pg:19.0".into(),
            },
        ];
        assert_eq!(image_catalog::image_for_major(&images, 19), Some("pg:19.0"));
        assert_eq!(image_catalog::image_for_major(&images, 17), None);
    }
}
