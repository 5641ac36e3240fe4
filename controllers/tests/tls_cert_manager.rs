//! `spec.tls.mode: CertManager` on a real API server with cert-manager's CRDs (from the pinned
//! cert-manager Go module): a missing Issuer is a Degraded condition and a Warning event and no
//! pod is created; with the Issuer the operator applies the two `Certificate`s; once cert-manager
//! (played by the test) wrote their Secrets, the CA is published for applications and the
//! instances are created with the Secrets mounted. The operator CA is not used. A Pooler of the
//! cluster gets its own Certificate from the same issuer, waits for it with a condition, and
//! mounts it for PgBouncer's clients.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use api::contract;
use api::pooler::{PgBouncerSpec, Pooler, PoolerSpec, PoolerType};
use api::postgres_cluster::{CertManagerTls, IssuerRef, PostgresCluster, TlsMode};
use common::{Env, MANAGER_IMAGE, spec};
use controllers::postgres_cluster::Settings;
use controllers::tls::cert_manager;
use controllers::tls::certificates::{self, Leaf};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

/// Release of cert-manager whose CRDs the test installs.
const CERT_MANAGER: &str = "v1.21.2";

/// The Certificate, Issuer and ClusterIssuer CRDs from the Go module (module cache).
fn cert_manager_crds() -> Vec<CustomResourceDefinition> {
    let module = format!("github.com/cert-manager/cert-manager@{CERT_MANAGER}");
    let output = Command::new("go")
        .args(["mod", "download", "-json", &module])
        .output()
        .expect("running go mod download (Go is part of the test bed)");
    assert!(
        output.status.success(),
        "go mod download {module}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let info: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("go mod download -json");
    let dir = PathBuf::from(info["Dir"].as_str().expect("module Dir")).join("deploy/crds");
    ["certificates", "issuers", "clusterissuers"]
        .iter()
        .map(|plural| {
            let path = dir.join(format!("cert-manager.io_{plural}.yaml"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
            serde_yaml::from_str(&text)
                .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
        })
        .collect()
}

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("cert-manager.io", "v1", kind))
}

fn degraded(cluster: &PostgresCluster) -> Option<(String, String)> {
    let status = cluster.status.as_ref()?;
    let condition = api::common::find_condition(&status.conditions, "Degraded")?;
    (condition.status == "True").then(|| (condition.reason.clone(), condition.message.clone()))
}

/// A `kubernetes.io/tls` Secret as cert-manager writes it.
fn issued_secret(name: &str, issued: &certificates::Issued, ca_pem: &str) -> Secret {
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
    }))
    .unwrap();
    secret.data = Some(
        [
            ("tls.crt", issued.certificate_pem.as_str()),
            ("tls.key", issued.key_pem.as_str()),
            ("ca.crt", ca_pem),
        ]
        .iter()
        .map(|(key, value)| (key.to_string(), ByteString(value.as_bytes().to_vec())))
        .collect(),
    );
    secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_certificates_from_the_named_issuer_and_a_clear_condition_without_it() {
    let env = Env::start("tls-cm").await;
    env.server
        .install_crds(&cert_manager_crds())
        .await
        .expect("installing cert-manager's CRDs");

    let mut cluster_spec = spec(1, "postgres:18");
    cluster_spec.tls.mode = TlsMode::CertManager;
    cluster_spec.tls.cert_manager = Some(CertManagerTls {
        issuer_ref: IssuerRef {
            name: "corp-ca".into(),
            kind: "Issuer".into(),
        },
    });
    env.create_cluster("db", cluster_spec).await;

    // No Issuer: Degraded, saying which one and where, with a Warning event; no pods.
    let cluster = env
        .cluster_where("db", "Degraded for the missing Issuer", |cluster| {
            degraded(cluster).is_some_and(|(reason, _)| reason == "IssuerNotFound")
        })
        .await;
    let (_, message) = degraded(&cluster).unwrap();
    assert!(
        message.contains("Issuer corp-ca") && message.contains("namespace tls-cm"),
        "{message}"
    );
    assert!(
        env.event_reasons("db")
            .await
            .contains(&"IssuerNotFound".to_string())
    );
    let statefulsets = env.api::<StatefulSet>();
    assert!(statefulsets.get_opt("db").await.unwrap().is_none());

    // The Issuer appears: the operator asks it for the two certificates.
    let issuers: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tls-cm", &resource("Issuer"));
    let mut issuer = DynamicObject::new("corp-ca", &resource("Issuer"));
    issuer.data = json!({"spec": {"ca": {"secretName": "corp-ca-key-pair"}}});
    issuers
        .create(&PostParams::default(), &issuer)
        .await
        .expect("creating the Issuer");
    let certificates_api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), "tls-cm", &resource("Certificate"));
    let server: DynamicObject = env
        .eventually("the server Certificate", || {
            let api = certificates_api.clone();
            async move {
                api.get_opt(&cert_manager::server_certificate("db"))
                    .await
                    .ok()?
            }
        })
        .await;
    let spec = &server.data["spec"];
    assert_eq!(spec["issuerRef"]["name"], "corp-ca");
    assert_eq!(spec["issuerRef"]["kind"], "Issuer");
    assert_eq!(spec["secretName"], "db-server-tls");
    assert!(
        spec["dnsNames"]
            .as_array()
            .unwrap()
            .contains(&json!("db-rw.tls-cm.svc"))
    );
    let replication = certificates_api
        .get(&cert_manager::replication_certificate("db"))
        .await
        .unwrap();
    assert_eq!(
        replication.data["spec"]["commonName"],
        contract::REPLICATION_USER
    );
    let cluster = env
        .cluster_where("db", "waiting for cert-manager", |cluster| {
            degraded(cluster).is_some_and(|(reason, _)| reason == "CertificatesPending")
        })
        .await;
    assert!(degraded(&cluster).unwrap().1.contains("db-server-tls"));

    // cert-manager (played here) writes the Secrets: the CA is published, the pods come.
    let now = time::OffsetDateTime::now_utc();
    let day = Duration::from_secs(86400);
    let ca = certificates::new_ca("corp", "tls-cm", now, day).unwrap();
    let secrets = env.api::<Secret>();
    for (name, leaf) in [
        (
            contract::tls_server_secret("db"),
            Leaf::Server {
                cluster: "db".into(),
                names: certificates::server_dns_names("db", "tls-cm"),
            },
        ),
        (
            contract::tls_replication_secret("db"),
            Leaf::Client {
                user: contract::REPLICATION_USER.into(),
            },
        ),
    ] {
        let issued = certificates::issue(&ca, &leaf, now, day).unwrap();
        secrets
            .create(
                &PostParams::default(),
                &issued_secret(&name, &issued, &ca.certificate_pem),
            )
            .await
            .unwrap();
    }
    let sts: StatefulSet = env.object("db").await;
    let volumes = sts.spec.unwrap().template.spec.unwrap().volumes.unwrap();
    assert!(volumes.iter().any(|volume| {
        volume
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            == Some("db-server-tls")
    }));
    let public: Secret = env.object(&contract::tls_ca_secret("db")).await;
    assert_eq!(
        public.data.unwrap()["ca.crt"].0,
        ca.certificate_pem.as_bytes()
    );
    assert!(
        secrets
            .get_opt(&contract::tls_ca_private_secret("db"))
            .await
            .unwrap()
            .is_none(),
        "no operator CA in CertManager mode"
    );
    // A Pooler of this cluster asks the same issuer for its own certificate (the Pooler's
    // Service names), waits for it with a condition that names the Secret, and mounts it for
    // PgBouncer's clients once cert-manager wrote it.
    let _poolers = env.start_pooler_controller(Settings {
        instance_manager_image: MANAGER_IMAGE.to_string(),
        ..Settings::default()
    });
    let pooler = Pooler::new(
        "pool",
        PoolerSpec {
            cluster: api::common::ClusterReference { name: "db".into() },
            type_: PoolerType::Rw,
            instances: 1,
            pgbouncer: PgBouncerSpec::default(),
            resources: None,
            service: None,
        },
    );
    env.api::<Pooler>()
        .create(&PostParams::default(), &pooler)
        .await
        .expect("creating the Pooler");
    let requested: DynamicObject = env
        .eventually("the Pooler's Certificate", || {
            let api = certificates_api.clone();
            async move {
                api.get_opt(&controllers::tls::pooler::certificate_name("pool"))
                    .await
                    .ok()?
            }
        })
        .await;
    let spec = &requested.data["spec"];
    assert_eq!(spec["issuerRef"]["name"], "corp-ca");
    assert_eq!(spec["issuerRef"]["kind"], "Issuer");
    assert_eq!(spec["secretName"], "pool-pooler-tls");
    assert!(
        spec["dnsNames"]
            .as_array()
            .unwrap()
            .contains(&json!("pool.tls-cm.svc")),
        "{spec}"
    );
    let waiting = env
        .eventually("the Pooler waiting for cert-manager", || {
            let api = env.api::<Pooler>();
            async move {
                let pooler = api.get_opt("pool").await.ok()??;
                let status = pooler.status?;
                let condition = api::common::find_condition(&status.conditions, "Degraded")?;
                (condition.status == "True" && condition.reason == "CertificatePending")
                    .then(|| condition.message.clone())
            }
        })
        .await;
    assert!(
        waiting.contains("pool-pooler-tls") && waiting.contains("Issuer corp-ca"),
        "{waiting}"
    );
    assert!(
        env.api::<Deployment>()
            .get_opt("pool")
            .await
            .unwrap()
            .is_none(),
        "PgBouncer cannot start with client TLS and no certificate"
    );
    let issued = certificates::issue(
        &ca,
        &Leaf::Pooler {
            pooler: "pool".into(),
            names: certificates::pooler_dns_names("pool", "tls-cm"),
        },
        now,
        day,
    )
    .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &issued_secret("pool-pooler-tls", &issued, &ca.certificate_pem),
        )
        .await
        .unwrap();
    let deployment: Deployment = env.object("pool").await;
    let volumes = deployment
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .volumes
        .unwrap();
    assert!(volumes.iter().any(|volume| {
        volume
            .secret
            .as_ref()
            .is_some_and(|secret| secret.secret_name.as_deref() == Some("pool-pooler-tls"))
    }));
    let config: ConfigMap = env.object("pool").await;
    let ini = &config.data.unwrap()["pgbouncer.ini"];
    assert!(ini.contains("client_tls_sslmode = require\n"), "{ini}");
}
