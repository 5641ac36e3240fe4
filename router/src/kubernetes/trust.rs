//! Which CA certificates the router trusts for each shard while a shard's CA is rotated. Pure.
//!
//! A shard's `<child>-ca` Secret changes at once when the operator renews the CA, but the shard's
//! PostgreSQL presents a certificate from the new CA only once its instance manager has the
//! renewed Secret (a kubelet updates mounted Secrets within a minute or so) and reloaded. Between
//! the two, a router that trusted only the new CA would refuse the shard's old certificate, and
//! one that kept only the old CA would refuse the new one for good. So a replaced CA stays
//! trusted, beside its successor, for [`OVERLAP`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a replaced CA stays trusted beside the new one: well past a kubelet's update of a
/// mounted Secret and the instance manager's reload.
pub const OVERLAP: Duration = Duration::from_secs(15 * 60);

/// The CAs trusted per shard cluster: the current `ca.crt`, and those it replaced with the time
/// they were replaced.
#[derive(Debug, Default)]
pub struct TrustedCas {
    shards: BTreeMap<String, Trusted>,
}

#[derive(Debug, Default)]
struct Trusted {
    current: String,
    replaced: Vec<(String, Instant)>,
}

impl TrustedCas {
    /// Records what the Secrets hold now (`read`: child cluster -> `ca.crt`) and returns the
    /// PEM each shard's certificate may chain to: the current CA first, then the replaced ones
    /// still inside [`OVERLAP`]. A shard whose Secret is gone is forgotten (the topology says
    /// what that means).
    pub fn update(
        &mut self,
        read: BTreeMap<String, String>,
        now: Instant,
    ) -> BTreeMap<String, String> {
        self.shards.retain(|child, _| read.contains_key(child));
        read.into_iter()
            .map(|(child, pem)| {
                let trusted = self.shards.entry(child.clone()).or_default();
                if trusted.current != pem {
                    let previous = std::mem::replace(&mut trusted.current, pem);
                    if !previous.is_empty() {
                        trusted.replaced.push((previous, now));
                    }
                }
                let current = trusted.current.clone();
                trusted.replaced.retain(|(old, replaced_at)| {
                    *old != current && now.saturating_duration_since(*replaced_at) < OVERLAP
                });
                let mut bundle = current;
                for (old, _) in trusted.replaced.iter().rev() {
                    if !bundle.ends_with('\n') {
                        bundle.push('\n');
                    }
                    bundle.push_str(old);
                }
                (child, bundle)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(child, pem)| (child.to_string(), pem.to_string()))
            .collect()
    }

    #[test]
    fn a_replaced_ca_stays_trusted_beside_the_new_one_for_the_overlap_only() {
        let start = Instant::now();
        let mut trust = TrustedCas::default();
        let first = trust.update(
            read(&[("db-shard-0", "OLD\n"), ("db-shard-1", "ONE\n")]),
            start,
        );
        assert_eq!(
            first,
            read(&[("db-shard-0", "OLD\n"), ("db-shard-1", "ONE\n")])
        );

        let rotated = start + Duration::from_secs(60);
        let during = trust.update(
            read(&[("db-shard-0", "NEW\n"), ("db-shard-1", "ONE\n")]),
            rotated,
        );
        assert_eq!(
            during["db-shard-0"], "NEW\nOLD\n",
            "the new CA first, the old one kept"
        );
        assert_eq!(during["db-shard-1"], "ONE\n", "an unchanged shard");

        let later = trust.update(
            read(&[("db-shard-0", "NEW\n"), ("db-shard-1", "ONE\n")]),
            rotated + OVERLAP - Duration::from_secs(1),
        );
        assert_eq!(later["db-shard-0"], "NEW\nOLD\n");
        let after = trust.update(
            read(&[("db-shard-0", "NEW\n"), ("db-shard-1", "ONE\n")]),
            rotated + OVERLAP,
        );
        assert_eq!(after["db-shard-0"], "NEW\n", "the overlap is over");
    }

    #[test]
    fn a_ca_rotated_back_or_a_shard_gone_leaves_nothing_behind() {
        let start = Instant::now();
        let mut trust = TrustedCas::default();
        trust.update(read(&[("db-shard-0", "A")]), start);
        trust.update(read(&[("db-shard-0", "B")]), start);
        let back = trust.update(read(&[("db-shard-0", "A")]), start);
        assert_eq!(
            back["db-shard-0"], "A\nB",
            "A once, then B (a PEM without a final newline)"
        );
        assert!(trust.update(read(&[]), start).is_empty());
        let again = trust.update(read(&[("db-shard-0", "C")]), start);
        assert_eq!(
            again["db-shard-0"], "C",
            "a shard that came back starts anew"
        );
    }
}
