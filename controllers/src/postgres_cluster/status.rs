//! The status a cluster should report, computed from what was observed (pure).

use api::common::{condition, new_condition, set_condition};
use api::contract;
use api::postgres_cluster::{InstanceStatus, PostgresCluster, PostgresClusterStatus};

use kube::ResourceExt;

use super::instances::{InstanceView, primary};
use super::rolling::RollingStep;

/// Coarse state of a cluster (`status.phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Instances are being created for the first time.
    Creating,
    /// Every instance is ready and a primary serves.
    Healthy,
    /// Something needs attention: the Degraded condition says what.
    Degraded,
    /// A rolling update is under way.
    Upgrading,
    /// A switchover is under way.
    SwitchingOver,
    /// Scaled to zero pods; volumes kept.
    Hibernated,
}

impl Phase {
    /// The phase as written into the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "Creating",
            Phase::Healthy => "Healthy",
            Phase::Degraded => "Degraded",
            Phase::Upgrading => "Upgrading",
            Phase::SwitchingOver => "SwitchingOver",
            Phase::Hibernated => "Hibernated",
        }
    }
}

/// A problem in the spec's surroundings that the API server could not reject (a missing Secret,
/// a catalog without the requested version): the cluster is Degraded until it is fixed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Condition reason (CamelCase), also the Degraded condition's reason as it is.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// Reason of the Ready and Progressing conditions while a Job restores the first instance's
/// volume from a BackupJob's claim (`spec.bootstrap.volume`): the cluster is being created.
pub const RESTORING_FROM_VOLUME: &str = "RestoringFromVolume";

/// Reason of the Ready, Progressing and Degraded conditions when an instance reports that the
/// cluster's only data is lost (its `dataLost` status) and no primary serves.
pub const DATA_LOST: &str = "DataLost";

/// Reason of the Ready and Progressing conditions while a supervised update waits for a user's
/// switchover (`primaryUpdateStrategy: supervised`).
pub const WAITING_FOR_USER: &str = "WaitingForUser";

/// What a supervised update waits for, and how to give it.
pub fn supervised_message(cluster: &str, primary: &str, to: Option<&str>) -> String {
    match to {
        Some(to) => format!(
            "rolling update: every replica runs the new spec; primaryUpdateStrategy is supervised, so primary {primary} is updated after a switchover: run `kubectl pg switchover {cluster} --to {to}` (or set spec.switchoverTo: {to})"
        ),
        None => format!(
            "rolling update: primaryUpdateStrategy is supervised and {primary} is the only instance: delete pod {primary} to update it (PostgreSQL is down until the new pod is ready)"
        ),
    }
}

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    /// The cluster.
    pub cluster: &'a PostgresCluster,
    /// The instance pods that exist.
    pub instances: &'a [InstanceView],
    /// Resolved image, when it could be resolved.
    pub image: Option<String>,
    /// A problem that blocks the desired state.
    pub problem: Option<Problem>,
    /// The rolling update's next step.
    pub step: RollingStep,
    /// Target of a switchover in flight (from the Lease annotation).
    pub switchover_to: Option<String>,
    /// Whether the cluster is hibernated.
    pub hibernated: bool,
    /// The `CertificateAuthority` condition, with the operator's CA.
    pub certificate_authority: Option<crate::tls::rotation::Condition>,
}

