//! TLS by the operator CA on a real API server: a cluster gets its own CA, a server certificate
//! for its Service names, a `streaming_replica` client certificate and a CA-only Secret for
//! applications; the pods mount them; certificates are renewed before they expire; `Disabled`
//! creates none of it. No key material reaches an event.

mod common;

use std::time::Duration;

use api::contract;
use api::postgres_cluster::TlsMode;
use common::{Env, MANAGER_IMAGE, dns_names, secret_text as text, spec};
use controllers::postgres_cluster::Settings;
use controllers::tls::certificates::{self, Lifetimes};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;

fn subject(pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    pem.parse_x509().unwrap().subject().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_ca_issues_the_clusters_certificates_and_renews_them_before_expiry() {
    // Leaf certificates of 40 s renewed with 30 s left: a renewal every ~10 s.
    let env = Env::start_with_settings(
        "tls-a",
        Settings {
            instance_manager_image: MANAGER_IMAGE.to_string(),
            tls: Lifetimes {
                leaf: Duration::from_secs(40),
                renew_before: Duration::from_secs(30),
                ..Lifetimes::default()
            },
            ..Settings::default()
        },
    )
    .await;
    env.create_cluster("db", spec(2, "postgres:18")).await;

    let private: Secret = env.object(&contract::tls_ca_private_secret("db")).await;
    let public: Secret = env.object(&contract::tls_ca_secret("db")).await;
    let server: Secret = env.object(&contract::tls_server_secret("db")).await;
    let replication: Secret = env.object(&contract::tls_replication_secret("db")).await;

    // Applications get the CA certificate and nothing else.
    let ca_pem = text(&private, "ca.crt");
    assert_eq!(
        public.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
        ["ca.crt"]
    );
    assert_eq!(text(&public, "ca.crt"), ca_pem);
    assert_eq!(subject(&ca_pem), "CN=db.tls-a CA");

    // The server certificate names every Service form; the client certificate is the
    // replication role's.
    assert_eq!(server.type_.as_deref(), Some("kubernetes.io/tls"));
    let names = dns_names(&text(&server, "tls.crt"));
    for name in [
        "db-rw",
        "db-ro.tls-a",
        "db-r.tls-a.svc",
        "db-rw.tls-a.svc.cluster.local",
    ] {
        assert!(names.contains(&name.to_string()), "{name} not in {names:?}");
    }
    assert_eq!(text(&server, "ca.crt"), ca_pem);
    assert_eq!(
        subject(&text(&replication, "tls.crt")),
        "CN=streaming_replica"
    );
    for secret in [&private, &public, &server, &replication] {
        let owners = secret.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners[0].kind, "PostgresCluster", "owned by the cluster");
    }

    // The pods mount the server and replication Secrets and the instance manager knows where.
    let sts: StatefulSet = env.object("db").await;
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let mounted: Vec<String> = pod
        .volumes
        .unwrap()
        .iter()
        .filter_map(|volume| volume.secret.as_ref()?.secret_name.clone())
        .collect();
    assert!(mounted.contains(&"db-server-tls".to_string()));
    assert!(mounted.contains(&"db-replication-tls".to_string()));
    assert!(
        !mounted.contains(&"db-ca-private".to_string()),
        "the CA key never reaches a pod"
    );
    let env_vars = pod.containers[0].env.clone().unwrap();
    assert!(
        env_vars
            .iter()
            .any(|var| var.name == "TLS_DIR"
                && var.value.as_deref() == Some(contract::TLS_MOUNT_PATH))
    );

    // Renewal: a new serial from the same CA, before the old certificate expires.
    let first = certificates::summary(&text(&server, "tls.crt"), "server").unwrap();
    let secrets = env.api::<Secret>();
    let renewed = env
        .eventually("the server certificate is renewed", || {
            let secrets = secrets.clone();
            let first = first.clone();
            async move {
                let secret = secrets.get(&contract::tls_server_secret("db")).await.ok()?;
                let now = certificates::summary(&text(&secret, "tls.crt"), "server").ok()?;
                (now.serial != first.serial).then_some((secret, now))
            }
        })
        .await;
    assert!(
        time::OffsetDateTime::now_utc() < first.not_after,
        "renewed before the old certificate expired"
    );
    assert_eq!(text(&renewed.0, "ca.crt"), ca_pem, "same CA");
    assert_eq!(renewed.1.issuer, "CN=db.tls-a CA");
    let reasons = env.event_reasons("db").await;
    assert!(
        reasons.contains(&"CertificateIssued".to_string()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"CertificateRenewed".to_string()),
        "{reasons:?}"
    );

    // TLS disabled: no Secrets, no mounts.
    let mut plain = spec(1, "postgres:18");
    plain.tls.mode = TlsMode::Disabled;
    env.create_cluster("plain", plain).await;
    let sts: StatefulSet = env.object("plain").await;
    let pod = sts.spec.unwrap().template.spec.unwrap();
    assert!(
        pod.volumes
            .unwrap()
            .iter()
            .all(|volume| !volume.name.starts_with("tls-"))
    );
    assert!(
        secrets
            .get_opt(&contract::tls_server_secret("plain"))
            .await
            .unwrap()
            .is_none()
    );

    // No key material in any event.
    let events = env
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap();
    for event in events.items {
        let note = event.note.unwrap_or_default();
        assert!(
            !note.contains("PRIVATE KEY") && !note.contains("BEGIN"),
            "{note}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_extra_dns_names_are_in_the_server_certificate_and_a_change_reissues_it() {
    let env = Env::start("tls-names").await;
    let mut with_names = spec(1, "postgres:18");
    with_names.tls.server_alt_dns_names = vec!["db.example.com".to_string()];
    env.create_cluster("db", with_names).await;
    let server: Secret = env.object(&contract::tls_server_secret("db")).await;
    let first = certificates::summary(&text(&server, "tls.crt"), "server").unwrap();
    assert!(first.dns_names.contains(&"db-rw.tls-names.svc".to_string()));
    assert_eq!(
        first.dns_names.last().map(String::as_str),
        Some("db.example.com")
    );

    // Another name: issued again (a new serial) with both, from the same CA.
    let clusters = env.api::<api::PostgresCluster>();
    clusters
        .patch(
            "db",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"tls": {
                "serverAltDnsNames": ["db.example.com", "*.db.example.org"]
            }}})),
        )
        .await
        .unwrap();
    let secrets = env.api::<Secret>();
    let reissued = env
        .eventually("the server certificate with the new name", || {
            let secrets = secrets.clone();
            async move {
                let secret = secrets.get(&contract::tls_server_secret("db")).await.ok()?;
                let now = certificates::summary(&text(&secret, "tls.crt"), "server").ok()?;
                now.dns_names
                    .contains(&"*.db.example.org".to_string())
                    .then_some(now)
            }
        })
        .await;
    assert_ne!(reissued.serial, first.serial);
    assert_eq!(reissued.issuer, first.issuer);
    assert!(reissued.dns_names.contains(&"db.example.com".to_string()));
}

