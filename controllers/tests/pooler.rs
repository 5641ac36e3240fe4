//! The Pooler reconciler on a real API server: owned objects, the per-cluster auth Secret, a
//! spec change that rewrites pgbouncer.ini without touching the pod template, and the Degraded
//! condition for a missing cluster or an invalid parameter; the Pooler's own server certificate
//! (from the cluster's CA, naming its Service) mounted for PgBouncer's clients, required by
//! default, and renewed with a new hash on the pod template (a rollout).

mod common;

use api::pooler::{PgBouncerSpec, Pooler, PoolerSpec, PoolerType};
use common::{Env, MANAGER_IMAGE, dns_names, secret_text, spec};
use controllers::pooler::builders;
use controllers::postgres_cluster::Settings;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

fn start_pooler_controller(env: &Env) -> tokio::task::JoinHandle<()> {
    env.start_pooler_controller(Settings {
        instance_manager_image: MANAGER_IMAGE.to_string(),
        // Short-lived certificates, renewed about every 10 s: the test sees a renewal.
        tls: controllers::tls::certificates::Lifetimes {
            leaf: std::time::Duration::from_secs(40),
            renew_before: std::time::Duration::from_secs(30),
            ..Default::default()
        },
        ..Settings::default()
    })
}

fn degraded(pooler: &Pooler) -> Option<(String, String)> {
    let status = pooler.status.as_ref()?;
    let found = api::common::find_condition(&status.conditions, "Degraded")?;
    Some((found.status.clone(), found.reason.clone()))
}

