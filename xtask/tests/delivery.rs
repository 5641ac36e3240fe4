//! Delivery, checked by the real tools: the Helm chart (helm lint / template), the kustomize
//! overlays (kustomize build), every rendered manifest (kubeconform with schemas from the real
//! kube-apiserver and our CRDs, then applied to that API server, whose authorizer answers the
//! RBAC questions), the OLM bundle, the Dockerfiles (hadolint), the SBOMs (CycloneDX schema),
//! the license check (a planted GPL dependency) and the release signatures (cosign), the last
//! two in `delivery/release.rs`.
//!
//! The tools come from `cargo xtask setup`; the `xtask` binary is the one cargo built for this test.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use kube::api::{Api, DynamicObject};
use serde_json::{Value, json};
use testbed::delivery::{can, kubeconform, run, run_ok, write_kubeconform_schemas};
use testbed::{ApiServer, manifests, paths};

#[path = "delivery/release.rs"]
mod release;

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn root() -> PathBuf {
    paths::workspace_root()
}

fn xtask(args: &[&str]) -> std::process::Output {
    xtask_with_env(args, &[])
}

fn xtask_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(XTASK)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .expect("running the xtask binary")
}

fn kinds(documents: &[Value]) -> Vec<String> {
    documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn named<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(documents)))
}

fn env_value<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("env {name} missing"))
}

/// Applies objects in dependency order: Namespaces and CRDs first, then the rest.
async fn apply_in_order(
    server: &ApiServer,
    documents: &[Value],
    namespace: &str,
) -> anyhow::Result<()> {
    let client = server.client().await?;
    let first: Vec<(String, Value)> = documents
        .iter()
        .filter(|d| d["kind"] == "Namespace" || d["kind"] == "CustomResourceDefinition")
        .map(|d| ("rendered".to_string(), d.clone()))
        .collect();
    manifests::apply_all(&client, &first, namespace).await?;
    server.install_crds(&api::all_crds()).await?;
    let rest: Vec<(String, Value)> = documents
        .iter()
        .filter(|d| d["kind"] != "Namespace" && d["kind"] != "CustomResourceDefinition")
        .map(|d| ("rendered".to_string(), d.clone()))
        .collect();
    manifests::apply_all(&client, &rest, namespace).await?;
    Ok(())
}

async fn create_namespace(server: &ApiServer, name: &str) -> anyhow::Result<()> {
    let client = server.client().await?;
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    manifests::apply(&client, &namespace, "default").await?;
    Ok(())
}

/// The least-privilege promises of SPEC.md's RBAC section, asked to the real authorizer for the
/// operator's ServiceAccount in `namespace` (watching `watched`).
async fn assert_least_privilege(
    server: &ApiServer,
    namespace: &str,
    watched: &str,
) -> anyhow::Result<()> {
    let client = server.client().await?;
    let user = format!("system:serviceaccount:{namespace}:postgres-operator");
    let allowed = [
        ("watch", "postgres.keiailab.io", "postgresclusters", None),
        (
            "patch",
            "postgres.keiailab.io",
            "postgresclusters/status",
            None,
        ),
        ("list", "postgres.keiailab.io", "clusterimagecatalogs", None),
        ("create", "cert-manager.io", "certificates", Some(watched)),
        ("create", "apps", "statefulsets", Some(watched)),
        ("delete", "", "pods", Some(watched)),
        ("create", "", "secrets", Some(watched)),
        ("create", "", "persistentvolumeclaims", Some(watched)),
        ("create", "policy", "poddisruptionbudgets", Some(watched)),
        (
            "create",
            "networking.k8s.io",
            "networkpolicies",
            Some(watched),
        ),
        ("create", "batch", "jobs", Some(watched)),
        ("update", "coordination.k8s.io", "leases", Some(namespace)),
    ];
    for (verb, group, resource, ns) in allowed {
        assert!(
            can(&client, &user, verb, group, resource, ns).await?,
            "{user} may {verb} {group}/{resource} in {ns:?}"
        );
    }
    let denied = [
        ("list", "", "secrets", None),
        ("create", "apps", "statefulsets", Some("somewhere-else")),
        ("get", "", "secrets", Some("kube-system")),
        (
            "delete",
            "postgres.keiailab.io",
            "clusterimagecatalogs",
            None,
        ),
        ("create", "", "namespaces", None),
        ("list", "", "nodes", None),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
        ),
        (
            "update",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
        ),
    ];
    for (verb, group, resource, ns) in denied {
        assert!(
            !can(&client, &user, verb, group, resource, ns).await?,
            "{user} must not {verb} {group}/{resource} in {ns:?}"
        );
    }
    Ok(())
}