/// A key of a Secret, empty when it is not there.
fn optional(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|value| String::from_utf8(value.0.clone()).unwrap())
        .unwrap_or_default()
}

fn condition_reason(cluster: &api::PostgresCluster) -> Option<String> {
    let status = cluster.status.as_ref()?;
    api::common::find_condition(&status.conditions, "CertificateAuthority")
        .map(|condition| condition.reason.clone())
}

/// The cluster's `CertificateAuthority` condition (reason, message), once it has one.
async fn ca_condition(env: &Env) -> (String, String) {
    let cluster = env
        .cluster_where("db", "a CertificateAuthority condition", |cluster| {
            condition_reason(cluster).is_some()
        })
        .await;
    let status = cluster.status.unwrap();
    let condition =
        api::common::find_condition(&status.conditions, "CertificateAuthority").unwrap();
    (condition.reason.clone(), condition.message.clone())
}

/// Settings of the renewal scenarios: certificates of an hour, renewed with 40 s left, the
/// renewed CA signing 6 s after it is published (once the instances loaded it).
fn renewal_settings(resync: Duration) -> Settings {
    Settings {
        instance_manager_image: MANAGER_IMAGE.to_string(),
        resync,
        tls: Lifetimes {
            ca: Duration::from_secs(3600),
            leaf: Duration::from_secs(3600),
            renew_before: Duration::from_secs(40),
            ca_overlap: Duration::from_secs(6),
        },
        ..Settings::default()
    }
}

