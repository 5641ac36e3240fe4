//! `spec.tls.mode: CertManager`: cert-manager `Certificate` objects, signed by the user's
//! Issuer or ClusterIssuer, write the same Secrets the operator CA would (`<cluster>-server-tls`,
//! `<cluster>-replication-tls`); cert-manager renews them and the instance managers reload.
//! The builders are pure; [`ensure`] checks the issuer, applies the Certificates and publishes
//! the CA for applications once cert-manager has written it.

use std::time::Duration;

use api::contract::{self, tls_keys};
use api::postgres_cluster::{IssuerRef, PostgresCluster};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::certificates::server_names;
use super::{Error, Outcome, apply_secret, kube_error, public_ca_secret, text};
use crate::postgres_cluster::status::Problem;
use crate::postgres_cluster::{Context, FIELD_MANAGER};

/// API group of cert-manager.
pub const GROUP: &str = "cert-manager.io";
/// API version of cert-manager's kinds.
pub const VERSION: &str = "v1";

pub(crate) fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, kind))
}

/// Name of the cluster's server `Certificate`.
pub fn server_certificate(cluster: &str) -> String {
    format!("{cluster}-server")
}

/// Name of the cluster's replication client `Certificate`.
pub fn replication_certificate(cluster: &str) -> String {
    format!("{cluster}-replication")
}

/// A Go duration (`<seconds>s`), as cert-manager's `duration` and `renewBefore` take.
pub(crate) fn go_duration(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

/// The two `Certificate` objects of a cluster: the server's (the Service DNS names) and the
/// replication user's client certificate (common name `streaming_replica`). Private keys are
/// rotated with every renewal.
pub fn certificates(
    cluster: &PostgresCluster,
    issuer: &IssuerRef,
    lifetime: Duration,
    renew_before: Duration,
) -> Vec<DynamicObject> {
    let name = cluster.name_any();
    let meta = super::owned_meta;
    let common = |secret: String, usages: [&str; 3]| {
        json!({
            "secretName": secret,
            "duration": go_duration(lifetime),
            "renewBefore": go_duration(renew_before),
            "usages": usages,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"},
            "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": GROUP},
            "secretTemplate": {
                "labels": crate::inherited::labels_with(cluster, crate::postgres_cluster::builders::labels(&name)),
                "annotations": crate::inherited::annotations(cluster).unwrap_or_default(),
            },
        })
    };
    let mut server = common(
        contract::tls_server_secret(&name),
        ["server auth", "digital signature", "key encipherment"],
    );
    server["commonName"] = json!(contract::rw_service(&name));
    server["dnsNames"] = json!(server_names(cluster));
    let mut replication = common(
        contract::tls_replication_secret(&name),
        ["client auth", "digital signature", "key encipherment"],
    );
    replication["commonName"] = json!(contract::REPLICATION_USER);
    [
        (server_certificate(&name), server),
        (replication_certificate(&name), replication),
    ]
    .into_iter()
    .map(|(object_name, spec)| {
        let mut object = DynamicObject::new(&object_name, &resource("Certificate"));
        object.metadata = meta(cluster, object_name);
        object.data = json!({ "spec": spec });
        object
    })
    .collect()
}