/// The status for `observation`, keeping condition transition times of `previous`.
pub fn desired_status(
    previous: Option<&PostgresClusterStatus>,
    observation: &Observation<'_>,
) -> PostgresClusterStatus {
    let cluster = observation.cluster;
    let generation = cluster.metadata.generation;
    let instances = cluster.spec.instances;
    let live: Vec<&InstanceView> = observation
        .instances
        .iter()
        .filter(|i| !i.terminating)
        .collect();
    let ready = live.iter().filter(|i| i.ready).count() as i32;
    let current_primary = primary(observation.instances);
    let previous_primary = previous.and_then(|status| status.current_primary.clone());
    let all_ready = ready >= instances && current_primary.is_some_and(|p| p.ready);
    // A cluster that has never been ready is being created, not degraded: its replicas clone one
    // after the other once the primary is up.
    let still_creating =
        previous.is_none_or(|status| matches!(status.phase.as_deref(), None | Some("Creating")));

    // (phase, ready, progressing, degraded), each condition with its reason and message.
    type Cond = (bool, &'static str, String);
    let (phase, ready_cond, progressing, degraded): (Phase, Cond, Cond, Cond) =
        if let Some(problem) = observation
            .problem
            .as_ref()
            .filter(|problem| problem.reason == RESTORING_FROM_VOLUME)
        {
            // Not a problem: the first instance's volume is being filled (spec.bootstrap.volume).
            (
                Phase::Creating,
                (false, RESTORING_FROM_VOLUME, problem.message.clone()),
                (true, RESTORING_FROM_VOLUME, problem.message.clone()),
                (false, "AsExpected", "no problem found".to_string()),
            )
        } else if let Some(problem) = &observation.problem {
            (
                Phase::Degraded,
                (false, "Degraded", problem.message.clone()),
                (false, "Blocked", problem.message.clone()),
                (true, problem.reason, problem.message.clone()),
            )
        } else if let Some(lost) = live
            .iter()
            .find_map(|instance| instance.data_lost.clone())
            .filter(|_| current_primary.is_none())
        {
            // The instance manager says the only copy is gone: waiting changes nothing, the
            // message says what the user can do.
            (
                Phase::Degraded,
                (false, DATA_LOST, lost.clone()),
                (false, DATA_LOST, lost.clone()),
                (true, DATA_LOST, lost),
            )
        } else if observation.hibernated {
            let message = "hibernated: no pods run, the volumes are kept".to_string();
            (
                Phase::Hibernated,
                (false, "Hibernated", message.clone()),
                (false, "Hibernated", message.clone()),
                (false, "Hibernated", message),
            )
        } else if let Some(target) = &observation.switchover_to {
            let message = format!("switchover to {target} in progress");
            (
                Phase::SwitchingOver,
                (all_ready, "Switchover", message.clone()),
                (true, "Switchover", message),
                (false, "AsExpected", "no problem found".to_string()),
            )
        } else if observation.step.is_rolling() {
            let message = match &observation.step {
                RollingStep::Wait { reason } => format!("rolling update: {reason}"),
                RollingStep::RecreateReplica { pod } => {
                    format!("rolling update: recreating replica {pod}")
                }
                RollingStep::Switchover { to, .. } => {
                    format!("rolling update: switching over to {to}")
                }
                RollingStep::ReplaceStuck { pod, problem } => {
                    format!("recreating {pod} from the new spec: on the old one {problem}")
                }
                RollingStep::RecreatePrimary { pod } => {
                    format!("rolling update: recreating primary {pod}")
                }
                RollingStep::Supervised { primary, to } => {
                    supervised_message(&observation.cluster.name_any(), primary, to.as_deref())
                }
                RollingStep::UpToDate => String::new(),
            };
            let reason = match &observation.step {
                RollingStep::Supervised { .. } => WAITING_FOR_USER,
                _ => "RollingUpdate",
            };
            (
                Phase::Upgrading,
                (all_ready, reason, message.clone()),
                (true, reason, message),
                (false, "AsExpected", "no problem found".to_string()),
            )
        } else if all_ready {
            (
                Phase::Healthy,
                (
                    true,
                    "AllInstancesReady",
                    format!("{ready} of {instances} instances ready"),
                ),
                (
                    false,
                    "UpToDate",
                    "every instance runs the current spec".to_string(),
                ),
                (false, "AsExpected", "no problem found".to_string()),
            )
        } else if still_creating || (previous_primary.is_none() && current_primary.is_none()) {
            let message = format!(
                "creating instances: {ready} of {instances} ready{}",
                waiting_on(&live)
            );
            (
                Phase::Creating,
                (false, "InstancesNotReady", message.clone()),
                (true, "CreatingInstances", message),
                (false, "AsExpected", "no problem found".to_string()),
            )
        } else {
            let message = match current_primary {
                None => format!("no primary: {ready} of {instances} instances ready"),
                Some(_) => format!("{ready} of {instances} instances ready"),
            } + &waiting_on(&live);
            let reason = if current_primary.is_none() {
                "NoPrimary"
            } else {
                "InstancesNotReady"
            };
            (
                Phase::Degraded,
                (false, reason, message.clone()),
                (false, "WaitingForInstances", message.clone()),
                (true, reason, message),
            )
        };

    let mut conditions = previous.map(|s| s.conditions.clone()).unwrap_or_default();
    for (type_, (status, reason, message)) in [
        (condition::READY, ready_cond),
        (condition::PROGRESSING, progressing),
        (condition::DEGRADED, degraded),
    ] {
        set_condition(
            &mut conditions,
            new_condition(type_, status, reason, message, generation),
        );
    }

    if let Some((status, reason, message)) = super::archiving::condition(observation.cluster, &live)
    {
        set_condition(
            &mut conditions,
            new_condition(
                super::archiving::CONTINUOUS_ARCHIVING,
                status,
                reason,
                message,
                generation,
            ),
        );
    }

    if let Some((status, reason, message)) =
        super::replica::condition(observation.cluster, current_primary)
    {
        set_condition(
            &mut conditions,
            new_condition(
                super::replica::REPLICA_CLUSTER,
                status,
                reason,
                message,
                generation,
            ),
        );
    }

    match &observation.certificate_authority {
        Some((status, reason, message)) => set_condition(
            &mut conditions,
            new_condition(
                crate::tls::rotation::CERTIFICATE_AUTHORITY,
                *status,
                reason,
                message.clone(),
                generation,
            ),
        ),
        // TLS turned off or handed to cert-manager: no CA of the operator's to speak of.
        None => conditions.retain(|c| c.type_ != crate::tls::rotation::CERTIFICATE_AUTHORITY),
    }

    let mut reported: Vec<InstanceStatus> = live
        .iter()
        .map(|instance| InstanceStatus {
            name: instance.name.clone(),
            role: instance.role.clone().unwrap_or_else(|| {
                if instance.ready {
                    "unknown"
                } else {
                    "starting"
                }
                .to_string()
            }),
            ready: instance.ready,
            timeline: instance.timeline,
            lag_bytes: instance.lag_bytes,
            last_join: instance.last_join.clone(),
            bootstrapping: instance.bootstrapping,
            last_error: instance.last_error.clone(),
        })
        .collect();
    reported.sort_by_key(|instance| instance.name.clone());

    PostgresClusterStatus {
        phase: Some(phase.as_str().to_string()),
        ready_instances: ready,
        current_primary: current_primary
            .map(|p| p.name.clone())
            .or(if observation.hibernated {
                None
            } else {
                previous_primary
            }),
        timeline: current_primary
            .and_then(|p| p.timeline)
            .or(previous.and_then(|s| s.timeline)),
        image: observation
            .image
            .clone()
            .or(previous.and_then(|s| s.image.clone())),
        instances: reported,
        conditions,
        observed_generation: generation,
    }
}

/// Why the instances that are not ready are not, for the end of a condition message: what
/// their pod's status says (`; db-0: not scheduled: ...`), else what their instance manager
/// says (`; db-0: <its last error>`, `; db-0: making the application role and database`).
/// Empty when none says anything (it is starting, or cloning).
fn waiting_on(live: &[&InstanceView]) -> String {
    let mut names: Vec<&&InstanceView> = live.iter().filter(|i| !i.ready).collect();
    names.sort_by_key(|instance| instance.name.clone());
    names
        .iter()
        .filter_map(|instance| {
            let what = match (&instance.pod_problem, &instance.last_error) {
                (Some(problem), _) => problem.as_str(),
                (None, Some(error)) => error.as_str(),
                (None, None) if instance.bootstrapping => {
                    "making the application role and database"
                }
                (None, None) if instance.role.as_deref() == Some(contract::role::UNKNOWN) => {
                    "was labelled primary when another instance took the Lease; waiting for its \
                     instance manager to report (out of reach of the API server?)"
                }
                (None, None) => return None,
            };
            Some(format!("; {}: {what}", instance.name))
        })
        .collect()
}

/// Whether two statuses differ in anything but condition timestamps.
pub fn differs(a: &PostgresClusterStatus, b: &PostgresClusterStatus) -> bool {
    let strip = |status: &PostgresClusterStatus| {
        let mut status = status.clone();
        for condition in &mut status.conditions {
            condition.last_transition_time =
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default());
        }
        status
    };
    strip(a) != strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::common::find_condition;
    use api::postgres_cluster::PostgresClusterSpec;

    fn cluster() -> PostgresCluster {
        let mut cluster = PostgresCluster::new("db", PostgresClusterSpec::with_image(2, "pg:18"));
        cluster.metadata.generation = Some(4);
        cluster
    }

    fn instance(ordinal: i32, role: &str, ready: bool) -> InstanceView {
        InstanceView {
            name: format!("db-{ordinal}"),
            ordinal,
            role: Some(role.to_string()),
            ready,
            timeline: Some(2),
            ..InstanceView::default()
        }
    }

    fn observe<'a>(cluster: &'a PostgresCluster, instances: &'a [InstanceView]) -> Observation<'a> {
        Observation {
            cluster,
            instances,
            image: Some("pg:18".into()),
            problem: None,
            step: RollingStep::UpToDate,
            switchover_to: None,
            hibernated: false,
            certificate_authority: None,
        }
    }

    fn condition_of(status: &PostgresClusterStatus, type_: &str) -> (String, String) {
        let c = find_condition(&status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn an_instance_that_lost_the_only_data_makes_the_cluster_degraded_with_its_reason() {
        let cluster = cluster();
        let lost = InstanceView {
            data_lost: Some("the data is lost: restore with spec.bootstrap.recovery".into()),
            ..instance(0, "replica", false)
        };
        let status = desired_status(None, &observe(&cluster, std::slice::from_ref(&lost)));
        assert_eq!(status.phase.as_deref(), Some("Degraded"));
        let degraded = find_condition(&status.conditions, "Degraded").unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", DATA_LOST)
        );
        assert!(degraded.message.contains("spec.bootstrap.recovery"));
        // Once a primary serves again, the report is history.
        let primary = instance(1, "primary", true);
        let status = desired_status(Some(&status), &observe(&cluster, &[lost, primary]));
        assert_ne!(condition_of(&status, "Degraded").1, DATA_LOST);
    }

    #[test]
    fn a_new_cluster_is_creating_and_then_healthy() {
        let cluster = cluster();
        let status = desired_status(None, &observe(&cluster, &[]));
        assert_eq!(status.phase.as_deref(), Some("Creating"));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(condition_of(&status, "Progressing").0, "True");
        assert_eq!(condition_of(&status, "Ready").0, "False");

        let pods = [instance(0, "primary", true), instance(1, "replica", true)];
        let status = desired_status(Some(&status), &observe(&cluster, &pods));
        assert_eq!(status.phase.as_deref(), Some("Healthy"));
        assert_eq!(status.ready_instances, 2);
        assert_eq!(status.current_primary.as_deref(), Some("db-0"));
        assert_eq!(status.timeline, Some(2));
        assert_eq!(
            condition_of(&status, "Ready"),
            ("True".into(), "AllInstancesReady".into())
        );
        assert_eq!(condition_of(&status, "Degraded").0, "False");
    }

    #[test]
    fn a_cluster_whose_replicas_are_still_cloning_is_creating_not_degraded() {
        let cluster = cluster();
        let creating = desired_status(None, &observe(&cluster, &[]));
        let pods = [instance(0, "primary", true), instance(1, "replica", false)];
        let status = desired_status(Some(&creating), &observe(&cluster, &pods));
        assert_eq!(status.phase.as_deref(), Some("Creating"));
        assert_eq!(condition_of(&status, "Degraded").0, "False");
        assert_eq!(status.current_primary.as_deref(), Some("db-0"));

        // Once it has been healthy, an instance that is not ready is a degradation.
        let healthy_pods = [instance(0, "primary", true), instance(1, "replica", true)];
        let healthy = desired_status(Some(&status), &observe(&cluster, &healthy_pods));
        assert_eq!(healthy.phase.as_deref(), Some("Healthy"));
        let status = desired_status(Some(&healthy), &observe(&cluster, &pods));
        assert_eq!(status.phase.as_deref(), Some("Degraded"));
    }

    #[test]
    fn what_an_instance_that_is_not_ready_reports_is_in_the_conditions_and_its_entry() {
        let cluster = cluster();
        let failing = InstanceView {
            role: None,
            last_error: Some("initdb failed (exit status: 1): invalid locale name".into()),
            ..instance(0, "primary", false)
        };
        let status = desired_status(None, &observe(&cluster, std::slice::from_ref(&failing)));
        assert_eq!(status.phase.as_deref(), Some("Creating"));
        let ready = find_condition(&status.conditions, "Ready").unwrap();
        assert_eq!(
            ready.message,
            "creating instances: 0 of 2 ready; db-0: initdb failed (exit status: 1): invalid locale name"
        );
        assert_eq!(status.instances[0].last_error, failing.last_error);

        // A primary still making the application role says so; a ready instance's error (a
        // step that failed once) is in its entry, not in the conditions.
        let pods = [
            InstanceView {
                bootstrapping: true,
                ..instance(0, "primary", false)
            },
            InstanceView {
                last_error: Some("a retried step".into()),
                ..instance(1, "replica", true)
            },
        ];
        let status = desired_status(Some(&status), &observe(&cluster, &pods));
        let progressing = find_condition(&status.conditions, "Progressing").unwrap();
        assert_eq!(
            progressing.message,
            "creating instances: 1 of 2 ready; db-0: making the application role and database"
        );
        assert!(status.instances[0].bootstrapping);
        assert_eq!(
            status.instances[1].last_error.as_deref(),
            Some("a retried step")
        );

        // After the cluster was healthy, the Degraded condition names the cause too.
        let healthy = [instance(0, "primary", true), instance(1, "replica", true)];
        let healthy = desired_status(Some(&status), &observe(&cluster, &healthy));
        let pods = [
            instance(0, "primary", true),
            InstanceView {
                last_error: Some("pg_rewind failed".into()),
                ..instance(1, "replica", false)
            },
        ];
        let status = desired_status(Some(&healthy), &observe(&cluster, &pods));
        let degraded = find_condition(&status.conditions, "Degraded").unwrap();
        assert_eq!(
            degraded.message,
            "1 of 2 instances ready; db-1: pg_rewind failed"
        );
    }

    #[test]
    fn a_problem_is_a_degraded_condition_with_its_reason() {
        let cluster = cluster();
        let mut observation = observe(&cluster, &[]);
        observation.problem = Some(Problem {
            reason: "SecretNotFound",
            message: "Secret mine not found".into(),
        });
        let status = desired_status(None, &observation);
        assert_eq!(status.phase.as_deref(), Some("Degraded"));
        assert_eq!(
            condition_of(&status, "Degraded"),
            ("True".into(), "SecretNotFound".into())
        );
    }

    #[test]
    fn an_old_primary_relabelled_unknown_keeps_the_cluster_from_healthy_and_says_why() {
        let cluster = cluster();
        let pods = [instance(0, "primary", true), instance(1, "replica", true)];
        let healthy = desired_status(None, &observe(&cluster, &pods));
        // db-1 took over; db-0 is out of reach, its label taken off by the operator.
        let pods = [instance(0, "unknown", false), instance(1, "primary", true)];
        let status = desired_status(Some(&healthy), &observe(&cluster, &pods));
        assert_eq!(status.phase.as_deref(), Some("Degraded"));
        assert_eq!(status.ready_instances, 1);
        assert_eq!(status.current_primary.as_deref(), Some("db-1"));
        let ready = find_condition(&status.conditions, "Ready").unwrap();
        assert!(
            ready.message.contains("db-0: was labelled primary"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn losing_the_primary_after_it_existed_is_degraded() {
        let cluster = cluster();
        let pods = [instance(0, "primary", true), instance(1, "replica", true)];
        let healthy = desired_status(None, &observe(&cluster, &pods));
        let pods = [instance(1, "replica", true)];
        let status = desired_status(Some(&healthy), &observe(&cluster, &pods));
        assert_eq!(status.phase.as_deref(), Some("Degraded"));
        assert_eq!(
            condition_of(&status, "Degraded"),
            ("True".into(), "NoPrimary".into())
        );
        assert!(!differs(
            &status,
            &desired_status(Some(&status), &observe(&cluster, &pods))
        ));
    }

    #[test]
    fn hibernation_and_rolling_updates_have_their_phases() {
        let cluster = cluster();
        let mut observation = observe(&cluster, &[]);
        observation.hibernated = true;
        assert_eq!(
            desired_status(None, &observation).phase.as_deref(),
            Some("Hibernated")
        );
        let pods = [instance(0, "primary", true), instance(1, "replica", true)];
        let mut observation = observe(&cluster, &pods);
        observation.step = RollingStep::RecreateReplica { pod: "db-1".into() };
        let status = desired_status(None, &observation);
        assert_eq!(status.phase.as_deref(), Some("Upgrading"));
        assert_eq!(
            condition_of(&status, "Progressing"),
            ("True".into(), "RollingUpdate".into())
        );
        // A supervised update waiting at the primary says what to run.
        observation.step = RollingStep::Supervised {
            primary: "db-0".into(),
            to: Some("db-1".into()),
        };
        let status = desired_status(None, &observation);
        assert_eq!(status.phase.as_deref(), Some("Upgrading"));
        assert_eq!(
            condition_of(&status, "Progressing"),
            ("True".into(), WAITING_FOR_USER.into())
        );
        let progressing = api::common::find_condition(&status.conditions, "Progressing").unwrap();
        assert!(
            progressing
                .message
                .contains("kubectl pg switchover db --to db-1"),
            "{}",
            progressing.message
        );
    }
}
