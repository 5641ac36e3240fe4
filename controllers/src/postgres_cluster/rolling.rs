//! The rolling update plan: which single step brings the instances closer to the template.
//! Replicas first (highest ordinal first, one at a time, each ready before the next), then a
//! switchover to an updated replica, then the old primary.

use api::postgres_cluster::PrimaryUpdateStrategy;

use super::instances::{InstanceView, primary};

/// The next step of a rolling update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollingStep {
    /// Every instance runs the current template.
    UpToDate,
    /// Some instances are outdated, but the next step must wait.
    Wait {
        /// Why, for the status message.
        reason: String,
    },
    /// Delete this outdated replica; the StatefulSet recreates it from the new template.
    RecreateReplica {
        /// Pod name.
        pod: String,
    },
    /// Only the primary is outdated: ask the instance managers to switch over to `to`.
    Switchover {
        /// The current (outdated) primary.
        from: String,
        /// An updated, ready replica.
        to: String,
    },
    /// A single-instance cluster's primary is outdated: recreate it (no replica to switch to).
    RecreatePrimary {
        /// Pod name.
        pod: String,
    },
    /// Only the primary is outdated and `primaryUpdateStrategy` is `supervised`: a user
    /// switches over (to `to`, an updated ready replica) or, without replicas, deletes the pod.
    Supervised {
        /// The current (outdated) primary.
        primary: String,
        /// The replica the operator would have switched over to.
        to: Option<String>,
    },
    /// An outdated pod that cannot run (not scheduled, its image cannot be pulled, a crash
    /// loop): recreate it at once, whatever the others do. It serves nothing, its volumes stay,
    /// and the new spec may be the user's fix for what keeps it from running.
    ReplaceStuck {
        /// Pod name.
        pod: String,
        /// What keeps it from running.
        problem: String,
    },
}

impl RollingStep {
    /// Whether a rolling update is under way (anything but [`RollingStep::UpToDate`]).
    pub fn is_rolling(&self) -> bool {
        !matches!(self, RollingStep::UpToDate)
    }
}

/// Plans the next step for `instances` (the pods that exist), given the number of instances the
/// StatefulSet should have, the template's spec hash, and whether a switchover is in flight.
pub fn plan(
    instances: &[InstanceView],
    expected: i32,
    desired_hash: &str,
    switchover_in_flight: bool,
) -> RollingStep {
    let outdated = |instance: &&InstanceView| instance.spec_hash.as_deref() != Some(desired_hash);
    if !instances.iter().any(|i| outdated(&i)) {
        return RollingStep::UpToDate;
    }
    let wait = |reason: &str| RollingStep::Wait {
        reason: reason.to_string(),
    };
    if switchover_in_flight {
        return wait("waiting for the switchover to complete");
    }
    if let Some((stuck, problem)) = instances
        .iter()
        .filter(|i| outdated(i) && !i.terminating)
        .find_map(|i| Some((i, i.pod_problem.as_ref()?)))
    {
        return RollingStep::ReplaceStuck {
            pod: stuck.name.clone(),
            problem: problem.clone(),
        };
    }
    let present = instances.iter().filter(|i| !i.terminating).count();
    if instances.iter().any(|i| i.terminating || !i.ready) || (present as i32) < expected {
        return wait("waiting for every instance to be ready before the next step");
    }
    let Some(current_primary) = primary(instances) else {
        return wait("waiting for an instance to report itself primary");
    };
    if let Some(replica) = instances
        .iter()
        .filter(|i| !i.is_primary())
        .filter(outdated)
        .max_by_key(|i| i.ordinal)
    {
        return RollingStep::RecreateReplica {
            pod: replica.name.clone(),
        };
    }
    // Only the primary is left.
    if let Some(target) = instances
        .iter()
        .filter(|i| !i.is_primary() && !outdated(i) && i.ready && !i.fenced)
        .min_by_key(|i| i.ordinal)
    {
        return RollingStep::Switchover {
            from: current_primary.name.clone(),
            to: target.name.clone(),
        };
    }
    if instances.len() == 1 {
        return RollingStep::RecreatePrimary {
            pod: current_primary.name.clone(),
        };
    }
    wait("no updated replica is ready to take over as primary")
}