/// The Ready condition's message of a `Certificate` when it is not ready.
pub(crate) fn not_ready_message(certificate: &DynamicObject) -> Option<String> {
    let conditions = certificate.data["status"]["conditions"].as_array()?;
    conditions
        .iter()
        .find(|condition| condition["type"] == "Ready" && condition["status"] != "True")
        .map(|condition| {
            condition["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
}

/// Checks the issuer, applies the `Certificate`s, and publishes `ca.crt` once cert-manager
/// wrote the server Secret. Until both Secrets exist the instances cannot start: a problem.
pub async fn ensure(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Result<Outcome, Problem>, Error> {
    let name = cluster.name_any();
    let Some(settings) = &cluster.spec.tls.cert_manager else {
        // The CRD's validation requires certManager with this mode.
        return Ok(Err(Problem {
            reason: "InvalidSpec",
            message: "spec.tls.mode CertManager needs spec.tls.certManager.issuerRef".to_string(),
        }));
    };
    let issuer = &settings.issuer_ref;
    let issuers: Api<DynamicObject> = if issuer.kind == "ClusterIssuer" {
        Api::all_with(ctx.client.clone(), &resource("ClusterIssuer"))
    } else {
        Api::namespaced_with(ctx.client.clone(), namespace, &resource("Issuer"))
    };
    let found = match issuers.get_opt(&issuer.name).await {
        Ok(found) => found,
        // No such resource at all: cert-manager's CRDs are not installed.
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(error) => {
            return Err(kube_error(format!(
                "reading {} {}",
                issuer.kind, issuer.name
            ))(error));
        }
    };
    if found.is_none() {
        let place = if issuer.kind == "ClusterIssuer" {
            String::new()
        } else {
            format!(" in namespace {namespace}")
        };
        let message = format!(
            "cert-manager {} {}{place} not found: create it (is cert-manager installed?) or fix spec.tls.certManager.issuerRef",
            issuer.kind, issuer.name
        );
        super::publish_typed(
            ctx,
            cluster,
            EventType::Warning,
            "IssuerNotFound",
            message.clone(),
        )
        .await;
        return Ok(Err(Problem {
            reason: "IssuerNotFound",
            message,
        }));
    }
    let lifetimes = ctx.settings.tls;
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &resource("Certificate"));
    let mut pending = Vec::new();
    for certificate in certificates(cluster, issuer, lifetimes.leaf, lifetimes.renew_before) {
        let object_name = certificate.name_any();
        let applied = api
            .patch(
                &object_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&certificate),
            )
            .await
            .map_err(kube_error(format!("applying Certificate {object_name}")))?;
        if let Some(message) = not_ready_message(&applied) {
            pending.push(format!("{object_name}: {message}"));
        }
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut missing = Vec::new();
    let mut ca = None;
    for secret_name in [
        contract::tls_server_secret(&name),
        contract::tls_replication_secret(&name),
    ] {
        let stored = secrets
            .get_opt(&secret_name)
            .await
            .map_err(kube_error(format!("reading Secret {secret_name}")))?;
        match stored.filter(super::has_tls_keys) {
            Some(secret) if secret_name == contract::tls_server_secret(&name) => {
                ca = text(&secret, tls_keys::CA);
            }
            Some(_) => {}
            None => missing.push(secret_name),
        }
    }
    if let Some(ca) = ca.filter(|ca| !ca.is_empty()) {
        apply_secret(&secrets, &public_ca_secret(cluster, &ca)).await?;
    }
    if !missing.is_empty() {
        let mut message = format!(
            "waiting for cert-manager ({} {}) to write {}",
            issuer.kind,
            issuer.name,
            missing.join(", ")
        );
        if !pending.is_empty() {
            message.push_str(&format!(" ({})", pending.join("; ")));
        }
        return Ok(Err(Problem {
            reason: "CertificatesPending",
            message,
        }));
    }
    Ok(Ok(Outcome::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::PostgresClusterSpec;

    #[test]
    fn certificates_ask_the_issuer_for_the_service_names_and_the_replication_user() {
        let mut cluster = PostgresCluster::new("db", PostgresClusterSpec::with_image(1, "pg"));
        cluster.metadata.namespace = Some("team-a".into());
        cluster.metadata.uid = Some("uid-1".into());
        let issuer = IssuerRef {
            name: "corp-ca".into(),
            kind: "ClusterIssuer".into(),
        };
        let objects = certificates(
            &cluster,
            &issuer,
            Duration::from_secs(90 * 86400),
            Duration::from_secs(30 * 86400),
        );
        assert_eq!(objects.len(), 2);
        let server = &objects[0];
        assert_eq!(server.name_any(), "db-server");
        assert_eq!(
            server.types.as_ref().unwrap().api_version,
            "cert-manager.io/v1"
        );
        let spec = &server.data["spec"];
        assert_eq!(spec["secretName"], "db-server-tls");
        assert_eq!(spec["commonName"], "db-rw");
        assert_eq!(
            spec["dnsNames"],
            json!(super::super::certificates::server_dns_names("db", "team-a"))
        );
        // The user's names follow the Services'.
        let mut named = cluster.clone();
        named.spec.tls.server_alt_dns_names = vec!["db.example.com".into()];
        let objects = certificates(
            &named,
            &issuer,
            Duration::from_secs(90 * 86400),
            Duration::from_secs(30 * 86400),
        );
        let names = objects[0].data["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(names.last().unwrap(), "db.example.com");
        assert_eq!(
            spec["issuerRef"],
            json!({"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
        assert_eq!(spec["duration"], "7776000s");
        assert_eq!(spec["renewBefore"], "2592000s");
        assert_eq!(spec["privateKey"]["rotationPolicy"], "Always");
        assert!(
            spec["usages"]
                .as_array()
                .unwrap()
                .contains(&json!("server auth"))
        );
        let replication = &objects[1].data["spec"];
        assert_eq!(replication["secretName"], "db-replication-tls");
        assert_eq!(replication["commonName"], "streaming_replica");
        assert!(replication.get("dnsNames").is_none());
        assert!(
            replication["usages"]
                .as_array()
                .unwrap()
                .contains(&json!("client auth"))
        );
        // Owned by the cluster: deleted with it.
        for object in &objects {
            let owners = object.metadata.owner_references.as_ref().unwrap();
            assert_eq!(owners[0].uid, "uid-1");
        }
    }
}
