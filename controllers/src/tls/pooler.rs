//! TLS of a Pooler's PgBouncer, both ways. To PostgreSQL: PgBouncer verifies the cluster's
//! server certificate against the cluster's CA Secret (`<cluster>-ca`, mounted) and the Service
//! name it connects to (`verify-full`), since the cluster refuses clients without TLS. From
//! clients: PgBouncer serves a certificate of its own (Secret `<pooler>-pooler-tls`) naming the
//! Pooler's Service, issued from the cluster's CA (or by the cluster's cert-manager issuer), so
//! that clients verify it with the same `ca.crt` as the cluster.
//!
//! The builders are pure; [`ensure_certificate`] reads and writes the Secret or `Certificate`.

use std::collections::BTreeMap;
use std::time::Duration;

use api::contract::{self, tls_keys};
use api::pooler::{ClientTlsMode, Pooler};
use api::postgres_cluster::{PostgresCluster, TlsMode};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, SecretVolumeSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::core::DynamicObject;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use time::OffsetDateTime;

use super::certificates::{self, Issued, Leaf};
use super::{Error, kube_error, text};
use crate::postgres_cluster::{Context, FIELD_MANAGER};

/// Where the cluster's CA Secret is mounted in the PgBouncer container.
pub const CA_MOUNT_PATH: &str = "/etc/pgbouncer/tls";
const CA_VOLUME: &str = "cluster-ca";
/// Where the Pooler's own certificate Secret is mounted in the PgBouncer container.
pub const CLIENT_TLS_MOUNT_PATH: &str = "/etc/pgbouncer/client-tls";
const CLIENT_TLS_VOLUME: &str = "client-tls";
/// Annotation on the PgBouncer pod template: a hash of the certificate PgBouncer serves, so that
/// a renewed certificate rolls the pods (PgBouncer loads it at start), as pg-router's does.
pub const ANNOTATION_CERTIFICATE_HASH: &str = "postgres.keiailab.io/tls-certificate-hash";

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

/// The client TLS mode the Pooler runs with: its `spec.pgbouncer.clientTLS`, or by default
/// `Required` when the cluster speaks TLS and `Disabled` when it does not. TLS asked for in front
/// of a cluster without TLS is refused with what to fix (there is no CA to issue from).
pub fn client_tls_mode(
    pooler: &Pooler,
    cluster: &PostgresCluster,
) -> Result<ClientTlsMode, String> {
    let asked = pooler.spec.pgbouncer.client_tls;
    if super::pod::enabled(cluster) {
        return Ok(asked.unwrap_or(ClientTlsMode::Required));
    }
    match asked {
        None | Some(ClientTlsMode::Disabled) => Ok(ClientTlsMode::Disabled),
        Some(mode) => Err(format!(
            "spec.pgbouncer.clientTLS is {mode:?} but PostgresCluster {} has spec.tls.mode Disabled, so there is no CA to issue the Pooler's certificate from: enable the cluster's TLS or set clientTLS to Disabled",
            cluster.name_any()
        )),
    }
}

/// pgbouncer.ini lines for PgBouncer's clients: `client_tls_sslmode` and, with TLS, the mounted
/// certificate and key (TLS 1.2 and 1.3 only).
pub fn client_tls_lines(mode: ClientTlsMode) -> String {
    let sslmode = match mode {
        ClientTlsMode::Required => "require",
        ClientTlsMode::Preferred => "prefer",
        ClientTlsMode::Disabled => return "client_tls_sslmode = disable\n".to_string(),
    };
    format!(
        "client_tls_sslmode = {sslmode}\nclient_tls_cert_file = {CLIENT_TLS_MOUNT_PATH}/{}\nclient_tls_key_file = {CLIENT_TLS_MOUNT_PATH}/{}\nclient_tls_protocols = secure\n",
        tls_keys::CERTIFICATE,
        tls_keys::KEY
    )
}

/// Name of the Secret with the Pooler's server certificate (`<pooler>-pooler-tls`).
pub fn certificate_secret(pooler: &str) -> String {
    format!("{pooler}-pooler-tls")
}

