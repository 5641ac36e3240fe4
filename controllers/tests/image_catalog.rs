//! Image catalogs: a cluster that names a catalog and a major version runs the catalog's image;
//! changing the catalog's image rolls the cluster (minor upgrade); a catalog without the
//! version, or no catalog, is a Degraded condition.

mod common;

use api::image_catalog::CatalogImage;
use api::{ClusterImageCatalog, ClusterImageCatalogSpec, ImageCatalog, ImageCatalogSpec};
use common::{Env, spec, template_image};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

fn catalog_spec(name: &str, kind: &str) -> api::PostgresClusterSpec {
    let mut cluster_spec = spec(2, "unused");
    cluster_spec.image = None;
    cluster_spec.image_catalog_ref =
        Some(serde_json::from_value(json!({"kind": kind, "name": name})).unwrap());
    cluster_spec
}

fn degraded_reason(cluster: &api::PostgresCluster) -> String {
    let status = cluster.status.as_ref().unwrap();
    api::common::find_condition(&status.conditions, "Degraded")
        .unwrap()
        .reason
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_image_is_used_and_changing_it_rolls_the_cluster() {
    let env = Env::start("catalogs").await;
    env.create_cluster("db", catalog_spec("postgres", "ImageCatalog"))
        .await;
    let cluster = env.cluster_in_phase("db", "Degraded").await;
    assert_eq!(degraded_reason(&cluster), "ImageCatalogNotFound");

    let catalogs: Api<ImageCatalog> = env.api();
    catalogs
        .create(
            &PostParams::default(),
            &ImageCatalog::new(
                "postgres",
                ImageCatalogSpec {
                    images: vec![CatalogImage {
                        major: 18,
                        image: "pg:18.1".into(),
                    }],
                },
            ),
        )
        .await
        .unwrap();
    let sts: StatefulSet = env.object("db").await;
    assert_eq!(template_image(&sts), "pg:18.1");
    env.play_healthy_cluster("db", 2).await;
    let cluster = env.cluster_in_phase("db", "Healthy").await;
    assert_eq!(cluster.status.unwrap().image.as_deref(), Some("pg:18.1"));

    // A minor upgrade: only the catalog changes.
    catalogs
        .patch(
            "postgres",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"images": [{"major": 18, "image": "pg:18.2"}]}})),
        )
        .await
        .unwrap();
    env.cluster_where(
        "db",
        "the catalog change starts a rolling update",
        |cluster| {
            cluster
                .status
                .as_ref()
                .is_some_and(|s| s.phase.as_deref() == Some("Upgrading"))
        },
    )
    .await;
    let history = env.play_rolling_update("db", 2).await;
    assert_eq!(
        history,
        [
            "recreated db-1",
            "switchover db-0 -> db-1",
            "recreated db-0"
        ]
    );
    assert_eq!(
        template_image(&env.object::<StatefulSet>("db").await),
        "pg:18.2"
    );
    let cluster = env.cluster_in_phase("db", "Healthy").await;
    assert_eq!(cluster.status.unwrap().image.as_deref(), Some("pg:18.2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_image_catalog_without_the_major_version_is_degraded_until_added() {
    let env = Env::start("cluster-catalogs").await;
    let catalogs: Api<ClusterImageCatalog> = Api::all(env.client.clone());
    catalogs
        .create(
            &PostParams::default(),
            &ClusterImageCatalog::new(
                "shared",
                ClusterImageCatalogSpec {
                    images: vec![CatalogImage {
                        major: 19,
                        image: "pg:19.0".into(),
                    }],
                },
            ),
        )
        .await
        .unwrap();
    env.create_cluster("db", catalog_spec("shared", "ClusterImageCatalog"))
        .await;
    let cluster = env.cluster_in_phase("db", "Degraded").await;
    assert_eq!(degraded_reason(&cluster), "ImageNotInCatalog");
    let statefulsets: Api<StatefulSet> = env.api();
    assert!(statefulsets.get_opt("db").await.unwrap().is_none());

    catalogs
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"images": [
                {"major": 18, "image": "pg:18.3"},
                {"major": 19, "image": "pg:19.0"}
            ]}})),
        )
        .await
        .unwrap();
    let sts: StatefulSet = env.object("db").await;
    assert_eq!(template_image(&sts), "pg:18.3");
    env.cluster_in_phase("db", "Creating").await;
}
