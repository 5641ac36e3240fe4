//! TLS of a PostgresCluster: the Secrets PostgreSQL's certificates live in, issued by the
//! operator's own CA (one per cluster) or by cert-manager, renewed before they expire.
//!
//! Decide, then act: [`certificates`], [`cert_manager`]'s builders and [`pod`] are pure; this
//! file reads and writes the Secrets. The instance manager picks renewed files up from the
//! mounted Secrets and reloads PostgreSQL (no restart).

pub mod cert_manager;
pub mod certificates;
pub mod pod;
pub mod pooler;

use std::time::Duration;

use api::contract::{self, tls_keys};
use api::postgres_cluster::{PostgresCluster, TlsMode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use time::OffsetDateTime;

use crate::postgres_cluster::status::Problem;
use crate::postgres_cluster::{Context, FIELD_MANAGER};
use certificates::{CertificateError, Issued, Leaf, Lifetimes};

/// Errors of the TLS stage of a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{what} failed: {source}")]
    Kube {
        /// What the operator was doing, on which object.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A certificate could not be made.
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    /// A shard of a sharded cluster is issued from its parent's CA, which is not there yet
    /// (the parent's reconciler creates it first; retried).
    #[error("the CA of sharded cluster {parent} (Secret {secret}) does not exist yet")]
    ParentCaMissing {
        /// The sharded (parent) PostgresCluster.
        parent: String,
        /// The Secret that holds its CA.
        secret: String,
    },
}

pub(crate) fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// What the TLS stage found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Time until the earliest certificate is due for renewal (the reconciler comes back then).
    pub renew_in: Option<Duration>,
}