/// The operator's pod passes the restricted Pod Security Standard: the API server's PodSecurity
/// admission (enforce=restricted on `namespace`) admits a Pod made from the Deployment's template,
/// and refuses the same Pod running as root (so the check is live).
async fn assert_restricted_pod(
    server: &ApiServer,
    namespace: &str,
    deployment: &Value,
) -> anyhow::Result<()> {
    let client = server.client().await?;
    let labels = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace,
        "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    manifests::apply(&client, &labels, namespace).await?;
    let spec = deployment["spec"]["template"]["spec"].clone();
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "restricted-check", "namespace": namespace}, "spec": spec});
    manifests::apply(&client, &pod, namespace)
        .await
        .context("the operator's pod is admitted under the restricted Pod Security Standard")?;
    let mut root = pod.clone();
    root["metadata"]["name"] = json!("root-check");
    root["spec"]["securityContext"]["runAsNonRoot"] = json!(false);
    root["spec"]["securityContext"]["runAsUser"] = json!(0);
    let refused = manifests::apply(&client, &root, namespace).await;
    let message = format!("{refused:?}");
    assert!(
        refused.is_err() && message.contains("violates PodSecurity \\\"restricted"),
        "PodSecurity refuses a pod running as root: {message}"
    );
    Ok(())
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    run_ok(&paths::helm(), args, None)
}

fn chart() -> String {
    root()
        .join("charts/postgres-operator")
        .display()
        .to_string()
}