/// The step `plan` chose, under the cluster's primary update strategy: with `supervised`, what
/// would update the primary (a switchover, recreating a lone primary) waits for the user.
pub fn supervise(step: RollingStep, strategy: PrimaryUpdateStrategy) -> RollingStep {
    match (strategy, step) {
        (PrimaryUpdateStrategy::Supervised, RollingStep::Switchover { from, to }) => {
            RollingStep::Supervised {
                primary: from,
                to: Some(to),
            }
        }
        (PrimaryUpdateStrategy::Supervised, RollingStep::RecreatePrimary { pod }) => {
            RollingStep::Supervised {
                primary: pod,
                to: None,
            }
        }
        (_, step) => step,
    }
}

/// What scaling down to `replicas` must do first: the StatefulSet removes the highest
/// ordinals, so a primary among them must hand over before it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleDown {
    /// Nothing in the way: the StatefulSet may have `replicas`.
    Proceed,
    /// Keep `keep` replicas (the primary's ordinal + 1) and switch over to `to` first.
    SwitchoverFirst {
        /// Replicas to keep for now.
        keep: i32,
        /// The current primary, about to be removed.
        from: String,
        /// A ready replica that stays.
        to: Option<String>,
    },
}

/// Plans a scale down to `replicas` (zero, for hibernation, takes everything down at once and
/// needs no switchover).
pub fn scale_down(instances: &[InstanceView], replicas: i32) -> ScaleDown {
    let Some(current) = primary(instances) else {
        return ScaleDown::Proceed;
    };
    if replicas == 0 || current.ordinal < replicas {
        return ScaleDown::Proceed;
    }
    let to = instances
        .iter()
        .filter(|i| i.ordinal < replicas && i.ready && !i.terminating && !i.fenced)
        .min_by_key(|i| i.ordinal)
        .map(|i| i.name.clone());
    ScaleDown::SwitchoverFirst {
        keep: current.ordinal + 1,
        from: current.name.clone(),
        to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_down_past_the_primary_switches_over_first() {
        let pods = [
            instance(0, "replica", "h"),
            instance(1, "replica", "h"),
            instance(2, "primary", "h"),
        ];
        assert_eq!(
            scale_down(&pods, 2),
            ScaleDown::SwitchoverFirst {
                keep: 3,
                from: "db-2".into(),
                to: Some("db-0".into())
            }
        );
        assert_eq!(scale_down(&pods, 3), ScaleDown::Proceed);
        assert_eq!(
            scale_down(&pods, 0),
            ScaleDown::Proceed,
            "hibernation stops everything"
        );
        let pods = [instance(0, "primary", "h"), instance(1, "replica", "h")];
        assert_eq!(scale_down(&pods, 1), ScaleDown::Proceed);
    }

    fn instance(ordinal: i32, role: &str, hash: &str) -> InstanceView {
        InstanceView {
            name: format!("db-{ordinal}"),
            ordinal,
            role: Some(role.to_string()),
            ready: true,
            spec_hash: Some(hash.to_string()),
            ..InstanceView::default()
        }
    }

    #[test]
    fn nothing_to_do_when_every_pod_runs_the_template() {
        let pods = [instance(0, "primary", "new"), instance(1, "replica", "new")];
        assert_eq!(plan(&pods, 2, "new", false), RollingStep::UpToDate);
    }

    #[test]
    fn a_full_roll_goes_replicas_first_then_switchover_then_old_primary() {
        let mut pods = vec![
            instance(0, "primary", "old"),
            instance(1, "replica", "old"),
            instance(2, "replica", "old"),
        ];
        assert_eq!(
            plan(&pods, 3, "new", false),
            RollingStep::RecreateReplica { pod: "db-2".into() }
        );
        // The replacement is not ready yet: wait.
        pods[2] = InstanceView {
            ready: false,
            ..instance(2, "replica", "new")
        };
        assert!(matches!(
            plan(&pods, 3, "new", false),
            RollingStep::Wait { .. }
        ));
        pods[2].ready = true;
        assert_eq!(
            plan(&pods, 3, "new", false),
            RollingStep::RecreateReplica { pod: "db-1".into() }
        );
        // Deleted and not yet recreated: wait.
        assert!(matches!(
            plan(&pods[..2], 3, "new", false),
            RollingStep::Wait { .. }
        ));
        pods[1] = instance(1, "replica", "new");
        assert_eq!(
            plan(&pods, 3, "new", false),
            RollingStep::Switchover {
                from: "db-0".into(),
                to: "db-1".into()
            }
        );
        assert!(matches!(
            plan(&pods, 3, "new", true),
            RollingStep::Wait { .. }
        ));
        // The switchover happened: db-1 leads, db-0 is an outdated replica.
        pods[0].role = Some("replica".into());
        pods[1].role = Some("primary".into());
        assert_eq!(
            plan(&pods, 3, "new", false),
            RollingStep::RecreateReplica { pod: "db-0".into() }
        );
        pods[0] = instance(0, "replica", "new");
        assert_eq!(plan(&pods, 3, "new", false), RollingStep::UpToDate);
    }

    #[test]
    fn an_outdated_pod_that_cannot_run_is_replaced_at_once() {
        // The only pod was never scheduled: nothing is ready and no one is primary, yet the new
        // spec (the user's fix) reaches it.
        let stuck = InstanceView {
            role: None,
            ready: false,
            pod_problem: Some("not scheduled: 0/1 nodes are available".into()),
            ..instance(0, "primary", "old")
        };
        assert_eq!(
            plan(std::slice::from_ref(&stuck), 1, "new", false),
            RollingStep::ReplaceStuck {
                pod: "db-0".into(),
                problem: "not scheduled: 0/1 nodes are available".into()
            }
        );
        // A replica whose new image cannot be pulled is not "outdated" and waits for the user;
        // one on the old spec is replaced even while another replica is not ready.
        let pods = [
            instance(0, "primary", "old"),
            InstanceView {
                ready: false,
                ..instance(1, "replica", "new")
            },
            InstanceView {
                ready: false,
                pod_problem: Some("container postgres: ImagePullBackOff".into()),
                ..instance(2, "replica", "old")
            },
        ];
        assert!(matches!(
            plan(&pods, 3, "new", false),
            RollingStep::ReplaceStuck { pod, .. } if pod == "db-2"
        ));
    }

    #[test]
    fn a_single_instance_is_recreated_in_place() {
        let pods = [instance(0, "primary", "old")];
        assert_eq!(
            plan(&pods, 1, "new", false),
            RollingStep::RecreatePrimary { pod: "db-0".into() }
        );
    }

    #[test]
    fn a_supervised_update_stops_before_the_primary_and_goes_on_after_the_users_switchover() {
        let supervised = |pods: &[InstanceView]| {
            supervise(
                plan(pods, 2, "new", false),
                PrimaryUpdateStrategy::Supervised,
            )
        };
        let mut pods = [instance(0, "primary", "old"), instance(1, "replica", "old")];
        // Replicas are updated as usual.
        assert_eq!(
            supervised(&pods),
            RollingStep::RecreateReplica { pod: "db-1".into() }
        );
        pods[1] = instance(1, "replica", "new");
        assert_eq!(
            supervised(&pods),
            RollingStep::Supervised {
                primary: "db-0".into(),
                to: Some("db-1".into())
            }
        );
        // The user switched over: the old primary is an outdated replica, updated as usual.
        pods[0].role = Some("replica".into());
        pods[1].role = Some("primary".into());
        assert_eq!(
            supervised(&pods),
            RollingStep::RecreateReplica { pod: "db-0".into() }
        );
        // A lone primary waits for its pod to be deleted; unsupervised changes nothing.
        let lone = [instance(0, "primary", "old")];
        assert_eq!(
            supervise(
                plan(&lone, 1, "new", false),
                PrimaryUpdateStrategy::Supervised
            ),
            RollingStep::Supervised {
                primary: "db-0".into(),
                to: None
            }
        );
        assert_eq!(
            supervise(
                plan(&lone, 1, "new", false),
                PrimaryUpdateStrategy::Unsupervised
            ),
            RollingStep::RecreatePrimary { pod: "db-0".into() }
        );
    }

    #[test]
    fn no_step_without_a_primary_or_with_a_terminating_pod() {
        let pods = [instance(0, "replica", "old"), instance(1, "replica", "old")];
        assert!(matches!(
            plan(&pods, 2, "new", false),
            RollingStep::Wait { .. }
        ));
        let mut pods = [instance(0, "primary", "old"), instance(1, "replica", "old")];
        pods[1].terminating = true;
        assert!(matches!(
            plan(&pods, 2, "new", false),
            RollingStep::Wait { .. }
        ));
    }
}
