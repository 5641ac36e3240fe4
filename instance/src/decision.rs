//! Pure decisions: which role to take, whether this replica may promote, what
//! `synchronous_standby_names` to write. No I/O here; the run loop observes, calls these, and acts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A primary whose PostgreSQL exited and then failed to restart this many times in a row gives
/// the role up (fenced, Lease released) instead of holding the Lease with no server behind it.
/// Two, not one: a restart right after a `kill -9` of the postmaster can fail once while the
/// orphaned backends still hold the old shared memory.
pub const FAILED_RESTARTS_BEFORE_FAILOVER: u32 = 2;
/// A primary whose PostgreSQL has not accepted connections for this long since it exited (a
/// restart that hangs in recovery) gives the role up too: a streaming replica is ready sooner.
pub const POSTGRES_DOWN_BEFORE_FAILOVER: Duration = Duration::from_secs(5);
/// A primary that released its Lease because PostgreSQL failed takes it back (and tries again)
/// when no replica claimed it for this long (none could: a single instance, no quorum).
pub const UNCLAIMED_RELEASE_RETRY: Duration = Duration::from_secs(5);

/// Why an instance is fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FenceReason {
    /// The fenced annotation is set on the pod or the cluster.
    Requested,
    /// This primary lost its Lease (or could not renew it) and stopped PostgreSQL.
    LostLease,
    /// This primary's PostgreSQL died and could not be restarted: it released the Lease so that
    /// a replica takes over at once.
    PostgresFailed,
}

/// The role of this instance: the state machine of the run loop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "role")]
pub enum Role {
    /// Not decided yet (start-up, or waiting for a primary to clone from or follow).
    Pending,
    /// Holds the Lease and accepts writes.
    Primary,
    /// Streams from the primary named by the Lease (`None` while no one holds it).
    Replica {
        /// Pod name of the primary followed.
        upstream: Option<String>,
    },
    /// PostgreSQL is stopped.
    Fenced {
        /// Why.
        reason: FenceReason,
    },
}

impl Role {
    /// Value of the role label on the pod.
    pub fn label(&self) -> &'static str {
        match self {
            Role::Primary => api::contract::role::PRIMARY,
            Role::Replica { .. } | Role::Pending => api::contract::role::REPLICA,
            Role::Fenced { .. } => api::contract::role::FENCED,
        }
    }
}

/// What the run loop saw in one tick.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// Whether the fenced annotation applies to this instance.
    pub fence_requested: bool,
    /// Holder of the Lease (`None` when the Lease has no holder or does not exist).
    pub lease_holder: Option<String>,
    /// Whether this instance is the holder.
    pub lease_is_mine: bool,
    /// Whether the Lease expired, measured on the local clock since its record last changed.
    pub lease_expired: bool,
    /// Whether the last API call succeeded.
    pub api_reachable: bool,
    /// For a primary: time since the start of the last successful renewal.
    pub since_renewal: Duration,
    /// For a primary that cannot renew: every peer answered that it cannot reach the API server
    /// either (so none of them can take the Lease).
    pub peers_confirm_api_outage: bool,
    /// Target of a requested switchover (Lease annotation), when any.
    pub switchover_to: Option<String>,
    /// For a replica: its PostgreSQL accepts writes (promoted behind our back), or it has not
    /// streamed from a live primary for a long while (its history diverged).
    pub replica_diverged: bool,
    /// For a primary: how many restarts of PostgreSQL failed since it last accepted connections.
    pub postgres_failed_restarts: u32,
    /// For a primary: how long PostgreSQL has not accepted connections since it exited.
    pub postgres_down_for: Duration,
    /// For a fenced instance: time since it fenced itself.
    pub since_fence: Duration,
    /// For a replica: the primary it follows now has another address (its pod came back with
    /// another IP) than the one in `primary_conninfo`.
    pub upstream_moved: bool,
}

/// The step the run loop takes next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing changes (keep renewing / keep following).
    Stay,
    /// Stop PostgreSQL and stay stopped.
    Fence(FenceReason),
    /// The fence was lifted or the Lease is reachable again: work out the role from the data
    /// directory and the Lease, as at start-up.
    Resolve,
    /// Follow the Lease holder (re-point `primary_conninfo` when it changed).
    Follow(String),
    /// The Lease expired: check candidacy, take the Lease and promote when this replica is the
    /// best candidate.
    RunForPrimary,
    /// The Lease was handed to this replica (switchover): wait for the old primary's last WAL,
    /// then promote.
    PromoteHandedOver,
    /// Hand the primary role to this replica.
    Switchover(String),
    /// Another instance holds the Lease: stop writing at once and rejoin as a replica.
    Demote,
    /// This replica cannot follow the primary: stop it, pg_rewind (or clone again), restart.
    Rewind(String),
}