/// Name of the cert-manager `Certificate` of a Pooler (`<pooler>-pooler`).
pub fn certificate_name(pooler: &str) -> String {
    format!("{pooler}-pooler")
}

/// Stable hash of a certificate and the CAs PgBouncer trusts with it (the pod template
/// annotation: a renewal, or a CA renewal's new bundle, rolls the pods).
pub fn certificate_hash(certificate_pem: &str, bundle: &str) -> String {
    format!(
        "{:016x}",
        crate::postgres_cluster::builders::fnv1a64(format!("{certificate_pem}{bundle}").as_bytes())
    )
}

/// Mounts the cluster's CA Secret into PgBouncer's container (optional: a cluster with TLS
/// disabled has none).
pub fn mount_cluster_ca(deployment: &mut Deployment, cluster: &str) {
    mount_secret(
        deployment,
        CA_VOLUME,
        CA_MOUNT_PATH,
        contract::tls_ca_secret(cluster),
        None,
        Some(true),
    );
}

/// Mounts the Pooler's certificate Secret into PgBouncer's container (key readable by the pod's
/// group only) and records the certificate's hash on the pod template, so that a renewal rolls
/// the pods. The metrics exporter, which then must log in over TLS too, verifies PgBouncer
/// against the cluster's CA (mounted by [`mount_cluster_ca`]) and the Pooler's Service name.
pub fn mount_pooler_certificate(deployment: &mut Deployment, pooler: &Pooler, hash: &str) {
    let name = pooler.name_any();
    mount_secret(
        deployment,
        CLIENT_TLS_VOLUME,
        CLIENT_TLS_MOUNT_PATH,
        certificate_secret(&name),
        Some(0o440),
        None,
    );
    let Some(spec) = deployment.spec.as_mut() else {
        return;
    };
    spec.template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_CERTIFICATE_HASH.to_string(), hash.to_string());
    let exporter = spec
        .template
        .spec
        .iter_mut()
        .flat_map(|pod| pod.containers.iter_mut())
        .find(|container| container.name == crate::pooler::builders::EXPORTER_CONTAINER);
    if let Some(exporter) = exporter {
        exporter
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: CA_VOLUME.to_string(),
                mount_path: CA_MOUNT_PATH.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        exporter.args.get_or_insert_with(Vec::new).extend([
            "--tls-ca-file".to_string(),
            format!("{CA_MOUNT_PATH}/{}", tls_keys::CA),
            "--tls-server-name".to_string(),
            format!("{name}.{}.svc", pooler.namespace().unwrap_or_default()),
        ]);
    }
}

fn mount_secret(
    deployment: &mut Deployment,
    volume: &str,
    path: &str,
    secret: String,
    default_mode: Option<i32>,
    optional: Option<bool>,
) {
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
                name: volume.to_string(),
                mount_path: path.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
    }
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: volume.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode,
            optional,
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
}

/// Metadata of an object the Pooler owns (deleted with it), with the Pooler's labels.
fn owned_meta(pooler: &Pooler, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pooler.namespace(),
        labels: Some(crate::pooler::builders::labels(pooler)),
        owner_references: pooler.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    }
}

/// The Secret with the Pooler's certificate issued by the operator's CA, and the CA bundle
/// `bundle` to trust.
pub fn certificate_secret_object(pooler: &Pooler, bundle: &str, issued: &Issued) -> Secret {
    Secret {
        metadata: owned_meta(pooler, certificate_secret(&pooler.name_any())),
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(
            [
                (tls_keys::CERTIFICATE, issued.certificate_pem.as_str()),
                (tls_keys::KEY, issued.key_pem.as_str()),
                (tls_keys::CA, bundle),
            ]
            .into_iter()
            .map(|(key, value)| (key.to_string(), ByteString(value.as_bytes().to_vec())))
            .collect(),
        ),
        ..Secret::default()
    }
}

