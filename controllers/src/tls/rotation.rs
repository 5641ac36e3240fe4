//! Renewal of a cluster's operator CA with an overlap (pure).
//!
//! Replacing a CA outright breaks every party that still trusts only the old one: a replica that
//! has not read the new `ca.crt` refuses its primary's new server certificate, the primary
//! refuses the replica's old client certificate, and an application that mounted `<cluster>-ca`
//! refuses the cluster until it reads the Secret again. So a renewal goes in three steps, the
//! way cert-manager's trust-manager users do it by hand:
//!
//! 1. **Stage**: with `renew_before` left on the CA, a next CA is made and published next to the
//!    current one in every `ca.crt` (the bundle); the current CA still signs.
//! 2. **Promote**: once the bundle has been out for the overlap and every ready instance reports
//!    it loaded (`tlsCa` of its status annotation), the next CA signs: the leaves are issued
//!    again from it. Everybody trusts both already, so whichever side reloads first, the other
//!    accepts it. A CA with a quarter of `renew_before` left is promoted regardless: an expired
//!    CA breaks everything, a late reader only itself.
//! 3. **Retire**: the replaced CA stays in the bundle until it expires, for whoever still
//!    presents a certificate it signed.

use std::time::Duration;

use api::contract::tls_keys;
use k8s_openapi::api::core::v1::Secret;
use time::OffsetDateTime;

use super::certificates::{self, Issued, Lifetimes};
use super::text;

/// The CAs of a cluster as its private CA Secret keeps them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaSet {
    /// The CA that signs.
    pub current: Issued,
    /// A renewed CA, published but not signing yet.
    pub next: Option<Issued>,
    /// The certificate of the CA the last renewal replaced, trusted until it expires.
    pub previous: Option<String>,
}

impl CaSet {
    /// A set of one CA.
    pub fn new(current: Issued) -> Self {
        Self {
            current,
            next: None,
            previous: None,
        }
    }

    /// Reads the private CA Secret; `None` when its signing CA is missing.
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        // A key written empty is a step that is over (see `secret_data`).
        let pair = |certificate: &str, key: &str| {
            Some(Issued {
                certificate_pem: text(secret, certificate).filter(|pem| !pem.is_empty())?,
                key_pem: text(secret, key).filter(|pem| !pem.is_empty())?,
            })
        };
        Some(Self {
            current: pair(tls_keys::CA, tls_keys::CA_KEY)?,
            next: pair(tls_keys::NEXT_CA, tls_keys::NEXT_CA_KEY),
            previous: text(secret, tls_keys::PREVIOUS_CA).filter(|pem| !pem.is_empty()),
        })
    }

    /// The private CA Secret's data. Keys of a step that is over are written empty (a
    /// server-side apply without them would leave the old values in place).
    pub fn secret_data(&self) -> Vec<(&'static str, String)> {
        let next = self.next.as_ref();
        vec![
            (tls_keys::CA, self.current.certificate_pem.clone()),
            (tls_keys::CA_KEY, self.current.key_pem.clone()),
            (
                tls_keys::NEXT_CA,
                next.map(|ca| ca.certificate_pem.clone())
                    .unwrap_or_default(),
            ),
            (
                tls_keys::NEXT_CA_KEY,
                next.map(|ca| ca.key_pem.clone()).unwrap_or_default(),
            ),
            (
                tls_keys::PREVIOUS_CA,
                self.previous.clone().unwrap_or_default(),
            ),
        ]
    }

    /// What every published `ca.crt` holds: the signing CA first, then the next, then the
    /// previous one.
    pub fn bundle(&self) -> String {
        let mut bundle = String::new();
        let certificates = std::iter::once(&self.current.certificate_pem)
            .chain(self.next.as_ref().map(|ca| &ca.certificate_pem))
            .chain(self.previous.as_ref());
        for pem in certificates {
            bundle.push_str(pem.trim_end());
            bundle.push('\n');
        }
        bundle
    }
}

/// The one change a reconciliation makes to the CAs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to change; come back after this long (the next step's time), if ever.
    Keep(Option<Duration>),
    /// No usable CA: make one (a new cluster, or a CA Secret someone emptied).
    Create,
    /// The signing CA is due: make the next one and publish both.
    Stage,
    /// The next CA signs from now on.
    Promote {
        /// Promoted because the current CA is about to expire, although some instances have
        /// not reported the bundle loaded.
        forced: bool,
    },
    /// The previous CA expired (or cannot be read): out of the bundle.
    Retire,
}