/// The single transition function of the role state machine.
pub fn next_step(role: &Role, seen: &Observation, renew_deadline: Duration) -> Step {
    match role {
        _ if seen.fence_requested
            && !matches!(
                role,
                Role::Fenced {
                    reason: FenceReason::Requested
                }
            ) =>
        {
            Step::Fence(FenceReason::Requested)
        }
        Role::Fenced {
            reason: FenceReason::Requested,
        } => {
            if seen.fence_requested {
                Step::Stay
            } else {
                Step::Resolve
            }
        }
        Role::Fenced {
            reason: FenceReason::LostLease,
        } => {
            if seen.api_reachable {
                Step::Resolve
            } else {
                Step::Stay
            }
        }
        Role::Fenced {
            reason: FenceReason::PostgresFailed,
        } => {
            // Our own released Lease reads as expired: wait for a replica to claim it, and take
            // it back only when none did.
            let claimed_by_another = seen.lease_holder.is_some() && !seen.lease_is_mine;
            if seen.api_reachable
                && (claimed_by_another || seen.since_fence >= UNCLAIMED_RELEASE_RETRY)
            {
                Step::Resolve
            } else {
                Step::Stay
            }
        }
        Role::Pending => Step::Resolve,
        Role::Primary => {
            if seen.api_reachable && !seen.lease_is_mine {
                return Step::Demote;
            }
            if seen.postgres_failed_restarts >= FAILED_RESTARTS_BEFORE_FAILOVER
                || seen.postgres_down_for >= POSTGRES_DOWN_BEFORE_FAILOVER
            {
                return Step::Fence(FenceReason::PostgresFailed);
            }
            if seen.since_renewal >= renew_deadline && !seen.peers_confirm_api_outage {
                return Step::Fence(FenceReason::LostLease);
            }
            match &seen.switchover_to {
                Some(target) if seen.api_reachable && seen.lease_is_mine => {
                    Step::Switchover(target.clone())
                }
                _ => Step::Stay,
            }
        }
        Role::Replica { upstream } => {
            if !seen.api_reachable {
                return Step::Stay;
            }
            if seen.lease_is_mine {
                return if seen.lease_expired {
                    Step::RunForPrimary
                } else {
                    Step::PromoteHandedOver
                };
            }
            match &seen.lease_holder {
                Some(holder) if !seen.lease_expired && seen.replica_diverged => {
                    Step::Rewind(holder.clone())
                }
                Some(holder) if !seen.lease_expired => {
                    if upstream.as_deref() == Some(holder.as_str()) && !seen.upstream_moved {
                        Step::Stay
                    } else {
                        Step::Follow(holder.clone())
                    }
                }
                _ => Step::RunForPrimary,
            }
        }
    }
}

/// How commits wait for standbys (`spec.replication.synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncPolicy {
    /// Standbys that confirm each commit; 0 for asynchronous replication.
    pub number: u32,
    /// `FIRST n` (priority) instead of `ANY n` (quorum). Either way each acknowledged commit is on
    /// `n` members of the set, which is all the candidacy rule relies on.
    pub first: bool,
    /// Availability wins: only the replicas that stream now are in the set, so writes go on
    /// (asynchronously when none streams); a failover may then lose acknowledged commits.
    pub preferred: bool,
}

/// `synchronous_standby_names` for `number` synchronous standbys among `standbys` (pod names):
/// `ANY n (...)` with `n` capped at the set's size, or empty (asynchronous) when `number` is 0 or
/// the set is empty.
pub fn synchronous_standby_names(standbys: &[String], number: u32) -> String {
    standby_names(
        standbys,
        SyncPolicy {
            number,
            ..SyncPolicy::default()
        },
    )
}

/// `synchronous_standby_names` under `policy`: `ANY n (...)` or `FIRST n (...)`, `n` capped at
/// the set's size; empty (asynchronous) when the number is 0 or the set is empty.
pub fn standby_names(standbys: &[String], policy: SyncPolicy) -> String {
    let number = policy.number;
    if number == 0 || standbys.is_empty() {
        return String::new();
    }
    let mut names: Vec<String> = standbys
        .iter()
        .map(|pod| crate::quote::slot_name(pod))
        .collect();
    names.sort();
    names.dedup();
    let number = (number as usize).min(names.len());
    let quoted: Vec<String> = names
        .iter()
        .map(|name| crate::quote::identifier(name))
        .collect();
    let method = if policy.first { "FIRST" } else { "ANY" };
    format!("{method} {number} ({})", quoted.join(", "))
}