/// Places a CA of `lifetime` as cluster `db`'s, before the cluster exists (as a user's own
/// CA, or one made ten years ago, would be there).
async fn seed_ca(env: &Env, namespace: &str, lifetime: Duration) -> certificates::Issued {
    let now = time::OffsetDateTime::now_utc();
    let ca = certificates::new_ca("db", namespace, now, lifetime).unwrap();
    let seeded = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(contract::tls_ca_private_secret("db")),
            ..Default::default()
        },
        string_data: Some(
            [
                ("ca.crt".to_string(), ca.certificate_pem.clone()),
                ("ca.key".to_string(), ca.key_pem.clone()),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    env.api::<Secret>()
        .create(&kube::api::PostParams::default(), &seeded)
        .await
        .unwrap();
    ca
}

/// Writes what an instance manager reports once it loaded `bundle` on `pod`.
async fn report_loaded(env: &Env, pod: &str, bundle: &str) {
    let report = serde_json::json!({"role": "primary", "tlsCa": contract::ca_bundle_digest(bundle.as_bytes())});
    env.api::<k8s_openapi::api::core::v1::Pod>()
        .patch(
            pod,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                contract::ANNOTATION_INSTANCE_STATUS: report.to_string()
            }}})),
        )
        .await
        .unwrap();
}

