//! The Lease record as this instance sees it. Expiry is measured on the local monotonic clock
//! from the moment the record was last seen to change (as client-go's leader election does), so
//! clock skew between nodes does not matter; after an API outage the clock restarts, giving the
//! holder a full Lease duration to renew before anyone may take over.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

/// The observed Lease and when its record last changed.
#[derive(Debug, Default)]
pub struct LeaseTracker {
    lease: Option<Lease>,
    exists: bool,
    fingerprint: Option<(Option<String>, Option<String>)>,
    changed_at: Option<Instant>,
    outage: bool,
}

impl LeaseTracker {
    /// Records a successful read (`None`: the Lease does not exist).
    pub fn observe(&mut self, lease: Option<Lease>, now: Instant) {
        let fingerprint = lease.as_ref().map(|lease| {
            let spec = lease.spec.clone().unwrap_or_default();
            (
                spec.holder_identity,
                spec.renew_time.map(|time| time.0.to_string()),
            )
        });
        if fingerprint != self.fingerprint || self.outage || self.changed_at.is_none() {
            self.changed_at = Some(now);
        }
        self.fingerprint = fingerprint;
        self.exists = lease.is_some();
        self.lease = lease;
        self.outage = false;
    }

    /// Records a failed read: the next successful one restarts the expiry clock.
    pub fn observe_outage(&mut self) {
        self.outage = true;
    }

    /// The last Lease read.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Whether a Lease read succeeded and found the Lease.
    pub fn exists(&self) -> bool {
        self.exists
    }

    /// Current holder.
    pub fn holder(&self) -> Option<String> {
        self.lease
            .as_ref()
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.holder_identity.clone())
            .filter(|holder| !holder.is_empty())
    }

    /// Whether the Lease was ever held (a cluster that exists), so an empty instance must not
    /// run initdb.
    pub fn ever_held(&self) -> bool {
        self.holder().is_some()
            || self
                .lease
                .as_ref()
                .and_then(|lease| lease.spec.as_ref())
                .and_then(|spec| spec.lease_transitions)
                .unwrap_or(0)
                > 0
    }

    /// An annotation of the Lease.
    pub fn annotation(&self, key: &str) -> Option<String> {
        self.lease
            .as_ref()
            .and_then(|lease| annotation_of(lease, key))
            .map(str::to_string)
    }

    /// Whether the holder let the Lease expire: no holder, or its record unchanged for the
    /// Lease's duration (`default_duration` when it names none).
    /// A Lease its holder released (PostgreSQL stopped first) is expired at once.
    pub fn expired(&self, now: Instant, default_duration: Duration) -> bool {
        let Some(holder) = self.holder() else {
            return true;
        };
        if self
            .annotation(api::contract::ANNOTATION_RELEASED_BY)
            .as_deref()
            == Some(holder.as_str())
        {
            return true;
        }
        let duration = self
            .lease
            .as_ref()
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.lease_duration_seconds)
            .map(|seconds| Duration::from_secs(seconds.max(1) as u64))
            .unwrap_or(default_duration);
        match self.changed_at {
            Some(changed) => now.duration_since(changed) >= duration,
            None => false,
        }
    }
}

impl LeaseTracker {
    /// Whether the Lease has been expired for at least `delay` (`spec.failover.failoverDelaySeconds`:
    /// counted from the moment it expired; for a released Lease or one without holder, from the
    /// moment that was seen).
    pub fn expired_for(&self, now: Instant, default_duration: Duration, delay: Duration) -> bool {
        if delay.is_zero() {
            return self.expired(now, default_duration);
        }
        let Some(earlier) = now.checked_sub(delay) else {
            return false;
        };
        self.changed_at.is_some_and(|changed| earlier >= changed)
            && self.expired(earlier, default_duration)
    }
}

/// The Lease with `holder` as holder, renewed now: a new one (from `current` = `None`) or an
/// update of `current` keeping its `resourceVersion` (optimistic concurrency). A claim is never a
/// release: the released mark goes.
pub fn claimed(
    current: Option<&Lease>,
    name: &str,
    namespace: &str,
    holder: Option<&str>,
    duration: Duration,
) -> Lease {
    let now = MicroTime(Timestamp::now());
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec::default()),
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let previous = spec.holder_identity.clone().filter(|h| !h.is_empty());
    if previous.as_deref() != holder {
        spec.acquire_time = Some(now.clone());
        if holder.is_some() {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
    }
    spec.holder_identity = holder.map(str::to_string);
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration.as_secs() as i32);
    if let Some(annotations) = lease.metadata.annotations.as_mut() {
        annotations.remove(api::contract::ANNOTATION_RELEASED_BY);
    }
    lease
}