/// The cert-manager `Certificate` of a Pooler: the cluster's issuer, the Pooler's Service names,
/// the same lifetimes and key policy as the cluster's certificates.
pub fn certificate_object(
    pooler: &Pooler,
    issuer: &api::postgres_cluster::IssuerRef,
    lifetime: Duration,
    renew_before: Duration,
) -> DynamicObject {
    let name = pooler.name_any();
    let object_name = certificate_name(&name);
    let mut object =
        DynamicObject::new(&object_name, &super::cert_manager::resource("Certificate"));
    object.metadata = owned_meta(pooler, object_name);
    object.data = json!({"spec": {
        "secretName": certificate_secret(&name),
        "commonName": name,
        "dnsNames": certificates::pooler_names(pooler),
        "duration": super::cert_manager::go_duration(lifetime),
        "renewBefore": super::cert_manager::go_duration(renew_before),
        "usages": ["server auth", "digital signature", "key encipherment"],
        "privateKey": {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"},
        "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": super::cert_manager::GROUP},
        "secretTemplate": {"labels": crate::pooler::builders::labels(pooler)},
    }});
    object
}

/// Where the Pooler's certificate stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateState {
    /// The Secret holds a usable certificate with this hash; with the operator's CA, the time
    /// until it is due for renewal.
    Ready {
        /// [`certificate_hash`] of the certificate.
        hash: String,
        /// When the reconciler must come back to renew it.
        renew_in: Option<Duration>,
    },
    /// Not there yet (the cluster's CA, or cert-manager's Secret): the message says what.
    Pending(String),
    /// Something the user must fix: the message says what.
    Refused(String),
}

