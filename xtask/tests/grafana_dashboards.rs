//! The Grafana dashboards ship as ConfigMaps labelled for Grafana's sidecar, with the content of
//! `deploy/grafana/dashboards/`: from the Helm chart (`grafanaDashboards.enabled`, checked with
//! the real helm) and from `deploy/grafana/` (the real kustomize).

use std::collections::BTreeMap;

use serde_json::Value;
use testbed::delivery::run_ok;
use testbed::{dashboards, manifests, paths};

/// Dashboard file name -> the ConfigMap carrying it, for every ConfigMap in `documents`.
fn dashboard_config_maps(documents: &[Value]) -> BTreeMap<String, Value> {
    documents
        .iter()
        .filter(|document| document["kind"] == "ConfigMap")
        .flat_map(|config_map| {
            config_map["data"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(file, _)| (file.clone(), config_map.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_ships_every_dashboard(documents: &[Value], namespace: Option<&str>) {
    let shipped = dashboard_config_maps(documents);
    let names = dashboards::names();
    assert_eq!(shipped.len(), names.len(), "{:?}", shipped.keys());
    for name in names {
        let file = format!("{name}.json");
        let config_map = &shipped[&file];
        assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
        if let Some(namespace) = namespace {
            assert_eq!(config_map["metadata"]["namespace"], namespace);
        }
        let data: Value =
            serde_json::from_str(config_map["data"][&file].as_str().unwrap()).unwrap();
        assert_eq!(
            data,
            dashboards::load(&name),
            "{file} differs from its source"
        );
    }
}

#[test]
fn the_chart_ships_the_dashboards_as_sidecar_config_maps_when_enabled() {
    let chart = paths::workspace_root()
        .join("charts/postgres-operator")
        .display()
        .to_string();
    let enabled = "grafanaDashboards.enabled=true,grafanaDashboards.namespace=monitoring";
    run_ok(
        &paths::helm(),
        &["lint", "--strict", &chart, "--set", enabled],
        None,
    )
    .unwrap();
    let rendered = run_ok(
        &paths::helm(),
        &[
            "template",
            "pg",
            &chart,
            "--namespace",
            "databases",
            "--set",
            enabled,
        ],
        None,
    )
    .unwrap();
    assert_ships_every_dashboard(
        &manifests::documents(&rendered).unwrap(),
        Some("monitoring"),
    );

    let default = run_ok(&paths::helm(), &["template", "pg", &chart], None).unwrap();
    assert!(dashboard_config_maps(&manifests::documents(&default).unwrap()).is_empty());
}

#[test]
fn kustomize_builds_the_same_config_maps_from_deploy_grafana() {
    let folder = paths::workspace_root()
        .join("deploy/grafana")
        .display()
        .to_string();
    let built = run_ok(&paths::kustomize(), &["build", &folder], None).unwrap();
    assert_ships_every_dashboard(&manifests::documents(&built).unwrap(), None);
}
