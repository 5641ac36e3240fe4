//! When the bootstrap of a new cluster (initdb, or a restore) starts over instead of stalling: the
//! first primary was killed in the middle of initdb, or it lost its volume before any replica held
//! a copy of the data. Pure: the manager gathers the facts and acts.
//!
//! After bootstrap a lost primary is replaced by failover, never by a new initdb: the Lease says
//! when the cluster's data first existed in two places ([`contract::ANNOTATION_BOOTSTRAPPED`]).

use std::time::Duration;

use api::contract;

/// File in the run folder (on the data volume) while initdb runs: a data directory found with it
/// is an initdb that did not finish (PG_VERSION is written first, `postgresql.conf` last).
pub const INITDB_MARKER: &str = "initdb-incomplete";

/// A cluster that never gets a replica (one instance) counts as bootstrapped after serving this
/// long as primary: from then on losing its only volume is a loss to restore from a backup, not
/// a bootstrap to start over (see the README's high availability table).
pub const SINGLE_INSTANCE_GRACE: Duration = Duration::from_secs(600);

/// What the manager knows when it finds no usable data directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts {
    /// `PG_VERSION` exists in the data directory.
    pub has_data: bool,
    /// [`INITDB_MARKER`] exists.
    pub initdb_marker: bool,
    /// A clone or restore marker exists (those have their own resumption).
    pub other_marker: bool,
    /// The Lease names this instance, or nobody.
    pub holder_is_me_or_nobody: bool,
    /// The Lease carries [`contract::ANNOTATION_BOOTSTRAPPED`].
    pub bootstrapped: bool,
}

/// Why the bootstrap starts over, when it does: the text of the event and the log line.
pub fn start_again(facts: Facts) -> Option<&'static str> {
    if !facts.holder_is_me_or_nobody {
        // Another instance is primary: this one clones from it instead.
        return None;
    }
    if facts.initdb_marker {
        return Some(
            "initdb of the first primary did not finish (the instance stopped in the middle): the data directory is emptied and initdb runs again",
        );
    }
    if !facts.has_data && !facts.other_marker && !facts.bootstrapped {
        return Some(
            "the first primary's data directory is empty and no replica had a copy yet (the volume was lost during the bootstrap): the cluster is bootstrapped again",
        );
    }
    None
}

/// How long an instance finds itself stranded (see [`stranded`]) before it says so, in Lease
/// durations: long enough for a replica with data to take an expired Lease first, so a
/// multi-instance cluster whose primary lost its volume fails over without a false alarm.
pub const STRANDED_AFTER_LEASES: u32 = 2;

/// Why this instance cannot ever start by itself, when that is so: its data directory is empty,
/// the cluster was bootstrapped (so it may only clone), and no live primary holds the Lease to
/// clone from (`facts.holder_is_me_or_nobody` here counts an expired holder as nobody). The
/// text goes to the instance status (`dataLost`), a `DataLost` event and the cluster's `DataLost`
/// condition, and says what the user can do.
pub fn stranded(facts: Facts, lease: &str) -> Option<String> {
    if facts.has_data || facts.other_marker || facts.initdb_marker || !facts.bootstrapped {
        return None;
    }
    if !facts.holder_is_me_or_nobody {
        return None;
    }
    Some(format!(
        "the data directory is empty and no instance holds a copy to clone from: the cluster's data is lost \
         (the Lease {lease} carries {annotation}, so an empty instance may only clone). \
         To restore it, create the cluster again with spec.bootstrap.recovery from a backup; \
         if the data is expendable, remove the annotation {annotation} from the Lease {lease} \
         and this instance bootstraps a new, empty cluster",
        annotation = contract::ANNOTATION_BOOTSTRAPPED,
    ))
}

/// Whether the primary should now mark the Lease bootstrapped: a replica streams from it (the
/// data exists twice), or it has served alone for [`SINGLE_INSTANCE_GRACE`].
pub fn now_bootstrapped(streaming_replicas: i64, serving_for: Duration) -> bool {
    streaming_replicas > 0 || serving_for >= SINGLE_INSTANCE_GRACE
}

/// The annotation the primary writes once [`now_bootstrapped`] holds.
pub fn annotation() -> (&'static str, Option<String>) {
    (contract::ANNOTATION_BOOTSTRAPPED, Some("true".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            holder_is_me_or_nobody: true,
            ..Facts::default()
        }
    }

    #[test]
    fn an_interrupted_initdb_runs_again_even_with_a_partial_data_directory() {
        let found = start_again(Facts {
            has_data: true,
            initdb_marker: true,
            ..facts()
        });
        assert!(found.unwrap().contains("initdb"));
    }

    #[test]
    fn an_empty_first_primary_starts_over_only_before_the_data_existed_twice() {
        assert!(start_again(facts()).is_some());
        assert_eq!(
            start_again(Facts {
                bootstrapped: true,
                ..facts()
            }),
            None,
            "after bootstrap an empty instance clones, it never runs initdb"
        );
    }

    #[test]
    fn an_instance_that_another_one_leads_never_starts_over() {
        for initdb_marker in [false, true] {
            let found = start_again(Facts {
                initdb_marker,
                holder_is_me_or_nobody: false,
                ..facts()
            });
            assert_eq!(found, None);
        }
    }

    #[test]
    fn data_on_disk_or_a_clone_in_progress_is_not_a_lost_bootstrap() {
        for (has_data, other_marker) in [(true, false), (false, true)] {
            let found = start_again(Facts {
                has_data,
                other_marker,
                ..facts()
            });
            assert_eq!(found, None);
        }
    }

    #[test]
    fn only_an_empty_instance_of_a_bootstrapped_cluster_with_no_primary_is_stranded() {
        let lost = Facts {
            bootstrapped: true,
            ..facts()
        };
        let text = stranded(lost, "db-primary").unwrap();
        assert!(text.contains("spec.bootstrap.recovery"), "{text}");
        assert!(text.contains(contract::ANNOTATION_BOOTSTRAPPED), "{text}");
        for not_lost in [
            facts(),
            Facts {
                has_data: true,
                ..lost
            },
            Facts {
                other_marker: true,
                ..lost
            },
            Facts {
                initdb_marker: true,
                ..lost
            },
            Facts {
                holder_is_me_or_nobody: false,
                ..lost
            },
        ] {
            assert_eq!(stranded(not_lost, "db-primary"), None, "{not_lost:?}");
        }
    }

    #[test]
    fn bootstrapped_once_a_replica_streams_or_a_lone_primary_served_a_while() {
        assert!(!now_bootstrapped(0, Duration::from_secs(5)));
        assert!(now_bootstrapped(1, Duration::ZERO));
        assert!(now_bootstrapped(0, SINGLE_INSTANCE_GRACE));
    }
}