/// Ready instances that have not loaded the published bundle yet (pod names).
pub type Pending = Vec<String>;

fn not_after(pem: &str) -> Option<OffsetDateTime> {
    certificates::summary(pem, "a CA")
        .ok()
        .map(|summary| summary.not_after)
}

/// When the CA in `next` was made (its validity starts [`certificates::BACKDATE`] before).
fn staged_at(next: &Issued) -> Option<OffsetDateTime> {
    certificates::summary(&next.certificate_pem, "the next CA")
        .ok()
        .map(|summary| summary.not_before + certificates::BACKDATE)
}

/// Decides the next step for the CAs in `stored` at `now`. Times are the certificates'
/// renewal arithmetic ([`certificates::due_for_renewal`], [`certificates::until_renewal`])
/// with other thresholds: `renew_before` to stage, a quarter of it to force, none to retire.
pub fn plan(
    stored: Option<&CaSet>,
    now: OffsetDateTime,
    lifetimes: &Lifetimes,
    pending: &Pending,
) -> Step {
    let Some(set) = stored else {
        return Step::Create;
    };
    let Some(current_end) = not_after(&set.current.certificate_pem) else {
        return Step::Create;
    };
    let previous_end = set.previous.as_deref().map(not_after);
    if let Some(end) = previous_end
        && end.is_none_or(|end| certificates::due_for_renewal(end, now, Duration::ZERO))
    {
        return Step::Retire;
    }
    let renew_before = lifetimes.renew_before;
    let force_below = renew_before / 4;
    match &set.next {
        None if certificates::due_for_renewal(current_end, now, renew_before) => Step::Stage,
        None => {
            let until_due = certificates::until_renewal(current_end, now, renew_before);
            Step::Keep(Some(match previous_end.flatten() {
                Some(end) => until_due.min(certificates::until_renewal(end, now, Duration::ZERO)),
                None => until_due,
            }))
        }
        Some(next) => {
            let Some(staged) = staged_at(next) else {
                // An unreadable next CA is made again.
                return Step::Stage;
            };
            let overlap_left = certificates::until_renewal(
                staged + lifetimes.effective_overlap(),
                now,
                Duration::ZERO,
            );
            let expiring = certificates::due_for_renewal(current_end, now, force_below);
            if overlap_left.is_zero() && pending.is_empty() {
                Step::Promote { forced: false }
            } else if expiring {
                Step::Promote {
                    forced: !pending.is_empty(),
                }
            } else {
                // Back when the overlap ends, or at the latest when promotion is forced. Past the
                // overlap, instances are awaited: their own cluster's pods bring the reconciler
                // back when they report, but a sharded cluster's shards' pods wake their shard,
                // not it, so it looks again every little while (this state is short, or an
                // instance is broken and the condition says which).
                let until_forced = certificates::until_renewal(current_end, now, force_below);
                Step::Keep(Some(if overlap_left.is_zero() {
                    until_forced.min(pending_poll(lifetimes))
                } else {
                    overlap_left.min(until_forced)
                }))
            }
        }
    }
}

/// How often a CA renewal past its overlap looks again at the instances it waits for: 15 s, or
/// the overlap when shorter (tests), at least 1 s.
fn pending_poll(lifetimes: &Lifetimes) -> Duration {
    Duration::from_secs(15)
        .min(lifetimes.effective_overlap())
        .max(Duration::from_secs(1))
}

/// Applies `step` to `stored`; `made` is the new CA a [`Step::Stage`] publishes (`Create`
/// makes a new set instead, see [`CaSet::new`]).
pub fn apply(step: &Step, stored: &CaSet, made: Option<Issued>) -> CaSet {
    let mut set = stored.clone();
    match step {
        Step::Keep(_) | Step::Create => {}
        Step::Stage => set.next = made.or(set.next),
        Step::Promote { .. } => {
            if let Some(next) = set.next.take() {
                set.previous = Some(std::mem::replace(&mut set.current, next).certificate_pem);
            }
        }
        Step::Retire => set.previous = None,
    }
    set
}

/// Condition type of the cluster's CA (operator CA only).
pub const CERTIFICATE_AUTHORITY: &str = "CertificateAuthority";

