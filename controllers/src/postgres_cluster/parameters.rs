//! Which PostgreSQL parameters need a restart and which a reload, and the plan for a change.

use std::collections::BTreeMap;

/// PostgreSQL 18 parameters of context `postmaster`: a new value takes effect only after a
/// restart. Every other parameter is applied by a reload (`pg_reload_conf()`).
pub const RESTART_PARAMETERS: &[&str] = &[
    "archive_mode",
    "autovacuum_worker_slots",
    "cluster_name",
    "commit_timestamp_buffers",
    "data_sync_retry",
    "dynamic_shared_memory_type",
    "event_source",
    "hot_standby",
    "huge_page_size",
    "huge_pages",
    "io_max_combine_limit",
    "io_max_concurrency",
    "io_method",
    "jit_provider",
    "logging_collector",
    "max_connections",
    "max_files_per_process",
    "max_locks_per_transaction",
    "max_logical_replication_workers",
    "max_notify_queue_pages",
    "max_pred_locks_per_transaction",
    "max_prepared_transactions",
    "max_replication_slots",
    "max_wal_senders",
    "max_worker_processes",
    "min_dynamic_shared_memory",
    "multixact_member_buffers",
    "multixact_offset_buffers",
    "notify_buffers",
    "reserved_connections",
    "serializable_buffers",
    "shared_buffers",
    "shared_memory_type",
    "shared_preload_libraries",
    "subtransaction_buffers",
    "superuser_reserved_connections",
    "track_activity_query_size",
    "track_commit_timestamp",
    "transaction_buffers",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
    "wal_buffers",
    "wal_decode_buffer_size",
    "wal_level",
    "wal_log_hints",
];

/// Whether changing `name` needs a PostgreSQL restart.
pub fn needs_restart(name: &str) -> bool {
    RESTART_PARAMETERS.contains(&name.to_ascii_lowercase().as_str())
}

/// The restart-only subset of `parameters`.
pub fn restart_only(parameters: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    parameters
        .iter()
        .filter(|(name, _)| needs_restart(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Reads back the `name = 'value'` lines the operator writes into postgresql.conf.
pub fn parse_conf(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(" = ")?;
            let value = value.strip_prefix('\'')?.strip_suffix('\'')?;
            Some((name.trim().to_string(), value.replace("''", "'")))
        })
        .collect()
}

/// How a change of parameters reaches the running instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParameterChange {
    /// Nothing changed.
    None,
    /// Only reloadable parameters changed: the new ConfigMap is enough, no instance restarts.
    Reload {
        /// Names of the changed (added, modified or removed) parameters.
        changed: Vec<String>,
    },
    /// At least one parameter needs a restart: the cluster rolls (replicas first, switchover,
    /// then the old primary).
    Restart {
        /// Names of the changed parameters that need the restart.
        restart: Vec<String>,
        /// Names of the other changed parameters (a reload applies them at once).
        reload: Vec<String>,
    },
}

impl ParameterChange {
    /// The plan for going from `old` to `new`.
    pub fn between(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Self {
        let mut changed: Vec<String> = new
            .iter()
            .filter(|(name, value)| old.get(*name) != Some(*value))
            .map(|(name, _)| name.clone())
            .collect();
        changed.extend(old.keys().filter(|name| !new.contains_key(*name)).cloned());
        changed.sort();
        if changed.is_empty() {
            return ParameterChange::None;
        }
        let (restart, reload): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|name| needs_restart(name));
        if restart.is_empty() {
            ParameterChange::Reload { changed: reload }
        } else {
            ParameterChange::Restart { restart, reload }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reloadable_changes_need_no_restart() {
        let old = params(&[("work_mem", "4MB"), ("shared_buffers", "128MB")]);
        let new = params(&[
            ("work_mem", "64MB"),
            ("shared_buffers", "128MB"),
            ("log_min_duration_statement", "250"),
        ]);
        assert_eq!(
            ParameterChange::between(&old, &new),
            ParameterChange::Reload {
                changed: vec!["log_min_duration_statement".into(), "work_mem".into()]
            }
        );
    }

    #[test]
    fn a_postmaster_parameter_makes_the_cluster_roll() {
        let old = params(&[("work_mem", "4MB"), ("shared_buffers", "128MB")]);
        let new = params(&[("work_mem", "8MB"), ("shared_buffers", "1GB")]);
        assert_eq!(
            ParameterChange::between(&old, &new),
            ParameterChange::Restart {
                restart: vec!["shared_buffers".into()],
                reload: vec!["work_mem".into()]
            }
        );
    }

    #[test]
    fn removing_a_restart_parameter_also_restarts_and_no_change_is_none() {
        let old = params(&[("max_connections", "200")]);
        assert!(matches!(
            ParameterChange::between(&old, &params(&[])),
            ParameterChange::Restart { .. }
        ));
        assert_eq!(ParameterChange::between(&old, &old), ParameterChange::None);
    }

    #[test]
    fn parameter_names_are_case_insensitive() {
        assert!(needs_restart("Shared_Buffers"));
        assert!(!needs_restart("work_mem"));
    }
}