#[tokio::test]
async fn helm_chart_lints_renders_validates_and_installs_with_least_privilege() -> anyhow::Result<()>
{
    // Arrange: the chart, a real API server, kubeconform schemas from both.
    let chart = chart();
    helm(&["lint", "--strict", &chart])?;
    helm(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "watchAllNamespaces=true,metrics.serviceMonitor.enabled=true,replicaCount=2",
    ])?;
    let server = ApiServer::start().await?;
    let schemas = tempfile::tempdir()?;
    let location = write_kubeconform_schemas(&server, &api::all_crds(), schemas.path()).await?;

    // Act: render as a release in namespace "databases" watching "apps".
    let rendered = helm(&[
        "template",
        "pg",
        &chart,
        "--namespace",
        "databases",
        "--include-crds",
        "--set",
        "watchNamespace=apps",
    ])?;
    let documents = manifests::documents(&rendered)?;

    // Assert: the objects of the chart, valid for kubeconform and for the API server.
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(kinds(&documents).iter().any(|k| k == kind), "{kind}");
    }
    assert_eq!(
        kinds(&documents)
            .iter()
            .filter(|k| *k == "CustomResourceDefinition")
            .count(),
        api::all_crds().len()
    );
    let summary = kubeconform(&rendered, &location, &[])?;
    assert!(
        summary.contains(&format!(
            "Valid: {}, Invalid: 0, Errors: 0, Skipped: 0",
            documents.len()
        )),
        "{summary}"
    );
    // kubeconform is strict: a misspelt field of a built-in kind and a wrong type in one of our
    // CRDs' schemas are both refused.
    for (from, to) in [
        ("serviceAccountName:", "serviceAcountName:"),
        ("replicas: 1", "replicas: one"),
    ] {
        let broken = rendered.replacen(from, to, 1);
        assert_ne!(broken, rendered);
        assert!(
            kubeconform(&broken, &location, &[]).is_err(),
            "{to} is refused"
        );
    }
    let cluster = std::fs::read_to_string(root().join("examples/postgrescluster.yaml"))?;
    kubeconform(&cluster, &location, &[])?;
    let broken = cluster.replacen("instances: 3", "instances: three", 1);
    assert!(
        kubeconform(&broken, &location, &[]).is_err(),
        "our CRD schema is used"
    );
    let deployment = named(&documents, "Deployment", "postgres-operator");
    assert_eq!(env_value(deployment, "WATCH_NAMESPACE")["value"], "apps");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"],
        false
    );

    create_namespace(&server, "databases").await?;
    create_namespace(&server, "apps").await?;
    apply_in_order(&server, &documents, "databases").await?;
    assert_least_privilege(&server, "databases", "apps").await?;
    assert_restricted_pod(&server, "databases", deployment).await?;
    let client = server.client().await?;
    let user = "system:serviceaccount:databases:postgres-operator";
    assert!(
        !can(
            &client,
            user,
            "create",
            "apps",
            "statefulsets",
            Some("default")
        )
        .await?,
        "only the watched namespace"
    );

    // A ServiceMonitor, when asked for; kubeconform has no schema for it (no CRD offline).
    let with_monitor = helm(&[
        "template",
        "pg",
        &chart,
        "--set",
        "metrics.serviceMonitor.enabled=true",
    ])?;
    let monitor_documents = manifests::documents(&with_monitor)?;
    let monitor = named(&monitor_documents, "ServiceMonitor", "postgres-operator");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    let summary = kubeconform(&with_monitor, &location, &["ServiceMonitor"])?;
    assert!(summary.contains("Invalid: 0, Errors: 0"), "{summary}");

    // All namespaces: the workload rules become cluster-wide, and WATCH_NAMESPACE is empty.
    let everywhere = helm(&["template", "pg", &chart, "--set", "watchAllNamespaces=true"])?;
    let everywhere = manifests::documents(&everywhere)?;
    assert!(!kinds(&everywhere).iter().any(|k| k == "Role"));
    named(&everywhere, "ClusterRole", "postgres-operator-workloads");
    let deployment = named(&everywhere, "Deployment", "postgres-operator");
    assert_eq!(env_value(deployment, "WATCH_NAMESPACE")["value"], "");
    Ok(())
}

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_on_the_real_apiserver() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let kubeconfig = server.kubeconfig_path().display().to_string();
    let chart = chart();
    let client = server.client().await?;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), "databases");
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());

    helm(&[
        "install",
        "pg",
        &chart,
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "databases",
        "--create-namespace",
    ])?;
    let deployment = deployments.get("postgres-operator").await?;
    assert_eq!(deployment.spec.unwrap().replicas, Some(1));
    for crd in api::all_crds() {
        crds.get(crd.metadata.name.as_deref().unwrap()).await?;
    }
    let status = helm(&[
        "status",
        "pg",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "databases",
    ])?;
    assert!(status.contains("STATUS: deployed"), "{status}");

    helm(&[
        "upgrade",
        "pg",
        &chart,
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "databases",
        "--set",
        "replicaCount=2",
    ])?;
    let deployment = deployments.get("postgres-operator").await?;
    assert_eq!(deployment.spec.unwrap().replicas, Some(2));

    helm(&[
        "uninstall",
        "pg",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "databases",
    ])?;
    assert!(deployments.get_opt("postgres-operator").await?.is_none());
    // Helm keeps CRDs on uninstall, so PostgresClusters (and their data) survive it.
    crds.get("postgresclusters.postgres.keiailab.io").await?;
    Ok(())
}