/// The next synchronous set under `policy`: [`next_synchronous_set`] when durability is required;
/// only the replicas that stream now when it is preferred.
pub fn next_synchronous_set_for(
    previous: &[String],
    streaming: &[String],
    existing_pods: &[String],
    me: &str,
    policy: SyncPolicy,
) -> Vec<String> {
    if policy.preferred {
        next_synchronous_set(&[], streaming, existing_pods, me)
    } else {
        next_synchronous_set(previous, streaming, existing_pods, me)
    }
}

/// The next synchronous set of a primary: it only grows while its members exist (a replica that
/// is down stays in it, so that a commit is acknowledged only by standbys a failover will
/// consult), takes in every replica that streams, and drops pods that no longer exist.
pub fn next_synchronous_set(
    previous: &[String],
    streaming: &[String],
    existing_pods: &[String],
    me: &str,
) -> Vec<String> {
    let mut set: Vec<String> = previous
        .iter()
        .chain(streaming.iter())
        .filter(|pod| pod.as_str() != me && existing_pods.contains(pod))
        .cloned()
        .collect();
    set.sort();
    set.dedup();
    set
}

/// What a peer said when asked for its status before a promotion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPosition {
    /// Pod name.
    pub name: String,
    /// Received (flushed) WAL position, `None` when the peer did not answer or has no WAL.
    pub received_lsn: Option<u64>,
    /// Whether the peer is fenced (never promoted).
    pub fenced: bool,
}

/// Outcome of a candidacy check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidacy {
    /// This replica may take the Lease and promote.
    Promote,
    /// It may not (yet): the reason, for the log.
    Wait(String),
}

/// Whether replica `me` (at `my_lsn`) may promote, given its `peers` (every other member except
/// the old primary) and the synchronous set the old primary used (`sync_names` pod names, `number`
/// of them acknowledge each commit; `number == 0` for asynchronous replication).
///
/// With `ANY n` over `N` standbys, each acknowledged commit is on at least `n` of them, so seeing
/// `N - n + 1` of them (this one included) guarantees that one of those seen holds every
/// acknowledged commit; the candidate must be at least as advanced as every peer it saw.
pub fn candidacy(
    me: &str,
    my_lsn: u64,
    peers: &[PeerPosition],
    sync_names: &[String],
    number: u32,
) -> Candidacy {
    if number > 0 && !sync_names.is_empty() {
        let in_set = |pod: &str| sync_names.iter().any(|name| name == pod);
        if !in_set(me) {
            return Candidacy::Wait(format!("{me} is not a synchronous standby"));
        }
        let seen = 1 + peers
            .iter()
            .filter(|peer| in_set(&peer.name) && peer.received_lsn.is_some())
            .count();
        let needed = sync_names.len().saturating_sub(number as usize) + 1;
        if seen < needed {
            return Candidacy::Wait(format!(
                "quorum not reached: saw {seen} of the {needed} synchronous standbys needed"
            ));
        }
    }
    for peer in peers {
        let Some(lsn) = peer.received_lsn else {
            continue;
        };
        if peer.fenced {
            continue;
        }
        let eligible = number == 0 || sync_names.is_empty() || sync_names.contains(&peer.name);
        if !eligible {
            // An asynchronous peer ahead of us holds only unacknowledged WAL; it will rewind.
            continue;
        }
        if lsn > my_lsn || (lsn == my_lsn && peer.name.as_str() < me) {
            return Candidacy::Wait(format!("{} is a better candidate", peer.name));
        }
    }
    Candidacy::Promote
}

/// Parses an LSN written as `X/Y` (hexadecimal halves).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    Some((high << 32) | low)
}

