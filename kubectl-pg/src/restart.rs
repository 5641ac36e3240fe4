//! The order of a rolling restart (pure): replicas first, the primary last, so that the cluster
//! keeps a primary and all but one replica at every step.

use crate::view::InstanceRow;

/// Pods to restart, in order. `instances` come primary first (as `view::cluster_view` sorts them).
pub fn order(instances: &[InstanceRow]) -> Vec<String> {
    let (primaries, others): (Vec<&InstanceRow>, Vec<&InstanceRow>) = instances
        .iter()
        .filter(|i| !i.terminating)
        .partition(|i| i.is_primary());
    others
        .into_iter()
        .chain(primaries)
        .map(|i| i.pod.clone())
        .collect()
}

/// Whether the instance manager of `instance` reports having handled `token`.
pub fn done(instance: &InstanceRow, token: &str) -> bool {
    instance.restart_token.as_deref() == Some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_go_first_and_the_primary_last() {
        let row = |pod: &str, role: &str| InstanceRow {
            pod: pod.into(),
            role: role.into(),
            ..InstanceRow::default()
        };
        let mut leaving = row("db-3", "replica");
        leaving.terminating = true;
        let instances = [
            row("db-1", "primary"),
            row("db-0", "replica"),
            row("db-2", "replica"),
            leaving,
        ];
        assert_eq!(order(&instances), ["db-0", "db-2", "db-1"]);
    }
}