#[test]
fn helm_values_schema_refuses_bad_values() {
    let chart = chart();
    for bad in [
        "replicaCount=0",
        "replicaCount=2,leaderElection=false",
        "watchNamespace=Not_A_Namespace",
        "image.pullPolicy=Sometimes",
        "unknownValue=1",
    ] {
        let output = run(
            &paths::helm(),
            &["template", "pg", &chart, "--set", bad],
            None,
        )
        .unwrap();
        assert!(!output.status.success(), "helm accepted {bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("values don't meet the specifications of the schema"),
            "{bad}: {stderr}"
        );
    }
}

#[test]
fn helm_values_set_json_logs_and_the_otlp_endpoint() {
    let chart = chart();
    let render = |set: &str| {
        let rendered = helm(&["template", "pg", &chart, "--set", set]).unwrap();
        manifests::documents(&rendered).unwrap()
    };
    let plain = render("logLevel=info");
    let deployment = named(&plain, "Deployment", "postgres-operator");
    assert_eq!(env_value(deployment, "LOG_JSON")["value"], "true");
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(!env.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{env}");

    let traced = render("tracing.otlpEndpoint=http://collector.observability:4318,logJson=false");
    let deployment = named(&traced, "Deployment", "postgres-operator");
    assert_eq!(
        env_value(deployment, "OTEL_EXPORTER_OTLP_ENDPOINT")["value"],
        "http://collector.observability:4318"
    );
    assert_eq!(env_value(deployment, "LOG_JSON")["value"], "false");
    // The CA renewal settings reach the operator; the defaults are the operator's own.
    assert_eq!(
        env_value(deployment, "TLS_CA_OVERLAP_SECONDS")["value"],
        "604800"
    );
    assert_eq!(
        env_value(deployment, "TLS_CA_SECONDS")["value"],
        "315360000"
    );
    let tuned = render("tls.caOverlapSeconds=3600,tls.renewBeforeSeconds=86400");
    let deployment = named(&tuned, "Deployment", "postgres-operator");
    assert_eq!(
        env_value(deployment, "TLS_CA_OVERLAP_SECONDS")["value"],
        "3600"
    );
    assert_eq!(
        env_value(deployment, "TLS_RENEW_BEFORE_SECONDS")["value"],
        "86400"
    );

    let output = run(
        &paths::helm(),
        &[
            "template",
            "pg",
            &chart,
            "--set",
            "tracing.otlpEndpoint=collector:4318",
        ],
        None,
    )
    .unwrap();
    assert!(
        !output.status.success(),
        "an endpoint without a scheme is refused"
    );
}

#[tokio::test]
async fn kustomize_overlays_build_validate_and_apply_with_least_privilege() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let schemas = tempfile::tempdir()?;
    let location = write_kubeconform_schemas(&server, &api::all_crds(), schemas.path()).await?;
    let kustomize = paths::kustomize();
    let mut built = Vec::new();
    for overlay in [
        "deploy/base",
        "deploy/overlays/dev",
        "deploy/overlays/production",
    ] {
        let folder = root().join(overlay);
        let yaml = run_ok(&kustomize, &["build", &folder.display().to_string()], None)
            .with_context(|| format!("kustomize build {overlay}"))?;
        let summary = kubeconform(&yaml, &location, &[])?;
        assert!(
            summary.contains("Invalid: 0, Errors: 0"),
            "{overlay}: {summary}"
        );
        let documents = manifests::documents(&yaml)?;
        for object in &documents {
            if object["kind"] != "Namespace"
                && object["kind"] != "CustomResourceDefinition"
                && !object["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("Cluster")
            {
                assert_eq!(
                    object["metadata"]["namespace"], "postgres-operator-system",
                    "{overlay}: {} is in the operator's namespace",
                    object["kind"]
                );
            }
        }
        built.push((overlay, documents));
    }

    let replicas = |documents: &[Value]| {
        named(documents, "Deployment", "postgres-operator")["spec"]["replicas"].clone()
    };
    let (_, dev) = &built[1];
    let (_, production) = &built[2];
    assert_eq!(replicas(dev), 1);
    assert_eq!(
        env_value(named(dev, "Deployment", "postgres-operator"), "LOG_LEVEL")["value"],
        "debug"
    );
    assert_eq!(
        env_value(
            named(dev, "Deployment", "postgres-operator"),
            "LEADER_ELECT"
        )["value"],
        "false"
    );
    assert_eq!(replicas(production), 2);
    assert_eq!(
        env_value(
            named(production, "Deployment", "postgres-operator"),
            "LEADER_ELECT"
        )["value"],
        "true"
    );
    named(production, "PodDisruptionBudget", "postgres-operator");
    let subjects = &named(production, "ClusterRoleBinding", "postgres-operator")["subjects"];
    assert_eq!(subjects[0]["namespace"], "postgres-operator-system");

    // The production overlay, as Argo CD or Flux would apply it, onto the real API server.
    apply_in_order(&server, production, "postgres-operator-system").await?;
    let client = server.client().await?;
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "postgres-operator-system",
        &kube::api::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "apps",
            "v1",
            "Deployment",
        )),
    );
    let stored = deployments.get("postgres-operator").await?;
    assert_eq!(stored.data["spec"]["replicas"], 2);
    let namespace = named(production, "Namespace", "postgres-operator-system");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    assert_restricted_pod(
        &server,
        "postgres-operator-system",
        named(production, "Deployment", "postgres-operator"),
    )
    .await?;
    assert_least_privilege(
        &server,
        "postgres-operator-system",
        "postgres-operator-system",
    )
    .await?;
    Ok(())
}