/// Makes sure the Pooler's server certificate exists and is valid for a while, issued as the
/// cluster's own certificates are (its operator CA, or a `Certificate` for its cert-manager
/// issuer).
pub async fn ensure_certificate(
    pooler: &Pooler,
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<CertificateState, Error> {
    match cluster.spec.tls.mode {
        TlsMode::Disabled => Ok(CertificateState::Refused(
            "the cluster's TLS is disabled".to_string(),
        )),
        TlsMode::OperatorCA => ensure_from_operator_ca(pooler, cluster, ctx, namespace).await,
        TlsMode::CertManager => ensure_from_cert_manager(pooler, cluster, ctx, namespace).await,
    }
}

async fn ensure_from_operator_ca(
    pooler: &Pooler,
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<CertificateState, Error> {
    let name = pooler.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let ca_name = contract::tls_ca_private_secret(&cluster.name_any());
    let Some(set) = super::stored_ca(&secrets, &ca_name).await? else {
        return Ok(CertificateState::Pending(format!(
            "waiting for the cluster's CA (Secret {ca_name}) to issue the Pooler's certificate"
        )));
    };
    let bundle = set.bundle();
    let secret_name = certificate_secret(&name);
    let stored = secrets
        .get_opt(&secret_name)
        .await
        .map_err(kube_error(format!("reading Secret {secret_name}")))?;
    if let Some(stored) = &stored {
        let uid = pooler.uid().unwrap_or_default();
        let ours = stored
            .owner_references()
            .iter()
            .any(|owner| owner.uid == uid);
        if !ours {
            return Ok(CertificateState::Refused(format!(
                "Secret {secret_name} exists and does not belong to this Pooler: rename the Pooler or remove the Secret"
            )));
        }
    }
    let lifetimes = ctx.settings.tls;
    let now = OffsetDateTime::now_utc();
    let names = certificates::pooler_names(pooler);
    let stored_pair = stored.as_ref().and_then(super::stored_certificate);
    match (
        super::check_leaf(stored.as_ref(), &set, &names, &lifetimes, now),
        stored_pair,
    ) {
        (super::LeafCheck::Good(left), Some(pair)) => {
            return Ok(CertificateState::Ready {
                hash: certificate_hash(&pair.certificate_pem, &bundle),
                renew_in: Some(left),
            });
        }
        (super::LeafCheck::Trust(left), Some(pair)) => {
            // A CA renewal changed the bundle: the same certificate, the new trust; the hash
            // changes, so PgBouncer's pods roll and read both.
            super::apply_secret(&secrets, &certificate_secret_object(pooler, &bundle, &pair))
                .await?;
            return Ok(CertificateState::Ready {
                hash: certificate_hash(&pair.certificate_pem, &bundle),
                renew_in: Some(left),
            });
        }
        _ => {}
    }
    let leaf = Leaf::Pooler {
        pooler: name.clone(),
        names,
    };
    let issued = certificates::issue(&set.current, &leaf, now, lifetimes.leaf)?;
    super::apply_secret(
        &secrets,
        &certificate_secret_object(pooler, &bundle, &issued),
    )
    .await?;
    let summary = certificates::summary(&issued.certificate_pem, &secret_name)?;
    let (reason, verb) = if stored.is_some() {
        ("CertificateRenewed", "renewed")
    } else {
        ("CertificateIssued", "issued")
    };
    tracing::info!(pooler = %name, namespace, secret = %secret_name, serial = %summary.serial, not_after = %summary.not_after, "certificate {verb}");
    let event = Event {
        type_: EventType::Normal,
        reason: reason.to_string(),
        note: Some(format!(
            "{secret_name}: certificate {verb} (serial {}), valid until {}",
            summary.serial, summary.not_after
        )),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &pooler.object_ref(&())).await {
        tracing::warn!(pooler = %name, %error, "publishing an event failed");
    }
    Ok(CertificateState::Ready {
        hash: certificate_hash(&issued.certificate_pem, &bundle),
        renew_in: Some(certificates::until_renewal(
            summary.not_after,
            now,
            lifetimes.renew_before,
        )),
    })
}

async fn ensure_from_cert_manager(
    pooler: &Pooler,
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<CertificateState, Error> {
    let Some(settings) = &cluster.spec.tls.cert_manager else {
        return Ok(CertificateState::Refused(format!(
            "PostgresCluster {} has spec.tls.mode CertManager without spec.tls.certManager.issuerRef",
            cluster.name_any()
        )));
    };
    let name = pooler.name_any();
    let lifetimes = ctx.settings.tls;
    let certificate = certificate_object(
        pooler,
        &settings.issuer_ref,
        lifetimes.leaf,
        lifetimes.renew_before,
    );
    let object_name = certificate.name_any();
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        namespace,
        &super::cert_manager::resource("Certificate"),
    );
    let applied = api
        .patch(
            &object_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&certificate),
        )
        .await
        .map_err(kube_error(format!("applying Certificate {object_name}")))?;
    let secret_name = certificate_secret(&name);
    let stored = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&secret_name)
        .await
        .map_err(kube_error(format!("reading Secret {secret_name}")))?;
    match stored.filter(super::has_tls_keys).and_then(|secret| {
        let ca = text(&secret, tls_keys::CA).unwrap_or_default();
        Some((text(&secret, tls_keys::CERTIFICATE)?, ca))
    }) {
        Some((pem, ca)) => Ok(CertificateState::Ready {
            hash: certificate_hash(&pem, &ca),
            renew_in: None,
        }),
        None => {
            let mut message = format!(
                "waiting for cert-manager ({} {}) to write Secret {secret_name}",
                settings.issuer_ref.kind, settings.issuer_ref.name
            );
            if let Some(detail) = super::cert_manager::not_ready_message(&applied) {
                message.push_str(&format!(" ({object_name}: {detail})"));
            }
            Ok(CertificateState::Pending(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::PostgresClusterSpec;
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};

    fn pooler(client_tls: Option<ClientTlsMode>) -> Pooler {
        let mut pooler = Pooler::new(
            "pool",
            api::pooler::PoolerSpec {
                cluster: api::common::ClusterReference { name: "db".into() },
                type_: Default::default(),
                instances: 1,
                pgbouncer: api::pooler::PgBouncerSpec {
                    client_tls,
                    ..Default::default()
                },
                resources: None,
                service: None,
            },
        );
        pooler.metadata.namespace = Some("ns".into());
        pooler.metadata.uid = Some("uid-1".into());
        pooler
    }

    #[test]
    fn clients_need_tls_by_default_when_the_cluster_has_it() {
        let mut cluster = PostgresCluster::new("db", PostgresClusterSpec::with_image(1, "pg"));
        assert_eq!(
            client_tls_mode(&pooler(None), &cluster),
            Ok(ClientTlsMode::Required)
        );
        assert_eq!(
            client_tls_mode(&pooler(Some(ClientTlsMode::Preferred)), &cluster),
            Ok(ClientTlsMode::Preferred)
        );
        let lines = client_tls_lines(ClientTlsMode::Required);
        assert!(lines.contains("client_tls_sslmode = require\n"), "{lines}");
        assert!(lines.contains("client_tls_cert_file = /etc/pgbouncer/client-tls/tls.crt\n"));
        assert!(lines.contains("client_tls_key_file = /etc/pgbouncer/client-tls/tls.key\n"));
        assert!(
            client_tls_lines(ClientTlsMode::Preferred).contains("client_tls_sslmode = prefer\n")
        );
        assert_eq!(
            client_tls_lines(ClientTlsMode::Disabled),
            "client_tls_sslmode = disable\n"
        );

        cluster.spec.tls.mode = TlsMode::Disabled;
        assert_eq!(
            client_tls_mode(&pooler(None), &cluster),
            Ok(ClientTlsMode::Disabled)
        );
        let refused =
            client_tls_mode(&pooler(Some(ClientTlsMode::Required)), &cluster).unwrap_err();
        assert!(refused.contains("spec.tls.mode Disabled"), "{refused}");
    }

    #[test]
    fn the_pooler_certificate_names_its_service_and_a_renewal_rolls_the_pods() {
        let ca = certificates::new_ca(
            "db",
            "ns",
            OffsetDateTime::now_utc(),
            Duration::from_secs(86400),
        )
        .unwrap();
        let leaf = Leaf::Pooler {
            pooler: "pool".into(),
            names: certificates::pooler_dns_names("pool", "ns"),
        };
        let issued = certificates::issue(
            &ca,
            &leaf,
            OffsetDateTime::now_utc(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).unwrap();
        let certificate = pem.parse_x509().unwrap();
        let names: Vec<String> = certificate
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "DNSName(pool)",
                "DNSName(pool.ns)",
                "DNSName(pool.ns.svc)",
                "DNSName(pool.ns.svc.cluster.local)"
            ]
        );
        let extended = certificate.extended_key_usage().unwrap().unwrap().value;
        assert!(extended.server_auth && !extended.client_auth);

        let pooler = pooler(None);
        let secret = certificate_secret_object(&pooler, &ca.certificate_pem, &issued);
        assert_eq!(secret.metadata.name.as_deref(), Some("pool-pooler-tls"));
        assert_eq!(secret.metadata.owner_references.unwrap()[0].uid, "uid-1");
        let object = certificate_object(
            &pooler,
            &api::postgres_cluster::IssuerRef {
                name: "corp".into(),
                kind: "Issuer".into(),
            },
            Duration::from_secs(90 * 86400),
            Duration::from_secs(30 * 86400),
        );
        assert_eq!(object.data["spec"]["secretName"], "pool-pooler-tls");
        assert_eq!(object.data["spec"]["dnsNames"][2], "pool.ns.svc");
        assert_eq!(object.data["spec"]["issuerRef"]["name"], "corp");

        let mut deployment = deployment();
        mount_pooler_certificate(&mut deployment, &pooler, "h1");
        let template = deployment.spec.unwrap().template;
        assert_eq!(
            template.metadata.unwrap().annotations.unwrap()[ANNOTATION_CERTIFICATE_HASH],
            "h1"
        );
        let pod = template.spec.unwrap();
        let secret = pod.volumes.unwrap()[0].secret.clone().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("pool-pooler-tls"));
        assert_eq!(secret.default_mode, Some(0o440));
        assert_eq!(
            pod.containers[0].volume_mounts.as_ref().unwrap()[0].mount_path,
            CLIENT_TLS_MOUNT_PATH
        );
    }

    fn deployment() -> Deployment {
        Deployment {
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
        }
    }

    #[test]
    fn pgbouncer_verifies_the_cluster_certificate_unless_tls_is_disabled() {
        let mut cluster = PostgresCluster::new("db", PostgresClusterSpec::with_image(1, "pg"));
        let lines = server_tls_lines(&cluster);
        assert!(lines.contains("server_tls_sslmode = verify-full\n"));
        assert!(lines.contains("server_tls_ca_file = /etc/pgbouncer/tls/ca.crt\n"));
        cluster.spec.tls.mode = TlsMode::Disabled;
        assert_eq!(server_tls_lines(&cluster), "");

        let mut deployment = deployment();
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
