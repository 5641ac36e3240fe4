//! The fencing watchdog: an independent task that stops a primary's PostgreSQL when its right to
//! accept writes lapsed while the run loop was busy (a slow query, a hanging call). The run loop
//! extends that right on every renewal of the Lease (and while its peers confirm an API-server
//! outage); the watchdog never depends on the run loop getting a turn.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What the watchdog guards.
#[derive(Debug, Default)]
struct Guard {
    /// Postmaster of a primary; `None` when there is nothing to guard.
    pid: Option<u32>,
    /// Until when the primary may accept writes.
    serve_until: Option<Instant>,
}

/// Shared between the run loop and the watchdog task.
#[derive(Debug, Default)]
pub struct Watchdog {
    guard: Mutex<Guard>,
}

impl Watchdog {
    /// Guards the postmaster `pid` of a primary (`None`: not a primary, nothing to guard).
    pub fn guard(&self, pid: Option<u32>) {
        if let Ok(mut guard) = self.guard.lock() {
            guard.pid = pid;
            if pid.is_none() {
                guard.serve_until = None;
            }
        }
    }

    /// The primary may accept writes until `until`.
    pub fn extend(&self, until: Instant) {
        if let Ok(mut guard) = self.guard.lock() {
            guard.serve_until = Some(
                guard
                    .serve_until
                    .map_or(until, |current| current.max(until)),
            );
        }
    }

    /// Whether the guarded primary's right lapsed at `now`; when it did, the guard is cleared and
    /// the pid to stop is returned.
    pub fn lapsed(&self, now: Instant) -> Option<u32> {
        let mut guard = self.guard.lock().ok()?;
        match (guard.pid, guard.serve_until) {
            (Some(pid), Some(until)) if now > until => {
                guard.pid = None;
                guard.serve_until = None;
                Some(pid)
            }
            _ => None,
        }
    }

    /// Checks every `period` and stops (immediate shutdown) a primary whose right lapsed.
    pub async fn run(self: std::sync::Arc<Self>, period: Duration) {
        let mut interval = tokio::time::interval(period);
        loop {
            interval.tick().await;
            if let Some(pid) = self.lapsed(Instant::now()) {
                tracing::error!(
                    pid,
                    "the primary's Lease was not renewed in time while the run loop was busy: stopping PostgreSQL"
                );
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guarded_primary_lapses_after_its_deadline_only() {
        let watchdog = Watchdog::default();
        let start = Instant::now();
        watchdog.extend(start + Duration::from_secs(3));
        assert_eq!(
            watchdog.lapsed(start + Duration::from_secs(5)),
            None,
            "nothing guarded"
        );
        watchdog.guard(Some(42));
        watchdog.extend(start + Duration::from_secs(3));
        assert_eq!(watchdog.lapsed(start + Duration::from_secs(2)), None);
        assert_eq!(watchdog.lapsed(start + Duration::from_secs(4)), Some(42));
        assert_eq!(
            watchdog.lapsed(start + Duration::from_secs(5)),
            None,
            "fires once"
        );
        watchdog.guard(Some(7));
        watchdog.extend(start + Duration::from_secs(10));
        watchdog.guard(None);
        assert_eq!(
            watchdog.lapsed(start + Duration::from_secs(20)),
            None,
            "disarmed"
        );
    }
}