#[test]
fn gitops_manifests_sync_an_overlay_that_builds() {
    let root = root();
    let argo = manifests::read_folder(&root.join("deploy/gitops/argocd")).unwrap();
    let flux = manifests::read_folder(&root.join("deploy/gitops/flux")).unwrap();
    let application = &argo[0].1;
    assert_eq!(application["apiVersion"], "argoproj.io/v1alpha1");
    assert_eq!(application["kind"], "Application");
    let mut paths_synced = vec![
        application["spec"]["source"]["path"]
            .as_str()
            .unwrap()
            .to_string(),
    ];
    assert!(
        application["spec"]["syncPolicy"]["syncOptions"]
            .as_array()
            .unwrap()
            .contains(&json!("ServerSideApply=true")),
        "the CRDs are too large for client-side apply"
    );
    let kinds: Vec<&str> = flux
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["GitRepository", "Kustomization"]);
    let kustomization = &flux[1].1;
    assert_eq!(
        kustomization["apiVersion"],
        "kustomize.toolkit.fluxcd.io/v1"
    );
    assert_eq!(
        kustomization["spec"]["sourceRef"]["name"],
        flux[0].1["metadata"]["name"]
    );
    paths_synced.push(
        kustomization["spec"]["path"]
            .as_str()
            .unwrap()
            .trim_start_matches("./")
            .to_string(),
    );
    for path in paths_synced {
        run_ok(
            &paths::kustomize(),
            &["build", &root.join(&path).display().to_string()],
            None,
        )
        .unwrap_or_else(|e| panic!("the synced path {path} builds: {e}"));
    }
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap()
}