/// An annotation of `lease`.
pub fn annotation_of<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(key))
        .map(String::as_str)
}

/// Sets (`Some`) or removes (`None`) annotations on a Lease.
pub fn annotate(lease: &mut Lease, changes: &[(&str, Option<String>)]) {
    let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for (key, value) in changes {
        match value {
            Some(value) => {
                annotations.insert(key.to_string(), value.clone());
            }
            None => {
                annotations.remove(*key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_runs_from_the_last_observed_change_and_restarts_after_an_outage() {
        let start = Instant::now();
        let duration = Duration::from_secs(4);
        let lease = claimed(None, "c-primary", "ns", Some("a"), duration);
        let mut tracker = LeaseTracker::default();
        tracker.observe(Some(lease.clone()), start);
        assert!(!tracker.expired(start + Duration::from_secs(3), duration));
        tracker.observe(Some(lease.clone()), start + Duration::from_secs(3));
        assert!(tracker.expired(start + Duration::from_secs(4), duration));
        tracker.observe_outage();
        tracker.observe(Some(lease), start + Duration::from_secs(10));
        assert!(!tracker.expired(start + Duration::from_secs(13), duration));
        assert!(tracker.expired(start + Duration::from_secs(14), duration));
    }

    #[test]
    fn a_released_lease_is_expired_at_once_until_the_next_claim() {
        let now = Instant::now();
        let duration = Duration::from_secs(4);
        let mut lease = claimed(None, "c-primary", "ns", Some("a"), duration);
        annotate(
            &mut lease,
            &[(api::contract::ANNOTATION_RELEASED_BY, Some("a".into()))],
        );
        let mut tracker = LeaseTracker::default();
        tracker.observe(Some(lease.clone()), now);
        assert!(tracker.expired(now, duration));
        let taken = claimed(Some(&lease), "c-primary", "ns", Some("b"), duration);
        tracker.observe(Some(taken), now);
        assert!(!tracker.expired(now, duration));
        assert_eq!(
            tracker.annotation(api::contract::ANNOTATION_RELEASED_BY),
            None
        );
    }

    #[test]
    fn a_failover_delay_counts_from_the_expiry() {
        let start = Instant::now();
        let duration = Duration::from_secs(4);
        let delay = Duration::from_secs(3);
        let mut tracker = LeaseTracker::default();
        tracker.observe(
            Some(claimed(None, "c-primary", "ns", Some("a"), duration)),
            start,
        );
        assert!(tracker.expired(start + Duration::from_secs(4), duration));
        assert!(!tracker.expired_for(start + Duration::from_secs(6), duration, delay));
        assert!(tracker.expired_for(start + Duration::from_secs(7), duration, delay));
        let mut released = claimed(None, "c-primary", "ns", Some("b"), duration);
        annotate(
            &mut released,
            &[(api::contract::ANNOTATION_RELEASED_BY, Some("b".into()))],
        );
        tracker.observe(Some(released), start + Duration::from_secs(10));
        assert!(!tracker.expired_for(start + Duration::from_secs(12), duration, delay));
        assert!(tracker.expired_for(start + Duration::from_secs(13), duration, delay));
        assert!(tracker.expired_for(start + Duration::from_secs(13), duration, Duration::ZERO));
    }

    #[test]
    fn claiming_counts_transitions() {
        let duration = Duration::from_secs(4);
        let first = claimed(None, "c-primary", "ns", Some("a"), duration);
        assert_eq!(first.spec.as_ref().unwrap().lease_transitions, Some(1));
        let renewed = claimed(Some(&first), "c-primary", "ns", Some("a"), duration);
        assert_eq!(renewed.spec.as_ref().unwrap().lease_transitions, Some(1));
        let taken = claimed(Some(&renewed), "c-primary", "ns", Some("b"), duration);
        assert_eq!(taken.spec.as_ref().unwrap().lease_transitions, Some(2));
        let mut tracker = LeaseTracker::default();
        tracker.observe(Some(taken), Instant::now());
        assert_eq!(tracker.holder().as_deref(), Some("b"));
        assert!(tracker.ever_held());
    }
}