/// A condition (status, reason, message).
pub type Condition = (bool, &'static str, String);

/// The `CertificateAuthority` condition: which CA signs until when, and where a renewal stands
/// (what it waits for). Stable between steps, so that the status is not rewritten each pass.
pub fn condition(set: &CaSet, pending: &Pending, lifetimes: &Lifetimes) -> Condition {
    let describe =
        |pem: &str| certificates::describe_ca(pem).unwrap_or_else(|_| "unreadable".to_string());
    let current = describe(&set.current.certificate_pem);
    if let Some(next) = &set.next {
        let signs = staged_at(next)
            .map(|at| format!("after {}", at + lifetimes.effective_overlap()))
            .unwrap_or_else(|| "later".to_string());
        let waiting = if pending.is_empty() {
            String::new()
        } else {
            format!("; waiting for {} to load both", pending.join(", "))
        };
        return (
            true,
            "RenewalStaged",
            format!(
                "a renewed CA {} is in every ca.crt beside the signing CA {current}; it signs {signs} once every ready instance has loaded both{waiting}",
                describe(&next.certificate_pem)
            ),
        );
    }
    if let Some(previous) = &set.previous {
        return (
            true,
            "PreviousTrusted",
            format!(
                "the renewed CA {current} signs; the previous CA {} stays in every ca.crt until it expires",
                describe(previous)
            ),
        );
    }
    (true, "Valid", format!("the CA {current} signs"))
}

/// Ready instances (of `views`) whose reported `tlsCa` is not `bundle`'s digest.
pub fn pending(
    views: &[crate::postgres_cluster::instances::InstanceView],
    bundle: &str,
) -> Pending {
    let digest = api::contract::ca_bundle_digest(bundle.as_bytes());
    views
        .iter()
        .filter(|view| view.ready && !view.terminating)
        .filter(|view| view.tls_ca.as_deref() != Some(digest.as_str()))
        .map(|view| view.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86400;

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            ca: Duration::from_secs(365 * DAY),
            leaf: Duration::from_secs(90 * DAY),
            renew_before: Duration::from_secs(30 * DAY),
            ca_overlap: Duration::from_secs(7 * DAY),
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// A CA made at `made` that lives `lifetime`.
    fn ca(made: OffsetDateTime, lifetime: u64) -> Issued {
        certificates::new_ca("db", "ns", made, Duration::from_secs(lifetime)).unwrap()
    }

    fn days(n: i64) -> time::Duration {
        time::Duration::days(n)
    }

    #[test]
    fn a_missing_or_unreadable_ca_is_created() {
        let none = Vec::new();
        assert_eq!(plan(None, now(), &lifetimes(), &none), Step::Create);
        let garbage = CaSet::new(Issued {
            certificate_pem: "not a certificate".into(),
            key_pem: "key".into(),
        });
        assert_eq!(
            plan(Some(&garbage), now(), &lifetimes(), &none),
            Step::Create
        );
    }

    #[test]
    fn a_young_ca_is_kept_until_it_is_due_then_a_next_one_is_staged() {
        let set = CaSet::new(ca(now(), 365 * DAY));
        let Step::Keep(Some(back)) = plan(Some(&set), now(), &lifetimes(), &Vec::new()) else {
            panic!("kept");
        };
        let expected = Duration::from_secs(335 * DAY);
        assert!(
            back <= expected && back > expected - Duration::from_secs(60),
            "{back:?}"
        );
        // 29 days left: due.
        assert_eq!(
            plan(Some(&set), now() + days(336), &lifetimes(), &Vec::new()),
            Step::Stage
        );
    }

    #[test]
    fn staging_publishes_both_and_the_current_still_signs() {
        let old = ca(now() - days(336), 365 * DAY);
        let set = apply(
            &Step::Stage,
            &CaSet::new(old.clone()),
            Some(ca(now(), 365 * DAY)),
        );
        assert_eq!(set.current, old, "the current CA still signs");
        let next = set.next.clone().expect("a next CA");
        let bundle = set.bundle();
        assert!(bundle.starts_with(old.certificate_pem.trim_end()));
        assert!(bundle.contains(next.certificate_pem.trim_end()));
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        // The Secret round-trips, empty keys included.
        let secret = Secret {
            data: Some(
                set.secret_data()
                    .into_iter()
                    .map(|(key, value)| {
                        (key.to_string(), k8s_openapi::ByteString(value.into_bytes()))
                    })
                    .collect(),
            ),
            ..Secret::default()
        };
        assert_eq!(CaSet::from_secret(&secret), Some(set));
    }

    #[test]
    fn promotion_waits_for_the_overlap_and_for_every_ready_instance() {
        let staged = now() - days(1);
        let set = CaSet {
            current: ca(staged - days(335), 365 * DAY),
            next: Some(ca(staged, 365 * DAY)),
            previous: None,
        };
        // One day into a seven-day overlap: back in about six days.
        let Step::Keep(Some(back)) = plan(Some(&set), now(), &lifetimes(), &Vec::new()) else {
            panic!("kept during the overlap");
        };
        assert!(back <= Duration::from_secs(6 * DAY) && back > Duration::from_secs(6 * DAY - 60));
        // Overlap over, one instance has not loaded the bundle: wait for its report, looking
        // again every 15 s (a shard's pod does not wake its sharded parent).
        let later = now() + days(7);
        let pending = vec!["db-1".to_string()];
        assert_eq!(
            plan(Some(&set), later, &lifetimes(), &pending),
            Step::Keep(Some(Duration::from_secs(15)))
        );
        assert_eq!(
            plan(Some(&set), later, &lifetimes(), &Vec::new()),
            Step::Promote { forced: false }
        );
        // With a quarter of renew_before left, promoted anyway.
        let late = now() + days(23);
        assert_eq!(
            plan(Some(&set), late, &lifetimes(), &pending),
            Step::Promote { forced: true }
        );
    }

    #[test]
    fn promotion_makes_the_next_sign_and_keeps_the_old_until_it_expires() {
        let old = ca(now() - days(340), 365 * DAY);
        let new = ca(now() - days(8), 365 * DAY);
        let set = apply(
            &Step::Promote { forced: false },
            &CaSet {
                current: old.clone(),
                next: Some(new.clone()),
                previous: None,
            },
            None,
        );
        assert_eq!(set.current, new);
        assert_eq!(set.next, None);
        assert_eq!(set.previous.as_deref(), Some(old.certificate_pem.as_str()));
        assert!(set.bundle().starts_with(new.certificate_pem.trim_end()));
        // Kept while the old CA is valid: back when it expires (25 days).
        let Step::Keep(Some(back)) = plan(Some(&set), now(), &lifetimes(), &Vec::new()) else {
            panic!("kept");
        };
        assert!(back <= Duration::from_secs(25 * DAY) && back > Duration::from_secs(25 * DAY - 60));
        // Then retired.
        assert_eq!(
            plan(Some(&set), now() + days(26), &lifetimes(), &Vec::new()),
            Step::Retire
        );
        let retired = apply(&Step::Retire, &set, None);
        assert_eq!(retired, CaSet::new(new));
    }

    #[test]
    fn an_expired_ca_with_a_next_one_is_promoted_at_once() {
        let set = CaSet {
            current: ca(now() - days(400), 365 * DAY),
            next: Some(ca(now() - time::Duration::minutes(1), 365 * DAY)),
            previous: None,
        };
        assert_eq!(
            plan(Some(&set), now(), &lifetimes(), &vec!["db-0".to_string()]),
            Step::Promote { forced: true }
        );
    }

    #[test]
    fn the_condition_says_where_a_renewal_stands_and_what_it_waits_for() {
        let old = ca(now() - days(340), 365 * DAY);
        let set = CaSet::new(old.clone());
        let (status, reason, message) = condition(&set, &Vec::new(), &lifetimes());
        assert!(status);
        assert_eq!(reason, "Valid");
        assert!(message.contains("valid until"), "{message}");
        let staged = apply(&Step::Stage, &set, Some(ca(now(), 365 * DAY)));
        let (_, reason, message) = condition(&staged, &vec!["db-1".into()], &lifetimes());
        assert_eq!(reason, "RenewalStaged");
        assert!(
            message.ends_with("waiting for db-1 to load both"),
            "{message}"
        );
        let promoted = apply(&Step::Promote { forced: false }, &staged, None);
        let (_, reason, _) = condition(&promoted, &Vec::new(), &lifetimes());
        assert_eq!(reason, "PreviousTrusted");
    }

    #[test]
    fn only_ready_instances_that_report_another_bundle_hold_promotion_back() {
        use crate::postgres_cluster::instances::InstanceView;
        let bundle = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        let digest = api::contract::ca_bundle_digest(bundle.as_bytes());
        let view = |name: &str, ready: bool, tls_ca: Option<&str>| InstanceView {
            name: name.into(),
            ready,
            tls_ca: tls_ca.map(str::to_string),
            ..InstanceView::default()
        };
        let views = [
            view("db-0", true, Some(&digest)),
            view("db-1", true, Some("0000000000000000")),
            view("db-2", true, None),
            view("db-3", false, None),
        ];
        assert_eq!(pending(&views, bundle), ["db-1", "db-2"]);
    }
}