async fn pooler_where(env: &Env, what: &str, check: impl Fn(&Pooler) -> bool) -> Pooler {
    let api = env.api::<Pooler>();
    env.eventually(what, || {
        let api = api.clone();
        let check = &check;
        async move {
            let pooler = api.get_opt("pool").await.ok()??;
            check(&pooler).then_some(pooler)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_gets_pgbouncer_objects_and_reloads_config_without_a_new_pod_template() {
    let env = Env::without_controller("pool-ns").await;
    let controller = start_pooler_controller(&env);
    let poolers = env.api::<Pooler>();
    let mut pooler = Pooler::new(
        "pool",
        PoolerSpec {
            cluster: api::common::ClusterReference { name: "db".into() },
            type_: PoolerType::Ro,
            instances: 2,
            pgbouncer: PgBouncerSpec::default(),
            resources: None,
            service: None,
        },
    );
    pooler.metadata.namespace = Some(env.namespace.clone());
    poolers
        .create(&PostParams::default(), &pooler)
        .await
        .unwrap();

    // No cluster yet: Degraded with a reason that says so.
    pooler_where(&env, "ClusterNotFound", |p| {
        degraded(p) == Some(("True".into(), "ClusterNotFound".into()))
    })
    .await;

    // The cluster appears (with TLS, the default), and its CA as the cluster's reconciler
    // would have made it: every object is applied.
    let ca = controllers::tls::certificates::new_ca(
        "db",
        &env.namespace,
        time::OffsetDateTime::now_utc(),
        std::time::Duration::from_secs(86400),
    )
    .unwrap();
    let ca_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": api::contract::tls_ca_private_secret("db")},
        "stringData": {"ca.crt": ca.certificate_pem, "ca.key": ca.key_pem},
    }))
    .unwrap();
    env.api::<Secret>()
        .create(&PostParams::default(), &ca_secret)
        .await
        .unwrap();
    let cluster = api::postgres_cluster::PostgresCluster::new("db", spec(1, "example.org/pg:18"));
    env.clusters()
        .create(&PostParams::default(), &cluster)
        .await
        .unwrap();
    let config: ConfigMap = env.object("pool").await;
    let ini = config.data.unwrap()[builders::CONFIG_KEY].clone();
    assert!(ini.contains("host=db-ro.pool-ns.svc"), "{ini}");
    assert!(ini.contains("pool_mode = transaction"), "{ini}");
    let secret: Secret = env.object("db-pooler-auth").await;
    let data = secret.data.unwrap();
    assert_eq!(data["username"].0, b"pgbouncer_auth");
    let service: Service = env.object("pool").await;
    assert_eq!(
        service.spec.unwrap().selector.unwrap()[builders::LABEL_POOLER],
        "pool"
    );
    // TLS for PgBouncer's clients, required by default: the Pooler's own certificate, from the
    // cluster's CA, naming the Pooler's Service, mounted where pgbouncer.ini says.
    assert!(ini.contains("client_tls_sslmode = require\n"), "{ini}");
    assert!(
        ini.contains("client_tls_cert_file = /etc/pgbouncer/client-tls/tls.crt\n"),
        "{ini}"
    );
    let certificate: Secret = env.object("pool-pooler-tls").await;
    let pem = secret_text(&certificate, "tls.crt");
    assert_eq!(
        dns_names(&pem),
        [
            "pool",
            "pool.pool-ns",
            "pool.pool-ns.svc",
            "pool.pool-ns.svc.cluster.local"
        ]
    );
    assert_eq!(secret_text(&certificate, "ca.crt"), ca.certificate_pem);
    assert_eq!(
        certificate.metadata.owner_references.as_ref().unwrap()[0].kind,
        "Pooler"
    );
    let deployment: Deployment = env.object("pool").await;
    let template_before = template_without_certificate_hash(&deployment);
    let certificate_hash = |deployment: &Deployment| {
        deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[controllers::tls::pooler::ANNOTATION_CERTIFICATE_HASH]
            .clone()
    };
    let hash_of_first = certificate_hash(&deployment);
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    assert!(pod.volumes.unwrap().iter().any(|volume| {
        volume
            .secret
            .as_ref()
            .is_some_and(|secret| secret.secret_name.as_deref() == Some("pool-pooler-tls"))
    }));
    let hash_before =
        deployment.metadata.annotations.clone().unwrap()[builders::ANNOTATION_CONFIG_HASH].clone();
    let ready = pooler_where(&env, "status with endpoint", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.endpoint.as_deref() == Some("pool.pool-ns.svc:5432"))
            && degraded(p) == Some(("False".into(), "Reconciled".into()))
    })
    .await;
    assert_eq!(ready.status.unwrap().ready_instances, 0);

    // Exposed through a load balancer: the API server allocates its node port; back to
    // ClusterIP, the port goes.
    let services = env.api::<Service>();
    let exposed = |wanted: &'static str| {
        let services = services.clone();
        async move {
            let spec = services.get("pool").await.ok()?.spec?;
            let node_ports = spec.ports?.iter().filter(|p| p.node_port.is_some()).count();
            let ranges = spec.load_balancer_source_ranges.unwrap_or_default();
            let shape = (spec.type_?, node_ports, ranges);
            let expected = match wanted {
                "LoadBalancer" => (
                    "LoadBalancer".to_string(),
                    1,
                    vec!["10.0.0.0/8".to_string()],
                ),
                _ => ("ClusterIP".to_string(), 0, vec![]),
            };
            (shape == expected).then_some(())
        }
    };
    poolers
        .patch(
            "pool",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"service": {
                "type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]
            }}})),
        )
        .await
        .unwrap();
    env.eventually("the Pooler's Service as a LoadBalancer", || {
        exposed("LoadBalancer")
    })
    .await;
    poolers
        .patch(
            "pool",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"service": null}})),
        )
        .await
        .unwrap();
    env.eventually("the Pooler's Service back to ClusterIP", || {
        exposed("ClusterIP")
    })
    .await;

    // A name clients outside use: the certificate is issued again with it, after the Service's.
    poolers
        .patch(
            "pool",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"pgbouncer": {"serverAltDnsNames": ["pool.example.com"]}}}),
            ),
        )
        .await
        .unwrap();
    let secrets = env.api::<Secret>();
    let names = env
        .eventually("the Pooler's certificate with pool.example.com", || {
            let secrets = secrets.clone();
            async move {
                let secret = secrets.get("pool-pooler-tls").await.ok()?;
                let names = dns_names(&secret_text(&secret, "tls.crt"));
                names
                    .contains(&"pool.example.com".to_string())
                    .then_some(names)
            }
        })
        .await;
    assert_eq!(names.first().map(String::as_str), Some("pool"));
    assert_eq!(names.last().map(String::as_str), Some("pool.example.com"));

    // A pool mode change rewrites pgbouncer.ini; the pod template stays as it was (no rollout).
    poolers
        .patch(
            "pool",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pgbouncer": {"poolMode": "session"}}})),
        )
        .await
        .unwrap();
    let api = env.api::<ConfigMap>();
    env.eventually("pgbouncer.ini in session mode", || {
        let api = api.clone();
        async move {
            let config = api.get("pool").await.ok()?;
            config.data?[builders::CONFIG_KEY]
                .contains("pool_mode = session")
                .then_some(())
        }
    })
    .await;
    // The ConfigMap is written before the Deployment in the same reconcile: wait for the
    // Deployment's new config hash rather than reading it right after the ConfigMap changed.
    let api = env.api::<Deployment>();
    let deployment = env
        .eventually("the config hash follows pgbouncer.ini", || {
            let (api, hash_before) = (api.clone(), &hash_before);
            async move {
                let deployment = api.get("pool").await.ok()?;
                let hash = deployment.metadata.annotations.as_ref()?
                    [builders::ANNOTATION_CONFIG_HASH]
                    .clone();
                (hash != *hash_before).then_some(deployment)
            }
        })
        .await;
    assert_eq!(
        template_without_certificate_hash(&deployment),
        template_before
    );

    // The certificate is renewed before it expires (here within seconds): a new certificate,
    // a new hash on the pod template, so the pods roll onto it.
    let api = env.api::<Deployment>();
    env.eventually("a renewed certificate rolls the pod template", || {
        let api = api.clone();
        let (certificate_hash, hash_of_first) = (&certificate_hash, &hash_of_first);
        async move {
            let deployment = api.get("pool").await.ok()?;
            (certificate_hash(&deployment) != *hash_of_first).then_some(())
        }
    })
    .await;
    let renewed: Secret = env.object("pool-pooler-tls").await;
    assert_ne!(secret_text(&renewed, "tls.crt"), pem);

    // A parameter the operator owns is refused with a condition.
    poolers
        .patch(
            "pool",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pgbouncer": {"parameters": {"auth_type": "trust"}}}})),
        )
        .await
        .unwrap();
    pooler_where(&env, "InvalidSpec", |p| {
        degraded(p) == Some(("True".into(), "InvalidSpec".into()))
    })
    .await;

    // The generated password is in the auth Secret only: not in the Pooler (status
    // included), its ConfigMap, Deployment or Service, nor in any event of the namespace.
    let password = String::from_utf8(data["password"].0.clone()).unwrap();
    assert!(password.len() >= 16);
    let pooler = serde_json::to_string(&poolers.get("pool").await.unwrap()).unwrap();
    let config = serde_json::to_string(&env.object::<ConfigMap>("pool").await).unwrap();
    let deployment = serde_json::to_string(&env.object::<Deployment>("pool").await).unwrap();
    let service = serde_json::to_string(&env.object::<Service>("pool").await).unwrap();
    let events = serde_json::to_string(
        &env.api::<k8s_openapi::api::events::v1::Event>()
            .list(&Default::default())
            .await
            .unwrap()
            .items,
    )
    .unwrap();
    let core_events = serde_json::to_string(
        &env.api::<k8s_openapi::api::core::v1::Event>()
            .list(&Default::default())
            .await
            .unwrap()
            .items,
    )
    .unwrap();
    assert!(events.contains("InvalidSpec") || core_events.contains("InvalidSpec"));
    for (what, text) in [
        ("Pooler", &pooler),
        ("ConfigMap", &config),
        ("Deployment", &deployment),
        ("Service", &service),
        ("events", &events),
        ("core events", &core_events),
    ] {
        assert!(
            !text.contains(&password),
            "the auth password is in the {what}"
        );
    }
    controller.abort();
}

/// The pod template without the certificate hash (which changes with each renewal).
fn template_without_certificate_hash(deployment: &Deployment) -> serde_json::Value {
    let mut template = serde_json::to_value(&deployment.spec.as_ref().unwrap().template).unwrap();
    if let Some(annotations) = template["metadata"]["annotations"].as_object_mut() {
        annotations.remove(controllers::tls::pooler::ANNOTATION_CERTIFICATE_HASH);
    }
    template
}