/// Makes sure the cluster's TLS Secrets exist and are valid for a while: the operator CA and
/// its certificates, or cert-manager `Certificate`s. A problem the user must fix (a missing
/// issuer) comes back as `Err` inside `Ok`.
pub async fn ensure(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Result<Outcome, Problem>, Error> {
    match cluster.spec.tls.mode {
        TlsMode::Disabled => Ok(Ok(Outcome::default())),
        TlsMode::OperatorCA => ensure_operator_ca(cluster, ctx, namespace).await.map(Ok),
        TlsMode::CertManager => cert_manager::ensure(cluster, ctx, namespace).await,
    }
}

/// Metadata of a Secret the cluster owns (garbage-collected with it).
pub(crate) fn owned_meta(cluster: &PostgresCluster, name: String) -> ObjectMeta {
    crate::postgres_cluster::builders::owned_meta(cluster, name)
}

/// A Secret of `type_` with `data` (PEM texts), owned by the cluster.
pub(crate) fn secret(
    cluster: &PostgresCluster,
    name: String,
    type_: &str,
    data: &[(&str, &str)],
) -> Secret {
    Secret {
        metadata: owned_meta(cluster, name),
        type_: Some(type_.to_string()),
        data: Some(
            data.iter()
                .map(|(key, value)| (key.to_string(), ByteString(value.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The text of key `key` of a Secret.
pub(crate) fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Server-side applies a Secret (its data never reaches a log: errors name the Secret only).
pub(crate) async fn apply_secret(api: &Api<Secret>, secret: &Secret) -> Result<(), Error> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(secret),
    )
    .await
    .map_err(kube_error(format!("applying Secret {name}")))?;
    Ok(())
}

/// The public CA Secret applications mount for `sslmode=verify-full` (`ca.crt` only).
pub(crate) fn public_ca_secret(cluster: &PostgresCluster, ca_pem: &str) -> Secret {
    secret(
        cluster,
        contract::tls_ca_secret(&cluster.name_any()),
        "Opaque",
        &[(tls_keys::CA, ca_pem)],
    )
}

pub(crate) async fn publish(ctx: &Context, cluster: &PostgresCluster, reason: &str, note: String) {
    publish_typed(ctx, cluster, EventType::Normal, reason, note).await;
}

pub(crate) async fn publish_typed(
    ctx: &Context,
    cluster: &PostgresCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        tracing::warn!(cluster = %cluster.name_any(), %error, "publishing an event failed");
    }
}

/// The sharded PostgresCluster a shard's child cluster belongs to (its controlling owner of
/// kind PostgresCluster), whose CA the shard's certificates come from.
///
/// Why one CA for all the shards of a sharded cluster: a ShardSplitJob's subscription on the
/// target shard connects to the source shard with `sslmode=verify-full`, and the target's
/// PostgreSQL can only read CA files in its own pods; with one CA, the CA every shard has
/// mounted verifies each of its siblings. The shards are one trust domain already (they share
/// the parent's superuser password), so a shard's replication certificate being valid at a
/// sibling gives nothing away that the password does not.
pub fn sharded_parent(cluster: &PostgresCluster) -> Option<String> {
    cluster
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| {
            owner.controller == Some(true)
                && owner.kind == "PostgresCluster"
                && owner.api_version == PostgresCluster::api_version(&())
        })
        .map(|owner| owner.name.clone())
}

/// The CA (certificate and key) kept in Secret `secret_name`, when it is there and complete.
pub(crate) async fn stored_ca(
    secrets: &Api<Secret>,
    secret_name: &str,
) -> Result<Option<Issued>, Error> {
    Ok(secrets
        .get_opt(secret_name)
        .await
        .map_err(kube_error(format!("reading Secret {secret_name}")))?
        .and_then(|secret| {
            Some(Issued {
                certificate_pem: text(&secret, tls_keys::CA)?,
                key_pem: text(&secret, tls_keys::CA_KEY)?,
            })
        }))
}

/// The CA of a shard: its sharded parent's, as the parent's reconciler keeps it (renewed there,
/// never here, so that two shards never race to replace it).
async fn parent_ca(secrets: &Api<Secret>, parent: &str) -> Result<Issued, Error> {
    let secret_name = contract::tls_ca_private_secret(parent);
    stored_ca(secrets, &secret_name)
        .await?
        .ok_or_else(|| Error::ParentCaMissing {
            parent: parent.to_string(),
            secret: secret_name,
        })
}

/// Deletes the CA a shard made for itself before shards shared their parent's (its key would
/// stay in the namespace, trusted by nothing).
async fn forget_own_ca(secrets: &Api<Secret>, cluster: &str) -> Result<(), Error> {
    let name = contract::tls_ca_private_secret(cluster);
    match secrets.delete(&name, &Default::default()).await {
        Ok(_) => {
            tracing::info!(cluster, secret = %name, "the shard's own CA deleted: it uses its sharded cluster's");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(kube_error(format!("deleting Secret {name}"))(error)),
    }
}

/// The operator's CA of the cluster: the stored one while it has more than `renew_before` left,
/// otherwise a new one (its certificates are then re-issued, since they no longer match).
async fn operator_ca(
    cluster: &PostgresCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<Issued, Error> {
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_default();
    let secret_name = contract::tls_ca_private_secret(&name);
    let stored = stored_ca(secrets, &secret_name).await?;
    let usable = stored.filter(|ca| {
        certificates::summary(&ca.certificate_pem, "the CA").is_ok_and(|summary| {
            !certificates::due_for_renewal(summary.not_after, now, lifetimes.renew_before)
        })
    });
    if let Some(ca) = usable {
        return Ok(ca);
    }
    let ca = certificates::new_ca(&name, &namespace, now, lifetimes.ca)?;
    apply_secret(
        secrets,
        &secret(
            cluster,
            secret_name.clone(),
            "Opaque",
            &[
                (tls_keys::CA, &ca.certificate_pem),
                (tls_keys::CA_KEY, &ca.key_pem),
            ],
        ),
    )
    .await?;
    let summary = certificates::summary(&ca.certificate_pem, "the CA")?;
    tracing::info!(cluster = %name, namespace, secret = %secret_name, serial = %summary.serial, "operator CA created");
    publish(
        ctx,
        cluster,
        "CACreated",
        format!(
            "CA {} (serial {}) created, valid until {}",
            summary.issuer, summary.serial, summary.not_after
        ),
    )
    .await;
    Ok(ca)
}

/// Whether a stored leaf Secret can stay: complete, signed by `ca`, and not due for renewal.
/// Returns the time until it is due when it can.
pub(crate) fn still_good(
    stored: Option<&Secret>,
    ca: &Issued,
    names: &[String],
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Option<Duration> {
    let stored = stored?;
    text(stored, tls_keys::KEY)?;
    if text(stored, tls_keys::CA)? != ca.certificate_pem {
        return None;
    }
    let summary = certificates::summary(&text(stored, tls_keys::CERTIFICATE)?, "stored").ok()?;
    // Names added or removed (`tls.serverAltDnsNames`): issued again.
    if summary.dns_names != names {
        return None;
    }
    let left = certificates::until_renewal(summary.not_after, now, lifetimes.renew_before);
    (!left.is_zero()).then_some(left)
}

async fn ensure_operator_ca(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Outcome, Error> {
    let name = cluster.name_any();
    let lifetimes = ctx.settings.tls;
    let now = OffsetDateTime::now_utc();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let ca = match sharded_parent(cluster) {
        Some(parent) => {
            forget_own_ca(&secrets, &name).await?;
            parent_ca(&secrets, &parent).await?
        }
        None => operator_ca(cluster, ctx, &secrets, &lifetimes, now).await?,
    };
    apply_secret(&secrets, &public_ca_secret(cluster, &ca.certificate_pem)).await?;
    let mut renew_in = certificates::summary(&ca.certificate_pem, "the CA")
        .map(|summary| certificates::until_renewal(summary.not_after, now, lifetimes.renew_before))
        .ok();
    let leaves = [
        (
            contract::tls_server_secret(&name),
            Leaf::Server {
                cluster: name.clone(),
                names: certificates::server_names(cluster),
            },
        ),
        (
            contract::tls_replication_secret(&name),
            Leaf::Client {
                user: contract::REPLICATION_USER.to_string(),
            },
        ),
    ];
    for (secret_name, leaf) in leaves {
        let stored = secrets
            .get_opt(&secret_name)
            .await
            .map_err(kube_error(format!("reading Secret {secret_name}")))?;
        let names = match &leaf {
            Leaf::Server { names, .. } => names.clone(),
            _ => Vec::new(),
        };
        if let Some(left) = still_good(stored.as_ref(), &ca, &names, &lifetimes, now) {
            renew_in = Some(renew_in.map_or(left, |earliest| earliest.min(left)));
            continue;
        }
        let issued = certificates::issue(&ca, &leaf, now, lifetimes.leaf)?;
        apply_secret(
            &secrets,
            &secret(
                cluster,
                secret_name.clone(),
                "kubernetes.io/tls",
                &[
                    (tls_keys::CERTIFICATE, &issued.certificate_pem),
                    (tls_keys::KEY, &issued.key_pem),
                    (tls_keys::CA, &ca.certificate_pem),
                ],
            ),
        )
        .await?;
        let summary = certificates::summary(&issued.certificate_pem, &secret_name)?;
        let (reason, verb) = if stored.is_some() {
            ("CertificateRenewed", "renewed")
        } else {
            ("CertificateIssued", "issued")
        };
        tracing::info!(cluster = %name, namespace, secret = %secret_name, serial = %summary.serial, not_after = %summary.not_after, "certificate {verb}");
        publish(
            ctx,
            cluster,
            reason,
            format!(
                "{secret_name}: certificate {verb} (serial {}), valid until {}",
                summary.serial, summary.not_after
            ),
        )
        .await;
        let left = certificates::until_renewal(summary.not_after, now, lifetimes.renew_before);
        renew_in = Some(renew_in.map_or(left, |earliest| earliest.min(left)));
    }
    Ok(Outcome { renew_in })
}

/// Whether a Secret somebody else wrote (cert-manager) has a certificate and a key.
pub(crate) fn has_tls_keys(secret: &Secret) -> bool {
    [tls_keys::CERTIFICATE, tls_keys::KEY]
        .iter()
        .all(|key| text(secret, key).is_some_and(|value| !value.is_empty()))
}