/// Formats an LSN as `X/Y`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> Observation {
        Observation {
            api_reachable: true,
            ..Observation::default()
        }
    }

    const DEADLINE: Duration = Duration::from_secs(2);

    #[test]
    fn a_fence_request_wins_over_every_role() {
        let observation = Observation {
            fence_requested: true,
            ..seen()
        };
        for role in [
            Role::Primary,
            Role::Replica { upstream: None },
            Role::Pending,
        ] {
            assert_eq!(
                next_step(&role, &observation, DEADLINE),
                Step::Fence(FenceReason::Requested)
            );
        }
        let fenced = Role::Fenced {
            reason: FenceReason::Requested,
        };
        assert_eq!(next_step(&fenced, &observation, DEADLINE), Step::Stay);
        assert_eq!(next_step(&fenced, &seen(), DEADLINE), Step::Resolve);
    }

    #[test]
    fn a_primary_that_cannot_renew_fences_itself_unless_peers_confirm_an_outage() {
        let mut observation = Observation {
            api_reachable: false,
            lease_is_mine: true,
            since_renewal: Duration::from_millis(2500),
            ..Observation::default()
        };
        assert_eq!(
            next_step(&Role::Primary, &observation, DEADLINE),
            Step::Fence(FenceReason::LostLease)
        );
        observation.peers_confirm_api_outage = true;
        assert_eq!(
            next_step(&Role::Primary, &observation, DEADLINE),
            Step::Stay
        );
        observation.since_renewal = Duration::from_millis(500);
        observation.peers_confirm_api_outage = false;
        assert_eq!(
            next_step(&Role::Primary, &observation, DEADLINE),
            Step::Stay
        );
    }

    #[test]
    fn a_primary_whose_postgres_cannot_restart_gives_the_role_up_until_another_claims_it() {
        let holding = Observation {
            lease_holder: Some("a".into()),
            lease_is_mine: true,
            ..seen()
        };
        let once = Observation {
            postgres_failed_restarts: 1,
            postgres_down_for: Duration::from_millis(600),
            ..holding.clone()
        };
        assert_eq!(next_step(&Role::Primary, &once, DEADLINE), Step::Stay);
        let failed = Observation {
            postgres_failed_restarts: FAILED_RESTARTS_BEFORE_FAILOVER,
            ..once.clone()
        };
        assert_eq!(
            next_step(&Role::Primary, &failed, DEADLINE),
            Step::Fence(FenceReason::PostgresFailed)
        );
        let hanging = Observation {
            postgres_down_for: POSTGRES_DOWN_BEFORE_FAILOVER,
            ..holding.clone()
        };
        assert_eq!(
            next_step(&Role::Primary, &hanging, DEADLINE),
            Step::Fence(FenceReason::PostgresFailed)
        );

        let fenced = Role::Fenced {
            reason: FenceReason::PostgresFailed,
        };
        // Still ours (released, so it reads as expired): wait for a replica to claim it.
        let released = Observation {
            lease_expired: true,
            since_fence: Duration::from_millis(300),
            ..holding.clone()
        };
        assert_eq!(next_step(&fenced, &released, DEADLINE), Step::Stay);
        let taken = Observation {
            lease_holder: Some("b".into()),
            ..seen()
        };
        assert_eq!(next_step(&fenced, &taken, DEADLINE), Step::Resolve);
        let unclaimed = Observation {
            since_fence: UNCLAIMED_RELEASE_RETRY,
            ..released
        };
        assert_eq!(next_step(&fenced, &unclaimed, DEADLINE), Step::Resolve);
    }

    #[test]
    fn a_primary_that_sees_another_holder_demotes() {
        let observation = Observation {
            lease_holder: Some("b".into()),
            ..seen()
        };
        assert_eq!(
            next_step(&Role::Primary, &observation, DEADLINE),
            Step::Demote
        );
    }

    #[test]
    fn a_primary_hands_over_on_request() {
        let observation = Observation {
            lease_holder: Some("a".into()),
            lease_is_mine: true,
            switchover_to: Some("b".into()),
            ..seen()
        };
        assert_eq!(
            next_step(&Role::Primary, &observation, DEADLINE),
            Step::Switchover("b".into())
        );
    }

    #[test]
    fn replicas_follow_run_or_promote() {
        let replica = Role::Replica {
            upstream: Some("a".into()),
        };
        let following = Observation {
            lease_holder: Some("a".into()),
            ..seen()
        };
        assert_eq!(next_step(&replica, &following, DEADLINE), Step::Stay);
        let diverged = Observation {
            replica_diverged: true,
            ..following.clone()
        };
        assert_eq!(
            next_step(&replica, &diverged, DEADLINE),
            Step::Rewind("a".into())
        );
        let moved = Observation {
            lease_holder: Some("c".into()),
            ..seen()
        };
        assert_eq!(
            next_step(&replica, &moved, DEADLINE),
            Step::Follow("c".into())
        );
        let readdressed = Observation {
            upstream_moved: true,
            ..following.clone()
        };
        assert_eq!(
            next_step(&replica, &readdressed, DEADLINE),
            Step::Follow("a".into())
        );
        let expired = Observation {
            lease_expired: true,
            ..following.clone()
        };
        assert_eq!(next_step(&replica, &expired, DEADLINE), Step::RunForPrimary);
        let handed = Observation {
            lease_holder: Some("b".into()),
            lease_is_mine: true,
            ..seen()
        };
        assert_eq!(
            next_step(&replica, &handed, DEADLINE),
            Step::PromoteHandedOver
        );
        let outage = Observation {
            api_reachable: false,
            lease_expired: true,
            ..Observation::default()
        };
        assert_eq!(next_step(&replica, &outage, DEADLINE), Step::Stay);
    }

    #[test]
    fn the_synchronous_set_grows_with_streaming_replicas_and_keeps_members_that_are_down() {
        let pods: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let set = next_synchronous_set(&[], &["b".into()], &pods, "a");
        assert_eq!(set, vec!["b".to_string()]);
        let set = next_synchronous_set(&set, &["c".into()], &pods, "a");
        assert_eq!(set, vec!["b".to_string(), "c".to_string()]);
        // b is down: it stays; a pod that was deleted goes; the primary itself never appears.
        let set = next_synchronous_set(&set, &[], &["a".into(), "b".into()], "b");
        assert!(set.is_empty());
        let set = next_synchronous_set(&["a".into(), "c".into()], &[], &pods, "b");
        assert_eq!(set, vec!["a".to_string(), "c".to_string()]);
    }

    #[test]
    fn priority_and_preferred_policies() {
        let first = SyncPolicy {
            number: 1,
            first: true,
            preferred: false,
        };
        assert_eq!(
            standby_names(&["b".into(), "c".into()], first),
            "FIRST 1 (\"b\", \"c\")"
        );
        let pods: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let previous: Vec<String> = vec!["b".into(), "c".into()];
        let required = next_synchronous_set_for(&previous, &["c".into()], &pods, "a", first);
        assert_eq!(required, previous, "a standby that is down stays");
        let preferred = SyncPolicy {
            preferred: true,
            ..first
        };
        let set = next_synchronous_set_for(&previous, &["c".into()], &pods, "a", preferred);
        assert_eq!(set, vec!["c".to_string()], "only what streams");
        assert!(next_synchronous_set_for(&previous, &[], &pods, "a", preferred).is_empty());
    }

    #[test]
    fn synchronous_names_list_every_replica() {
        assert_eq!(synchronous_standby_names(&["b".into()], 2), "ANY 1 (\"b\")");
        assert_eq!(
            synchronous_standby_names(&["b-2".into(), "a-1".into()], 1),
            "ANY 1 (\"a_1\", \"b_2\")"
        );
        assert_eq!(synchronous_standby_names(&["a".into()], 0), "");
        assert_eq!(synchronous_standby_names(&[], 1), "");
    }

    fn peer(name: &str, lsn: Option<u64>) -> PeerPosition {
        PeerPosition {
            name: name.into(),
            received_lsn: lsn,
            fenced: false,
        }
    }

    #[test]
    fn the_most_advanced_replica_wins_and_ties_go_to_the_lowest_name() {
        assert_eq!(
            candidacy("b", 100, &[peer("c", Some(90))], &[], 0),
            Candidacy::Promote
        );
        assert!(matches!(
            candidacy("b", 100, &[peer("c", Some(110))], &[], 0),
            Candidacy::Wait(_)
        ));
        assert!(matches!(
            candidacy("b", 100, &[peer("a", Some(100))], &[], 0),
            Candidacy::Wait(_)
        ));
        assert_eq!(
            candidacy("a", 100, &[peer("b", Some(100))], &[], 0),
            Candidacy::Promote
        );
        assert_eq!(
            candidacy("b", 100, &[peer("c", None)], &[], 0),
            Candidacy::Promote
        );
    }

    #[test]
    fn synchronous_promotion_needs_a_quorum_of_the_synchronous_set() {
        let set: Vec<String> = vec!["b".into(), "c".into()];
        // ANY 1 of 2: seeing this replica alone (1 of the 2 needed) is not enough.
        assert!(matches!(
            candidacy("b", 100, &[peer("c", None)], &set, 1),
            Candidacy::Wait(_)
        ));
        assert_eq!(
            candidacy("b", 100, &[peer("c", Some(100))], &set, 1),
            Candidacy::Promote
        );
        // ANY 2 of 2: every acknowledged commit is on both; one is enough.
        assert_eq!(
            candidacy("b", 100, &[peer("c", None)], &set, 2),
            Candidacy::Promote
        );
        // Not in the set: never.
        assert!(matches!(
            candidacy("d", 500, &[peer("b", Some(1))], &set, 1),
            Candidacy::Wait(_)
        ));
    }

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0000_00A0), "1/A0");
        assert_eq!(parse_lsn("bad"), None);
    }
}
