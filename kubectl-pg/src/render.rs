//! `status` as text (pure): a summary, then aligned tables of instances, conditions and backups.

use k8s_openapi::jiff::Timestamp;

use crate::view::ClusterView;

/// Columns padded to their widest cell, separated by two spaces, trailing spaces trimmed.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(&widths) {
            text.push_str(cell);
            text.push_str(&" ".repeat(width - cell.chars().count() + 2));
        }
        text.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Bytes in binary units: `0 B`, `512 B`, `1.5 MiB`.
pub fn bytes(value: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if value < 1024 {
        return format!("{value} B");
    }
    let mut amount = value as f64 / 1024.0;
    let mut unit = 0;
    while amount >= 1024.0 && unit < UNITS.len() - 1 {
        amount /= 1024.0;
        unit += 1;
    }
    format!("{amount:.1} {}", UNITS[unit])
}

/// Time since `then`, as kubectl prints ages: `45s`, `12m`, `5h`, `3d`.
pub fn age(now: Timestamp, then: Timestamp) -> String {
    let seconds = now.as_second().saturating_sub(then.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

const NONE: &str = "-";

fn or_none(value: Option<String>) -> String {
    value.unwrap_or_else(|| NONE.to_string())
}

/// The whole `status` text.
pub fn status(view: &ClusterView, now: Timestamp) -> String {
    let mut out = String::new();
    let primary = match (&view.primary, view.timeline) {
        (Some(primary), Some(timeline)) => format!("{primary} (timeline {timeline})"),
        (Some(primary), None) => primary.clone(),
        (None, _) => NONE.to_string(),
    };
    let mut summary = vec![
        (
            "Cluster",
            format!("{} (namespace {})", view.name, view.namespace),
        ),
        (
            "Phase",
            if view.phase.is_empty() {
                "(not reconciled yet)".to_string()
            } else {
                view.phase.clone()
            },
        ),
        ("Image", or_none(view.image.clone())),
        (
            "Instances",
            format!("{}/{} ready", view.ready_instances, view.instances),
        ),
        ("Primary", primary),
    ];
    if view.hibernated {
        summary.push(("Hibernation", "on (no pods; volumes kept)".to_string()));
    }
    if !view.fenced.is_empty() {
        summary.push(("Fenced", view.fenced.join(", ")));
    }
    match (&view.switchover_requested, &view.switchover_in_flight) {
        (_, Some(target)) => summary.push(("Switchover", format!("to {target} (in progress)"))),
        (Some(target), None) if view.primary.as_ref() != Some(target) => {
            summary.push(("Switchover", format!("to {target} (requested)")))
        }
        _ => {}
    }
    let width = summary.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in summary {
        out.push_str(&format!("{key:<width$}  {value}\n"));
    }

    out.push_str("\nInstances\n");
    if view.instance_pods.is_empty() {
        out.push_str("  (no instance pods)\n");
    } else {
        let rows: Vec<Vec<String>> = view
            .instance_pods
            .iter()
            .map(|i| {
                let lag = match (i.lag_bytes, i.lag_seconds, &i.source_archive) {
                    (Some(b), Some(s), _) if s >= 1.0 => format!("{} ({s:.0}s)", bytes(b)),
                    (Some(b), _, _) => bytes(b),
                    // A replica cluster's designated primary: behind its source's archive.
                    (None, _, Some(archive)) if archive.error.is_some() => {
                        format!("? (cannot list {}'s archive)", archive.source)
                    }
                    (None, _, Some(archive)) if archive.seconds >= 1.0 => format!(
                        "{} ({:.0}s) behind {}",
                        bytes(archive.bytes),
                        archive.seconds,
                        archive.source
                    ),
                    (None, _, Some(archive)) => {
                        format!("{} behind {}", bytes(archive.bytes), archive.source)
                    }
                    (None, _, None) => NONE.to_string(),
                };
                vec![
                    i.pod.clone(),
                    i.role.clone(),
                    i.status.clone(),
                    or_none(i.lsn.clone()),
                    lag,
                    or_none(i.timeline.map(|t| t.to_string())),
                    or_none(i.node.clone()),
                    or_none(i.ip.clone()),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "POD", "ROLE", "STATUS", "LSN", "LAG", "TIMELINE", "NODE", "IP",
            ],
            &rows,
        ));
        for instance in view.instance_pods.iter().filter(|i| i.last_error.is_some()) {
            out.push_str(&format!(
                "  {}: last error: {}\n",
                instance.pod,
                instance.last_error.as_deref().unwrap_or_default()
            ));
        }
    }

    out.push_str("\nConditions\n");
    if view.conditions.is_empty() {
        out.push_str("  (none reported yet)\n");
    } else {
        let rows: Vec<Vec<String>> = view
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    age(now, c.since),
                    c.message.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            &rows,
        ));
    }

    if !view.certificates.is_empty() {
        out.push_str("\nCertificates\n");
        let rows: Vec<Vec<String>> = view
            .certificates
            .iter()
            .map(|c| {
                let left = if c.expires <= now {
                    "expired".to_string()
                } else {
                    age(c.expires, now)
                };
                vec![
                    c.certificate.clone(),
                    c.expires.to_string(),
                    left,
                    c.instances.join(", "),
                ]
            })
            .collect();
        out.push_str(&table(
            &["CERTIFICATE", "EXPIRES", "IN", "INSTANCES"],
            &rows,
        ));
    }

    out.push_str("\nBackups\n");
    if view.backups.is_empty() {
        out.push_str("  (no BackupJobs; take one with `kubectl pg backup ");
        out.push_str(&view.name);
        out.push_str("`)\n");
    } else {
        let rows: Vec<Vec<String>> = view
            .backups
            .iter()
            .map(|b| {
                let when = b.completed.or(b.started).or(b.created);
                vec![
                    b.name.clone(),
                    b.action.clone(),
                    b.method.clone(),
                    if b.phase.is_empty() {
                        "Pending".to_string()
                    } else {
                        b.phase.clone()
                    },
                    or_none(when.map(|t| format!("{} ago", age(now, t)))),
                    or_none(b.backup_id.clone()),
                ]
            })
            .collect();
        out.push_str(&table(
            &["NAME", "ACTION", "METHOD", "PHASE", "WHEN", "BACKUP ID"],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{BackupRow, CertificateRow, ConditionRow, InstanceRow};

    #[test]
    fn tables_align_columns_and_trim_line_ends() {
        let text = table(
            &["POD", "ROLE"],
            &[
                vec!["db-0".into(), "primary".into()],
                vec!["db-10".into(), "".into()],
            ],
        );
        assert_eq!(text, "POD    ROLE\ndb-0   primary\ndb-10\n");
    }

    #[test]
    fn bytes_and_ages_read_like_kubectl() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(16 * 1024 * 1024), "16.0 MiB");
        let now: Timestamp = "2026-12-04T10:00:00Z".parse().unwrap();
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(age(now, at("2026-12-04T09:59:15Z")), "45s");
        assert_eq!(age(now, at("2026-12-04T09:48:00Z")), "12m");
        assert_eq!(age(now, at("2026-12-04T05:00:00Z")), "5h");
        assert_eq!(age(now, at("2026-12-01T10:00:00Z")), "3d");
    }

    #[test]
    fn a_designated_primary_shows_how_far_behind_its_sources_archive_it_is() {
        let now: Timestamp = "2026-12-04T10:00:00Z".parse().unwrap();
        let row = |archive: crate::view::SourceArchive| InstanceRow {
            pod: "dr-0".into(),
            role: "primary".into(),
            status: "ready".into(),
            source_archive: Some(archive),
            ..InstanceRow::default()
        };
        let text = |archive| {
            status(
                &ClusterView {
                    name: "dr".into(),
                    instance_pods: vec![row(archive)],
                    ..ClusterView::default()
                },
                now,
            )
        };
        let caught_up = text(crate::view::SourceArchive {
            source: "db".into(),
            ..Default::default()
        });
        assert!(caught_up.contains("0 B behind db"), "{caught_up}");
        let behind = text(crate::view::SourceArchive {
            source: "db".into(),
            segments: 2,
            bytes: 24 << 20,
            seconds: 75.4,
            error: None,
        });
        assert!(behind.contains("24.0 MiB (75s) behind db"), "{behind}");
        let failing = text(crate::view::SourceArchive {
            source: "db".into(),
            error: Some("AccessDenied".into()),
            ..Default::default()
        });
        assert!(
            failing.contains("? (cannot list db's archive)"),
            "{failing}"
        );
    }

    #[test]
    fn status_shows_the_summary_the_instances_the_conditions_and_the_backups() {
        let now: Timestamp = "2026-12-04T10:00:00Z".parse().unwrap();
        let view = ClusterView {
            name: "db".into(),
            namespace: "prod".into(),
            phase: "Healthy".into(),
            image: Some("pg:18.6".into()),
            instances: 2,
            ready_instances: 2,
            primary: Some("db-0".into()),
            timeline: Some(3),
            switchover_in_flight: Some("db-1".into()),
            conditions: vec![ConditionRow {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "AllInstancesReady".into(),
                message: "2 of 2 instances ready".into(),
                since: "2026-12-04T09:00:00Z".parse().unwrap(),
            }],
            instance_pods: vec![
                InstanceRow {
                    pod: "db-0".into(),
                    role: "primary".into(),
                    status: "ready".into(),
                    lsn: Some("0/5000100".into()),
                    timeline: Some(3),
                    ip: Some("10.1.0.7".into()),
                    ..InstanceRow::default()
                },
                InstanceRow {
                    pod: "db-1".into(),
                    role: "replica".into(),
                    status: "ready".into(),
                    lsn: Some("0/5000000".into()),
                    lag_bytes: Some(2048),
                    timeline: Some(3),
                    ..InstanceRow::default()
                },
            ],
            backups: vec![BackupRow {
                name: "db-nightly".into(),
                action: "Backup".into(),
                method: "pgBackRest".into(),
                phase: "Completed".into(),
                completed: Some("2026-12-04T07:00:00Z".parse().unwrap()),
                backup_id: Some("20261204-070000F".into()),
                ..BackupRow::default()
            }],
            certificates: vec![
                CertificateRow {
                    certificate: "server".into(),
                    expires: "2026-12-06T10:00:00Z".parse().unwrap(),
                    instances: vec!["db-0".into(), "db-1".into()],
                },
                CertificateRow {
                    certificate: "source-ca".into(),
                    expires: "2026-12-04T09:00:00Z".parse().unwrap(),
                    instances: vec!["db-0".into()],
                },
            ],
            ..ClusterView::default()
        };
        let text = status(&view, now);
        for expected in [
            "Cluster     db (namespace prod)",
            "Phase       Healthy",
            "Instances   2/2 ready",
            "Primary     db-0 (timeline 3)",
            "Switchover  to db-1 (in progress)",
            "POD   ROLE     STATUS  LSN        LAG      TIMELINE  NODE  IP",
            "db-0  primary  ready   0/5000100  -        3         -     10.1.0.7",
            "db-1  replica  ready   0/5000000  2.0 KiB  3         -     -",
            "Ready  True    AllInstancesReady  60m",
            "db-nightly  Backup  pgBackRest  Completed  3h ago  20261204-070000F",
            "CERTIFICATE  EXPIRES               IN       INSTANCES",
            "server       2026-12-06T10:00:00Z  2d       db-0, db-1",
            "source-ca    2026-12-04T09:00:00Z  expired  db-0",
        ] {
            assert!(text.contains(expected), "{expected:?} in:\n{text}");
        }
    }
}