/// The OLM bundle: operator-framework's bundle validators (`olm-validate`, built from the library
/// `operator-sdk bundle validate` uses, since operator-sdk is not on the Go module proxy), then
/// our own checks: the registry+v1 layout, the CSV's fields, owned CRDs that match the bundle's
/// CRD files, and alm-examples and the install strategy accepted by a real API server.
#[tokio::test]
async fn olm_bundle_is_valid_and_its_install_strategy_applies() -> anyhow::Result<()> {
    let bundle = root().join("bundle");
    // operator-framework's own bundle validators (those of `operator-sdk bundle validate`).
    let report = run_ok(
        &paths::olm_validate(),
        &[&bundle.display().to_string()],
        None,
    )?;
    assert!(report.contains("bundle is valid"), "{report}");
    assert!(!report.contains("WARN"), "{report}");
    // ... and they are not a rubber stamp: a CSV that forgets a CRD of its bundle fails.
    // (Not a dot-folder: the loader skips hidden paths, and tempdir()'s names start with a dot.)
    let broken = tempfile::Builder::new().prefix("bundle-").tempdir()?;
    testbed::delivery::copy_dir(&bundle, broken.path())?;
    let csv_path = broken
        .path()
        .join("manifests/postgres-operator.clusterserviceversion.yaml");
    let mut csv: Value = serde_yaml::from_str(&std::fs::read_to_string(&csv_path)?)?;
    csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    std::fs::write(&csv_path, serde_yaml::to_string(&csv)?)?;
    let refused = run(
        &paths::olm_validate(),
        &[&broken.path().display().to_string()],
        None,
    )?;
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{findings}");
    assert!(findings.contains("not defined in CSV"), "{findings}");

    let annotations = read_yaml(&bundle.join("metadata/annotations.yaml"))["annotations"].clone();
    assert_eq!(
        annotations["operators.operatorframework.io.bundle.mediatype.v1"],
        "registry+v1"
    );
    assert_eq!(
        annotations["operators.operatorframework.io.bundle.manifests.v1"],
        "manifests/"
    );
    assert_eq!(
        annotations["operators.operatorframework.io.bundle.metadata.v1"],
        "metadata/"
    );
    let package = annotations["operators.operatorframework.io.bundle.package.v1"]
        .as_str()
        .unwrap();
    let default_channel = annotations["operators.operatorframework.io.bundle.channel.default.v1"]
        .as_str()
        .unwrap();
    assert!(
        annotations["operators.operatorframework.io.bundle.channels.v1"]
            .as_str()
            .unwrap()
            .split(',')
            .any(|c| c == default_channel)
    );
    // The bundle image carries the same annotations as labels.
    let dockerfile = std::fs::read_to_string(bundle.join("bundle.Dockerfile"))?;
    for (key, value) in annotations.as_object().unwrap() {
        assert!(
            dockerfile.contains(&format!("LABEL {key}={}", value.as_str().unwrap())),
            "bundle.Dockerfile labels {key}"
        );
    }
    let scorecard = read_yaml(&bundle.join("tests/scorecard/config.yaml"));
    assert_eq!(scorecard["kind"], "Configuration");
    assert!(
        !scorecard["stages"][0]["tests"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // manifests/: one CSV and the CRDs, nothing else.
    let manifests_dir = bundle.join("manifests");
    let mut csv = Value::Null;
    let mut crd_files = Vec::new();
    for (_, document) in manifests::read_folder(&manifests_dir)? {
        match document["kind"].as_str().unwrap() {
            "ClusterServiceVersion" => csv = document,
            "CustomResourceDefinition" => crd_files.push(document),
            other => panic!("unexpected {other} in bundle/manifests"),
        }
    }
    assert_eq!(crd_files.len(), api::all_crds().len());
    let spec = &csv["spec"];
    let version = spec["version"].as_str().unwrap();
    assert_eq!(csv["metadata"]["name"], format!("{package}.v{version}"));
    for field in ["displayName", "description", "maturity", "minKubeVersion"] {
        assert!(
            spec[field].as_str().is_some_and(|s| !s.is_empty()),
            "spec.{field}"
        );
    }
    assert!(["alpha", "beta", "stable"].contains(&spec["maturity"].as_str().unwrap()));
    let capability = csv["metadata"]["annotations"]["capabilities"]
        .as_str()
        .unwrap();
    assert!(
        [
            "Basic Install",
            "Seamless Upgrades",
            "Full Lifecycle",
            "Deep Insights",
            "Auto Pilot"
        ]
        .contains(&capability)
    );
    let icon = &spec["icon"][0];
    assert_eq!(icon["mediatype"], "image/svg+xml");
    assert!(icon["base64data"].as_str().is_some_and(|d| d.len() > 100));
    let modes: Vec<&str> = spec["installModes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        modes,
        [
            "OwnNamespace",
            "SingleNamespace",
            "MultiNamespace",
            "AllNamespaces"
        ]
    );

    // Owned CRDs: exactly the bundle's CRD files, each described from its schema.
    let owned = spec["customresourcedefinitions"]["owned"]
        .as_array()
        .unwrap();
    assert_eq!(owned.len(), crd_files.len());
    for crd in &crd_files {
        let name = crd["metadata"]["name"].as_str().unwrap();
        let entry = owned
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("{name} is owned"));
        assert_eq!(entry["kind"], crd["spec"]["names"]["kind"]);
        assert_eq!(entry["version"], crd["spec"]["versions"][0]["name"]);
        assert!(
            entry["description"].as_str().is_some_and(|d| d.len() > 10),
            "{name}"
        );
        assert!(
            !entry["specDescriptors"].as_array().unwrap().is_empty(),
            "{name}"
        );
    }

    // alm-examples: one per example file, each of an owned kind, accepted by the API server.
    let examples: Vec<Value> = serde_json::from_str(
        csv["metadata"]["annotations"]["alm-examples"]
            .as_str()
            .unwrap(),
    )?;
    let example_files = std::fs::read_dir(root().join("examples"))?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        })
        .count();
    assert_eq!(examples.len(), example_files);
    for example in &examples {
        assert!(
            owned.iter().any(|o| o["kind"] == example["kind"]),
            "{}",
            example["kind"]
        );
    }
    let server = ApiServer::start().await?;
    server.install_crds(&api::all_crds()).await?;
    create_namespace(&server, "operators").await?;
    let client = server.client().await?;
    let examples: Vec<(String, Value)> = examples
        .into_iter()
        .map(|e| ("alm-examples".to_string(), e))
        .collect();
    manifests::apply_all(&client, &examples, "operators").await?;

    // The install strategy, as OLM would create it in namespace "operators".
    let install = &spec["install"]["spec"];
    assert_eq!(spec["install"]["strategy"], "deployment");
    let deployment = &install["deployments"][0];
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    assert_eq!(install["permissions"][0]["serviceAccountName"], account);
    assert_eq!(
        install["clusterPermissions"][0]["serviceAccountName"],
        account
    );
    let objects = vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": account}, "rules": install["clusterPermissions"][0]["rules"]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": account},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account},
               "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": "operators"}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": account}, "rules": install["permissions"][0]["rules"]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": account},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
               "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": "operators"}]}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": deployment["name"]}, "spec": deployment["spec"]}),
    ];
    let objects: Vec<(String, Value)> = objects
        .into_iter()
        .map(|o| ("install strategy".to_string(), o))
        .collect();
    manifests::apply_all(&client, &objects, "operators").await?;
    assert_least_privilege(&server, "operators", "operators").await?;
    assert_restricted_pod(&server, "operators", deployment).await?;
    Ok(())
}

