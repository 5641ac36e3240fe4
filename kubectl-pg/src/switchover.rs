//! Which replica a switchover promotes (pure): the one named, if it can take over, else the most
//! advanced ready replica.

use crate::error::Error;
use crate::lsn;
use crate::view::InstanceRow;

/// Picks the pod to promote among `instances` (the cluster's pods), or says why there is none.
pub fn choose_target(
    cluster: &str,
    instances: &[InstanceRow],
    requested: Option<&str>,
) -> Result<String, Error> {
    let primary = instances.iter().find(|i| i.is_primary());
    let Some(primary) = primary else {
        return Err(Error::Refused(format!(
            "PostgresCluster {cluster} has no primary (no pod is labelled role=primary): there is nothing to switch over from; check `kubectl pg status {cluster}`"
        )));
    };
    if let Some(pod) = requested {
        let Some(target) = instances.iter().find(|i| i.pod == pod) else {
            return Err(Error::PodNotFound {
                pod: pod.to_string(),
                cluster: cluster.to_string(),
                instances: names(instances),
            });
        };
        if target.is_primary() {
            return Err(Error::Refused(format!(
                "{pod} is already the primary of {cluster}"
            )));
        }
        if let Some(why) = ineligible(target) {
            return Err(Error::Refused(format!(
                "{pod} cannot take over: {why}; pick another replica or omit the pod to let kubectl pg choose"
            )));
        }
        return Ok(pod.to_string());
    }
    instances
        .iter()
        .filter(|i| i.pod != primary.pod && ineligible(i).is_none())
        .max_by(|a, b| {
            position(a)
                .cmp(&position(b))
                .then_with(|| b.lag_bytes.unwrap_or(u64::MAX).cmp(&a.lag_bytes.unwrap_or(u64::MAX)))
                .then_with(|| b.pod.cmp(&a.pod))
        })
        .map(|target| target.pod.clone())
        .ok_or_else(|| {
            Error::Refused(format!(
                "no replica of {cluster} can take over (a candidate must be a ready, unfenced replica); instances: {}",
                instances
                    .iter()
                    .map(|i| format!("{} {} {}", i.pod, i.role, i.status))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Why an instance cannot be promoted, if it cannot.
fn ineligible(instance: &InstanceRow) -> Option<&'static str> {
    if instance.terminating {
        Some("its pod is being deleted")
    } else if instance.fenced {
        Some("it is fenced (unfence it first)")
    } else if instance.role != api::contract::role::REPLICA {
        Some("it is not a streaming replica")
    } else if !instance.ready {
        Some("it is not ready")
    } else {
        None
    }
}

/// The WAL a replica has received (unknown sorts first).
fn position(instance: &InstanceRow) -> Option<u64> {
    instance.lsn.as_deref().and_then(lsn::parse)
}

fn names(instances: &[InstanceRow]) -> String {
    if instances.is_empty() {
        return "none".to_string();
    }
    instances
        .iter()
        .map(|i| i.pod.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pod: &str, role: &str, ready: bool, lsn: Option<&str>) -> InstanceRow {
        InstanceRow {
            pod: pod.into(),
            role: role.into(),
            status: if ready { "ready" } else { "not-ready" }.into(),
            ready,
            lsn: lsn.map(str::to_string),
            ..InstanceRow::default()
        }
    }

    #[test]
    fn the_most_advanced_ready_replica_is_chosen() {
        let instances = [
            row("db-0", "primary", true, Some("0/9000000")),
            row("db-1", "replica", true, Some("0/8000000")),
            row("db-2", "replica", true, Some("0/8F00000")),
            row("db-3", "replica", false, Some("0/9000000")),
        ];
        assert_eq!(choose_target("db", &instances, None).unwrap(), "db-2");
    }

    #[test]
    fn a_named_target_is_checked() {
        let mut fenced = row("db-2", "replica", true, None);
        fenced.fenced = true;
        let instances = [
            row("db-0", "primary", true, None),
            row("db-1", "replica", true, None),
            fenced,
        ];
        assert_eq!(
            choose_target("db", &instances, Some("db-1")).unwrap(),
            "db-1"
        );
        let error = |pod| {
            choose_target("db", &instances, Some(pod))
                .unwrap_err()
                .to_string()
        };
        assert!(
            error("db-0").contains("already the primary"),
            "{}",
            error("db-0")
        );
        assert!(error("db-2").contains("fenced"), "{}", error("db-2"));
        assert!(error("db-9").contains("not an instance of PostgresCluster db"));
        assert!(error("db-9").contains("db-0, db-1, db-2"));
    }

    #[test]
    fn no_replica_or_no_primary_is_an_error_that_says_so() {
        let alone = [
            row("db-0", "primary", true, None),
            row("db-1", "replica", false, None),
        ];
        let error = choose_target("db", &alone, None).unwrap_err().to_string();
        assert!(error.contains("no replica of db can take over"), "{error}");
        let headless = [row("db-1", "replica", true, None)];
        let error = choose_target("db", &headless, None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no primary"), "{error}");
    }
}