fn certificate_count(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

/// A CA renewal with an overlap: the renewed CA is published next to the old one in every
/// `ca.crt` while the old one still signs; it signs only once the overlap is over and every
/// ready instance reports the bundle loaded; the old one stays trusted until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_ca_is_published_beside_the_old_one_before_it_signs_and_the_old_one_retires() {
    let env = Env::start_with_settings("tls-r", renewal_settings(Duration::from_secs(300))).await;
    // A CA that is due in 30 s (70 s left, renewed with 40 s left).
    let old = seed_ca(&env, "tls-r", Duration::from_secs(70)).await;
    let secrets = env.api::<Secret>();
    env.create_cluster("db", spec(1, "postgres:18")).await;
    let server: Secret = env.object(&contract::tls_server_secret("db")).await;
    let old_summary = certificates::summary(&old.certificate_pem, "old").unwrap();
    let first = certificates::summary(&text(&server, "tls.crt"), "server").unwrap();
    assert!(
        certificates::signed_by(&first, &old_summary),
        "the seeded CA signs"
    );
    // The instance, ready, has not reported any bundle.
    env.play_pod("db", 0, "primary", true).await;

    // Staged: both CAs in every ca.crt, the old one still signs.
    let staged = env
        .eventually("a next CA is published", || {
            let secrets = secrets.clone();
            async move {
                let private = secrets
                    .get(&contract::tls_ca_private_secret("db"))
                    .await
                    .ok()?;
                let next = optional(&private, "next-ca.crt");
                (!next.is_empty()).then_some(next)
            }
        })
        .await;
    let bundle = env
        .eventually("the bundle reaches the leaves' ca.crt", || {
            let secrets = secrets.clone();
            async move {
                let server = secrets.get(&contract::tls_server_secret("db")).await.ok()?;
                let ca = text(&server, "ca.crt");
                (certificate_count(&ca) == 2).then_some(ca)
            }
        })
        .await;
    assert!(
        bundle.starts_with(old.certificate_pem.trim_end()),
        "the signing CA first"
    );
    assert!(bundle.contains(staged.trim_end()));
    let public: Secret = env.object(&contract::tls_ca_secret("db")).await;
    assert_eq!(text(&public, "ca.crt"), bundle, "applications get both");
    let replication: Secret = env.object(&contract::tls_replication_secret("db")).await;
    assert_eq!(text(&replication, "ca.crt"), bundle);
    let server: Secret = env.object(&contract::tls_server_secret("db")).await;
    assert_eq!(
        certificates::summary(&text(&server, "tls.crt"), "server")
            .unwrap()
            .serial,
        first.serial,
        "the same certificate: only its trust changed"
    );

    // The overlap (6 s) is over, but db-0 has not loaded the bundle: the old CA still signs,
    // and the cluster's condition says what the renewal waits for.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (reason, message) = ca_condition(&env).await;
    assert_eq!(reason, "RenewalStaged");
    assert!(
        message.ends_with("waiting for db-0 to load both"),
        "{message}"
    );
    let private: Secret = env.object(&contract::tls_ca_private_secret("db")).await;
    assert_eq!(
        text(&private, "ca.crt"),
        old.certificate_pem,
        "not promoted"
    );
    assert_eq!(optional(&private, "next-ca.crt"), staged);

    // db-0 reports the bundle loaded: the renewed CA signs, the leaves are issued again.
    report_loaded(&env, "db-0", &bundle).await;
    let (server, promoted_bundle) = env
        .eventually("the renewed CA signs the server certificate", || {
            let secrets = secrets.clone();
            let staged = staged.clone();
            async move {
                let server = secrets.get(&contract::tls_server_secret("db")).await.ok()?;
                let summary = certificates::summary(&text(&server, "tls.crt"), "server").ok()?;
                let next = certificates::summary(&staged, "next").ok()?;
                certificates::signed_by(&summary, &next).then(|| {
                    let ca = text(&server, "ca.crt");
                    (server, ca)
                })
            }
        })
        .await;
    assert!(
        promoted_bundle.starts_with(staged.trim_end()),
        "the renewed CA first"
    );
    assert!(
        promoted_bundle.contains(old.certificate_pem.trim_end()),
        "the old CA stays trusted until it expires"
    );
    assert_ne!(
        certificates::summary(&text(&server, "tls.crt"), "server")
            .unwrap()
            .serial,
        first.serial
    );
    let private: Secret = env.object(&contract::tls_ca_private_secret("db")).await;
    assert_eq!(text(&private, "ca.crt"), staged);
    assert_eq!(optional(&private, "next-ca.crt"), "");
    assert_eq!(optional(&private, "previous-ca.crt"), old.certificate_pem);
    env.cluster_where(
        "db",
        "the condition to say the previous CA is trusted",
        |cluster| condition_reason(cluster).as_deref() == Some("PreviousTrusted"),
    )
    .await;

    // The old CA expires (70 s after it was made): out of every ca.crt.
    let retired = env
        .eventually("the expired CA leaves the bundle", || {
            let secrets = secrets.clone();
            async move {
                let public = secrets.get(&contract::tls_ca_secret("db")).await.ok()?;
                let ca = text(&public, "ca.crt");
                (certificate_count(&ca) == 1).then_some(ca)
            }
        })
        .await;
    assert_eq!(retired.trim_end(), staged.trim_end());
    assert!(
        time::OffsetDateTime::now_utc() >= old_summary.not_after,
        "not before it expired"
    );
    env.cluster_where("db", "the condition to say one CA signs", |cluster| {
        condition_reason(cluster).as_deref() == Some("Valid")
    })
    .await;
    let reasons = env.event_reasons("db").await;
    for reason in ["CARenewalStarted", "CARenewed", "CARetired"] {
        assert!(
            reasons.contains(&reason.to_string()),
            "{reason} in {reasons:?}"
        );
    }
    assert!(
        !reasons.contains(&"CARenewalForced".to_string()),
        "{reasons:?}"
    );
}