#[test]
fn dockerfiles_pass_hadolint_and_run_as_non_root() {
    let hadolint = paths::hadolint();
    let mut dockerfiles: Vec<PathBuf> = ["postgres-operator", "pg-instance", "pg-router"]
        .iter()
        .map(|name| root().join("images").join(name).join("Dockerfile"))
        .collect();
    for dockerfile in &dockerfiles {
        let text = std::fs::read_to_string(dockerfile).unwrap();
        let last_stage = text.rsplit("\nFROM ").next().unwrap();
        let user = last_stage
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{} sets USER", dockerfile.display()));
        let uid: u32 = user
            .split(':')
            .next()
            .unwrap()
            .parse()
            .expect("numeric uid");
        assert_ne!(uid, 0, "{} runs as root", dockerfile.display());
        assert!(
            last_stage.contains("ENTRYPOINT [\""),
            "exec-form entrypoint"
        );
    }
    dockerfiles.push(root().join("bundle/bundle.Dockerfile"));
    for dockerfile in &dockerfiles {
        run_ok(
            &hadolint,
            &["--no-color", &dockerfile.display().to_string()],
            None,
        )
        .unwrap_or_else(|e| panic!("hadolint {}: {e}", dockerfile.display()));
    }
    // The linter is not a rubber stamp: it refuses a planted bad Dockerfile.
    let bad = root().join("xtask/tests/fixtures/bad-dockerfile/Dockerfile");
    let output = run(&hadolint, &["--no-color", &bad.display().to_string()], None).unwrap();
    assert!(!output.status.success());
    let findings = String::from_utf8_lossy(&output.stdout);
    for rule in ["DL3007", "DL3002", "DL3025"] {
        assert!(findings.contains(rule), "{rule} in {findings}");
    }
}

