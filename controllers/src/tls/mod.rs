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
pub mod rotation;

use std::time::Duration;

use api::contract::{self, tls_keys};
use api::postgres_cluster::{PostgresCluster, TlsMode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use time::OffsetDateTime;

use crate::postgres_cluster::instances::InstanceView;
use crate::postgres_cluster::status::Problem;
use crate::postgres_cluster::{Context, FIELD_MANAGER};
use certificates::{CertificateError, Issued, Leaf, Lifetimes};
use rotation::{CaSet, Step};

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
    /// The `CertificateAuthority` condition (operator CA).
    pub certificate_authority: Option<rotation::Condition>,
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

/// The certificate and key a stored leaf Secret holds, when it has both.
pub(crate) fn stored_certificate(secret: &Secret) -> Option<Issued> {
    Some(Issued {
        certificate_pem: text(secret, tls_keys::CERTIFICATE)?,
        key_pem: text(secret, tls_keys::KEY)?,
    })
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

/// The CAs kept in the private CA Secret `secret_name`, when its signing CA is there.
pub(crate) async fn stored_ca(
    secrets: &Api<Secret>,
    secret_name: &str,
) -> Result<Option<CaSet>, Error> {
    Ok(secrets
        .get_opt(secret_name)
        .await
        .map_err(kube_error(format!("reading Secret {secret_name}")))?
        .and_then(|secret| CaSet::from_secret(&secret)))
}

/// The CAs of a shard: its sharded parent's, as the parent's reconciler keeps them (renewed
/// there, never here, so that two shards never race to replace them).
async fn parent_ca(secrets: &Api<Secret>, parent: &str) -> Result<CaSet, Error> {
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

/// The ready instances that trust the cluster's CAs and have not loaded `bundle` yet: the
/// cluster's own, and for a sharded cluster its shards' (they are issued from its CA).
async fn instances_pending(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
    bundle: &str,
) -> Result<rotation::Pending, Error> {
    let name = cluster.name_any();
    let mut clusters = vec![name.clone()];
    if cluster.spec.sharding.is_some() {
        let all = Api::<PostgresCluster>::namespaced(ctx.client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .map_err(kube_error(format!(
                "listing the PostgresClusters of {namespace}"
            )))?;
        clusters.extend(
            all.items
                .iter()
                .filter(|child| sharded_parent(child).as_deref() == Some(name.as_str()))
                .map(ResourceExt::name_any),
        );
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let mut views = Vec::new();
    for member in clusters {
        let selector = crate::postgres_cluster::builders::instance_selector_string(&member);
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_error(format!("listing pods of {member}")))?;
        views.extend(
            listed
                .items
                .iter()
                .map(|pod| InstanceView::from_pod(&member, pod)),
        );
    }
    Ok(rotation::pending(&views, bundle))
}

/// The operator's CAs of the cluster, after this pass's step of their renewal
/// ([`rotation::plan`]), and when the reconciler must come back for the next step.
async fn operator_ca(
    cluster: &PostgresCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<(CaSet, Option<Duration>, rotation::Condition), Error> {
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_default();
    let secret_name = contract::tls_ca_private_secret(&name);
    ctx.metrics.track_ca_renewals(&namespace, &name);
    let stored = stored_ca(secrets, &secret_name).await?;
    let pending = match &stored {
        Some(set) if set.next.is_some() => {
            instances_pending(cluster, ctx, &namespace, &set.bundle()).await?
        }
        _ => Vec::new(),
    };
    let step = rotation::plan(stored.as_ref(), now, lifetimes, &pending);
    let new_ca = || certificates::new_ca(&name, &namespace, now, lifetimes.ca);
    let set = match (&step, stored) {
        (Step::Keep(back), Some(set)) => {
            let condition = rotation::condition(&set, &pending, lifetimes);
            return Ok((set, *back, condition));
        }
        (Step::Stage, Some(set)) => rotation::apply(&step, &set, Some(new_ca()?)),
        (Step::Promote { .. } | Step::Retire, Some(set)) => rotation::apply(&step, &set, None),
        (Step::Create, _) | (_, None) => CaSet::new(new_ca()?),
    };
    let data = set.secret_data();
    let data: Vec<(&str, &str)> = data
        .iter()
        .map(|(key, value)| (*key, value.as_str()))
        .collect();
    apply_secret(
        secrets,
        &secret(cluster, secret_name.clone(), "Opaque", &data),
    )
    .await?;
    let describe = certificates::describe_ca;
    let current = describe(&set.current.certificate_pem)?;
    let (type_, reason, note) = match &step {
        Step::Stage => {
            let next = describe(
                &set.next
                    .as_ref()
                    .map(|ca| ca.certificate_pem.clone())
                    .unwrap_or_default(),
            )?;
            (
                EventType::Normal,
                "CARenewalStarted",
                format!(
                    "CA {next} published next to CA {current} in every ca.crt; it signs the certificates after {} s once every instance has loaded both",
                    lifetimes.effective_overlap().as_secs()
                ),
            )
        }
        Step::Promote { forced } => {
            let previous = describe(set.previous.as_deref().unwrap_or_default())?;
            if *forced {
                ctx.metrics.observe_ca_renewal_forced(&namespace, &name);
                (
                    EventType::Warning,
                    "CARenewalForced",
                    format!(
                        "CA {current} signs the certificates from now on, before instances {} reported loading it: the previous CA {previous} expires soon",
                        pending.join(", ")
                    ),
                )
            } else {
                (
                    EventType::Normal,
                    "CARenewed",
                    format!(
                        "CA {current} signs the certificates from now on; the previous CA {previous} stays trusted until it expires"
                    ),
                )
            }
        }
        Step::Retire => (
            EventType::Normal,
            "CARetired",
            format!("the previous CA expired and left every ca.crt; CA {current} remains"),
        ),
        Step::Create | Step::Keep(_) => (
            EventType::Normal,
            "CACreated",
            format!("CA {current} created"),
        ),
    };
    tracing::info!(cluster = %name, namespace, secret = %secret_name, reason, "{note}");
    publish_typed(ctx, cluster, type_, reason, note).await;
    // Back at once for the leaves and the next step's time.
    let condition = rotation::condition(&set, &Vec::new(), lifetimes);
    Ok((set, Some(Duration::from_secs(1)), condition))
}

/// Where a stored leaf Secret stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LeafCheck {
    /// Complete, signed by the signing CA, the right names, not due: due in this long.
    Good(Duration),
    /// Good, but its `ca.crt` is not the current bundle: rewritten, not reissued.
    Trust(Duration),
    /// Missing, incomplete, from another CA, other names, or due: issued again.
    Reissue,
}

/// Checks a stored leaf Secret against the CAs `set`.
pub(crate) fn check_leaf(
    stored: Option<&Secret>,
    set: &CaSet,
    names: &[String],
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> LeafCheck {
    let check = || {
        let stored = stored?;
        text(stored, tls_keys::KEY)?;
        let summary =
            certificates::summary(&text(stored, tls_keys::CERTIFICATE)?, "stored").ok()?;
        let ca = certificates::summary(&set.current.certificate_pem, "the CA").ok()?;
        if !certificates::signed_by(&summary, &ca) {
            return None;
        }
        // Names added or removed (`tls.serverAltDnsNames`): issued again.
        if summary.dns_names != names {
            return None;
        }
        let left = certificates::until_renewal(summary.not_after, now, lifetimes.renew_before);
        if left.is_zero() {
            return None;
        }
        Some(if text(stored, tls_keys::CA)? == set.bundle() {
            LeafCheck::Good(left)
        } else {
            LeafCheck::Trust(left)
        })
    };
    check().unwrap_or(LeafCheck::Reissue)
}

fn earliest(renew_in: &mut Option<Duration>, left: Duration) {
    *renew_in = Some(renew_in.map_or(left, |earliest| earliest.min(left)));
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
    let (set, mut renew_in, condition) = match sharded_parent(cluster) {
        Some(parent) => {
            forget_own_ca(&secrets, &name).await?;
            let set = parent_ca(&secrets, &parent).await?;
            // The parent renews; what it waits for is on the parent's condition.
            let condition = rotation::condition(&set, &Vec::new(), &lifetimes);
            (set, None, condition)
        }
        None => operator_ca(cluster, ctx, &secrets, &lifetimes, now).await?,
    };
    let bundle = set.bundle();
    apply_secret(&secrets, &public_ca_secret(cluster, &bundle)).await?;
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
        match check_leaf(stored.as_ref(), &set, &names, &lifetimes, now) {
            LeafCheck::Good(left) => {
                earliest(&mut renew_in, left);
                continue;
            }
            LeafCheck::Trust(left) => {
                if let Some(pair) = stored.as_ref().and_then(stored_certificate) {
                    apply_secret(
                        &secrets,
                        &leaf_secret(
                            cluster,
                            &secret_name,
                            &pair.certificate_pem,
                            &pair.key_pem,
                            &bundle,
                        ),
                    )
                    .await?;
                    tracing::info!(cluster = %name, namespace, secret = %secret_name, "ca.crt brought to the CA bundle");
                }
                earliest(&mut renew_in, left);
                continue;
            }
            LeafCheck::Reissue => {}
        }
        let issued = certificates::issue(&set.current, &leaf, now, lifetimes.leaf)?;
        apply_secret(
            &secrets,
            &leaf_secret(
                cluster,
                &secret_name,
                &issued.certificate_pem,
                &issued.key_pem,
                &bundle,
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
        earliest(
            &mut renew_in,
            certificates::until_renewal(summary.not_after, now, lifetimes.renew_before),
        );
    }
    Ok(Outcome {
        renew_in,
        certificate_authority: Some(condition),
    })
}

/// A leaf certificate's Secret: the certificate, its key and the CA bundle to trust.
fn leaf_secret(
    cluster: &PostgresCluster,
    secret_name: &str,
    certificate: &str,
    key: &str,
    bundle: &str,
) -> Secret {
    secret(
        cluster,
        secret_name.to_string(),
        "kubernetes.io/tls",
        &[
            (tls_keys::CERTIFICATE, certificate),
            (tls_keys::KEY, key),
            (tls_keys::CA, bundle),
        ],
    )
}

/// Whether a Secret somebody else wrote (cert-manager) has a certificate and a key.
pub(crate) fn has_tls_keys(secret: &Secret) -> bool {
    [tls_keys::CERTIFICATE, tls_keys::KEY]
        .iter()
        .all(|key| text(secret, key).is_some_and(|value| !value.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_secret_of(certificate: &Issued, bundle: &str) -> Secret {
        Secret {
            data: Some(
                [
                    (tls_keys::CERTIFICATE, certificate.certificate_pem.as_str()),
                    (tls_keys::KEY, certificate.key_pem.as_str()),
                    (tls_keys::CA, bundle),
                ]
                .into_iter()
                .map(|(key, value)| (key.to_string(), ByteString(value.as_bytes().to_vec())))
                .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn a_leaf_is_kept_while_the_signing_ca_signed_it_and_only_its_trust_follows_the_bundle() {
        let now = OffsetDateTime::now_utc();
        let lifetimes = Lifetimes::default();
        let year = Duration::from_secs(365 * 86400);
        let old = certificates::new_ca("db", "ns", now, year).unwrap();
        let new = certificates::new_ca("db", "ns", now, year).unwrap();
        let client = Leaf::Client {
            user: "streaming_replica".into(),
        };
        let from_old = certificates::issue(&old, &client, now, lifetimes.leaf).unwrap();
        let from_new = certificates::issue(&new, &client, now, lifetimes.leaf).unwrap();
        let staged = CaSet {
            current: old.clone(),
            next: Some(new.clone()),
            previous: None,
        };
        let check =
            |set: &CaSet, secret: &Secret| check_leaf(Some(secret), set, &[], &lifetimes, now);
        // Staged: the old CA still signs; a Secret with the old ca.crt gets the bundle only.
        let with_old_trust = leaf_secret_of(&from_old, &old.certificate_pem);
        assert!(matches!(
            check(&staged, &with_old_trust),
            LeafCheck::Trust(_)
        ));
        let with_bundle = leaf_secret_of(&from_old, &staged.bundle());
        assert!(matches!(check(&staged, &with_bundle), LeafCheck::Good(_)));
        // Promoted: the same subject name, another key: the old CA's leaf is issued again.
        let promoted = rotation::apply(&Step::Promote { forced: false }, &staged, None);
        let stale = leaf_secret_of(&from_old, &promoted.bundle());
        assert_eq!(check(&promoted, &stale), LeafCheck::Reissue);
        let fresh = leaf_secret_of(&from_new, &promoted.bundle());
        assert!(matches!(check(&promoted, &fresh), LeafCheck::Good(_)));
        // Nothing stored, or a Secret without a key: issued.
        assert_eq!(
            check_leaf(None, &promoted, &[], &lifetimes, now),
            LeafCheck::Reissue
        );
    }
}
