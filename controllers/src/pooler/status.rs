//! Pure status of a Pooler: ready pods, endpoint and the Ready/Progressing/Degraded conditions,
//! set through one helper.

use api::common::{condition, new_condition, set_condition};
use api::pooler::{Pooler, PoolerStatus};

use super::builders;

/// What the reconcile saw, as far as status is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Objects applied; `ready` of the wanted pods are ready.
    Applied {
        /// Ready PgBouncer pods.
        ready: i32,
        /// Why the pods that do not run do not (`; <pod>: not scheduled: ...`), from their own
        /// status; empty when none is stuck.
        waiting: String,
    },
    /// The spec or its surroundings need the user's attention: reason and message say what.
    Blocked {
        /// CamelCase reason.
        reason: String,
        /// What to fix.
        message: String,
    },
}

/// The status the Pooler should have after this reconcile.
pub fn desired_status(pooler: &Pooler, outcome: &Outcome) -> PoolerStatus {
    let mut status = pooler.status.clone().unwrap_or_default();
    let generation = pooler.metadata.generation;
    status.observed_generation = generation;
    status.endpoint = Some(builders::endpoint(pooler));
    let wanted = pooler.spec.instances;
    let conditions = match outcome {
        Outcome::Applied { ready, waiting } => {
            status.ready_instances = *ready;
            let all = *ready >= wanted;
            [
                new_condition(
                    condition::READY,
                    all,
                    if all {
                        "AllInstancesReady"
                    } else {
                        "InstancesNotReady"
                    },
                    format!("{ready} of {wanted} PgBouncer pods ready{waiting}"),
                    generation,
                ),
                new_condition(
                    condition::PROGRESSING,
                    !all,
                    if all { "Reconciled" } else { "WaitingForPods" },
                    "",
                    generation,
                ),
                new_condition(condition::DEGRADED, false, "Reconciled", "", generation),
            ]
        }
        Outcome::Blocked { reason, message } => [
            new_condition(
                condition::READY,
                status.ready_instances >= wanted,
                reason,
                message.clone(),
                generation,
            ),
            new_condition(condition::PROGRESSING, false, reason, "", generation),
            new_condition(
                condition::DEGRADED,
                true,
                reason,
                message.clone(),
                generation,
            ),
        ],
    };
    for condition in conditions {
        set_condition(&mut status.conditions, condition);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::common::{ClusterReference, find_condition};
    use api::pooler::{PgBouncerSpec, PoolerSpec, PoolerType};

    fn pooler() -> Pooler {
        let mut pooler = Pooler::new(
            "pool",
            PoolerSpec {
                cluster: ClusterReference { name: "db".into() },
                type_: PoolerType::Rw,
                instances: 2,
                pgbouncer: PgBouncerSpec::default(),
                resources: None,
                service: None,
            },
        );
        pooler.metadata.namespace = Some("ns".into());
        pooler.metadata.generation = Some(3);
        pooler
    }

    #[test]
    fn ready_when_every_pod_is_ready_degraded_when_blocked() {
        let mut pooler = pooler();
        let status = desired_status(
            &pooler,
            &Outcome::Applied {
                ready: 1,
                waiting: "; pool-abc: not scheduled: 0/1 nodes are available".into(),
            },
        );
        let ready = find_condition(&status.conditions, "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.message,
            "1 of 2 PgBouncer pods ready; pool-abc: not scheduled: 0/1 nodes are available"
        );
        assert_eq!(status.endpoint.as_deref(), Some("pool.ns.svc:5432"));
        let status = desired_status(
            &pooler,
            &Outcome::Applied {
                ready: 2,
                waiting: String::new(),
            },
        );
        assert_eq!(
            find_condition(&status.conditions, "Ready").unwrap().status,
            "True"
        );
        assert_eq!(status.observed_generation, Some(3));
        pooler.status = Some(status);
        let status = desired_status(
            &pooler,
            &Outcome::Blocked {
                reason: "ClusterNotFound".into(),
                message: "PostgresCluster db not found".into(),
            },
        );
        let degraded = find_condition(&status.conditions, "Degraded").unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ClusterNotFound")
        );
    }
}