/// The `pg-instance` image ships the backup engine the test bed tests: the very pins file the
/// test bed installs (every line an exact pin), and a launcher per command the instance manager
/// runs (`barman-cloud-*` and the long-lived uploader's `barman-cloud-python`), written as the
/// test bed writes them, at `/usr/local/bin` (`pg-instance --barman-bin`'s default).
#[test]
fn pg_instance_image_installs_the_test_beds_barman_pins_and_launchers() {
    use testbed::object_store::{
        BARMAN_COMMANDS, BARMAN_PYTHON, BARMAN_REQUIREMENTS, BARMAN_REQUIREMENTS_PATH, launchers,
        pinned_version,
    };
    let dockerfile = std::fs::read_to_string(root().join("images/pg-instance/Dockerfile")).unwrap();
    let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        last_stage.contains(&format!(
            "COPY {BARMAN_REQUIREMENTS_PATH} /opt/barman/requirements.txt"
        )),
        "the image copies the test bed's pins file"
    );
    assert!(
        last_stage.contains("pip install --no-cache-dir --no-deps --target /opt/barman/lib")
            && last_stage.contains("-r /opt/barman/requirements.txt"),
        "the image installs exactly those pins"
    );
    assert_eq!(
        std::fs::read_to_string(root().join(BARMAN_REQUIREMENTS_PATH)).unwrap(),
        BARMAN_REQUIREMENTS
    );
    for line in BARMAN_REQUIREMENTS
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
    {
        let (_, version) = line
            .split_once("==")
            .unwrap_or_else(|| panic!("not pinned: {line}"));
        assert!(
            !version.is_empty() && !version.contains(['<', '>', '*', ',']),
            "not an exact pin: {line}"
        );
    }
    for package in ["barman", "boto3", "botocore", "lz4", "psycopg2-binary"] {
        assert!(pinned_version(package).is_some(), "{package} is pinned");
    }
    // The launchers: the Dockerfile's printf formats are the test bed's scripts.
    let unquote = |format: &str| format.replace("'\"'\"'", "'").replace("\\n", "\n");
    let formats: Vec<String> = last_stage
        .split("printf '")
        .skip(1)
        .map(|rest| unquote(&rest[..rest.find("\\n' ").unwrap() + 2]))
        .collect();
    assert_eq!(formats.len(), 2, "{formats:?}");
    let lib = Path::new("/opt/barman/lib");
    let expected = launchers(lib);
    assert_eq!(expected.len(), BARMAN_COMMANDS.len() + 1);
    for (name, script) in expected {
        match BARMAN_COMMANDS.iter().find(|(command, _)| *command == name) {
            Some((command, module)) => {
                assert!(
                    last_stage.contains(&format!("{command}={module}")),
                    "the image has no launcher {command} running {module}"
                );
                assert_eq!(formats[0].replace("%s", module), script, "{command}");
            }
            None => {
                assert_eq!(name, BARMAN_PYTHON);
                assert_eq!(formats[1], script);
                assert!(last_stage.contains(&format!("> /usr/local/bin/{BARMAN_PYTHON}")));
            }
        }
    }
    assert!(last_stage.contains("> \"/usr/local/bin/${launcher%%=*}\""));
}