/// A sharded cluster's CA signs its shards' certificates, so its renewal waits for the shards'
/// instances: the shards publish the parent's bundle, and the parent promotes the renewed CA
/// only once the shard's ready instance reports it loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_clusters_ca_renewal_waits_for_its_shards_instances() {
    // The default resync (5 minutes), longer than the whole test: a step of the parent's
    // renewal reaches its shard through the watch of the private CA Secret, and the parent,
    // which its shard's pods do not wake, looks again while it waits for them.
    let env = Env::start_with_settings("tls-s", renewal_settings(Duration::from_secs(300))).await;
    let old = seed_ca(&env, "tls-s", Duration::from_secs(60)).await;
    let secrets = env.api::<Secret>();
    let mut sharded = spec(1, "postgres:18");
    sharded.sharding = Some(api::postgres_cluster::ShardingSpec {
        shards: 1,
        router: Default::default(),
        table_groups: vec![api::postgres_cluster::TableGroupSpec {
            name: "customers".into(),
            vindex: api::sharding::VindexKind::Hash,
            key_type: api::postgres_cluster::ShardKeyType::Bigint,
        }],
        sharded_tables: Vec::new(),
        reference_tables: Vec::new(),
    });
    env.create_cluster("db", sharded).await;
    let _: StatefulSet = env.object("db-shard-0").await;
    env.play_pod("db-shard-0", 0, "primary", true).await;

    // Staged by the parent; the shard's own Secrets carry the bundle.
    let bundle = env
        .eventually("the shard's server Secret to carry both CAs", || {
            let secrets = secrets.clone();
            async move {
                let server = secrets
                    .get(&contract::tls_server_secret("db-shard-0"))
                    .await
                    .ok()?;
                let ca = text(&server, "ca.crt");
                (certificate_count(&ca) == 2).then_some(ca)
            }
        })
        .await;
    // Past the overlap, the shard's instance has not reported the bundle: not promoted.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let private: Secret = env.object(&contract::tls_ca_private_secret("db")).await;
    assert_eq!(
        text(&private, "ca.crt"),
        old.certificate_pem,
        "not promoted"
    );
    let parent = env
        .cluster_where("db", "the parent's condition", |cluster| {
            condition_reason(cluster).as_deref() == Some("RenewalStaged")
        })
        .await;
    let status = parent.status.unwrap();
    let message = &api::common::find_condition(&status.conditions, "CertificateAuthority")
        .unwrap()
        .message;
    assert!(
        message.ends_with("waiting for db-shard-0-0 to load both"),
        "{message}"
    );

    // The shard's instance loads it: promoted; the shard's certificate is issued again from
    // the renewed CA.
    report_loaded(&env, "db-shard-0-0", &bundle).await;
    let old_summary = certificates::summary(&old.certificate_pem, "old").unwrap();
    env.eventually("the shard's certificate from the renewed CA", || {
        let secrets = secrets.clone();
        let old_summary = old_summary.clone();
        async move {
            let server = secrets
                .get(&contract::tls_server_secret("db-shard-0"))
                .await
                .ok()?;
            let summary = certificates::summary(&text(&server, "tls.crt"), "server").ok()?;
            let private = secrets
                .get(&contract::tls_ca_private_secret("db"))
                .await
                .ok()?;
            let signing = certificates::summary(&text(&private, "ca.crt"), "ca").ok()?;
            (signing.serial != old_summary.serial && certificates::signed_by(&summary, &signing))
                .then_some(())
        }
    })
    .await;
    let reasons = env.event_reasons("db").await;
    assert!(reasons.contains(&"CARenewed".to_string()), "{reasons:?}");

    // Once the old CA (a minute's lifetime) has retired, nothing is due for most of an hour.
    // A managed Secret that goes away then is issued again at once: the Secret watch wakes the
    // cluster that owns it (the resync is 5 minutes, longer than `eventually` waits).
    let server_name = contract::tls_server_secret("db-shard-0");
    let before = env
        .eventually("the old CA to leave the shard's ca.crt", || {
            let secrets = secrets.clone();
            let server_name = server_name.clone();
            async move {
                let server = secrets.get(&server_name).await.ok()?;
                (certificate_count(&text(&server, "ca.crt")) == 1).then_some(server)
            }
        })
        .await;
    // The shard's pass that wrote it has ended (its debounce and writes are well under this).
    tokio::time::sleep(Duration::from_secs(3)).await;
    secrets
        .delete(&server_name, &Default::default())
        .await
        .unwrap();
    let before_serial = certificates::summary(&text(&before, "tls.crt"), "before")
        .unwrap()
        .serial;
    env.eventually("the shard's deleted server Secret issued again", || {
        let secrets = secrets.clone();
        let server_name = server_name.clone();
        let before_serial = before_serial.clone();
        async move {
            let server = secrets.get(&server_name).await.ok()?;
            let summary = certificates::summary(&text(&server, "tls.crt"), "server").ok()?;
            (summary.serial != before_serial).then_some(())
        }
    })
    .await;
}
