//! How long each part of a tick took, reported when a tick runs long: a primary's run loop that
//! stays away from the Lease past the watchdog's window is fenced, and the warning says which
//! call held it (the API server, the local PostgreSQL, a program).

use std::time::{Duration, Instant};

/// The parts of one tick, timed as they end.
pub(super) struct Phases {
    started: Instant,
    last: Instant,
    parts: Vec<(&'static str, Duration)>,
}

impl Phases {
    pub(super) fn start() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            parts: Vec::with_capacity(8),
        }
    }

    /// Ends part `name` (it began where the previous one ended).
    pub(super) fn end(&mut self, name: &'static str) {
        let now = Instant::now();
        self.parts.push((name, now - self.last));
        self.last = now;
    }

    /// The whole tick so far.
    pub(super) fn total(&self) -> Duration {
        self.last - self.started
    }

    /// `name=milliseconds` for each part that took at least a tenth of the whole, longest first.
    pub(super) fn summary(&self) -> String {
        let total = self.total();
        let mut parts: Vec<_> = self
            .parts
            .iter()
            .filter(|(_, took)| *took * 10 >= total)
            .collect();
        parts.sort_by_key(|(_, took)| std::cmp::Reverse(*took));
        parts
            .iter()
            .map(|(name, took)| format!("{name}={}ms", took.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_the_parts_that_held_the_tick_longest_first() {
        let start = Instant::now();
        let mut phases = Phases {
            started: start,
            last: start,
            parts: Vec::new(),
        };
        for (name, ms) in [("lease", 30), ("members", 2), ("local", 900), ("act", 70)] {
            phases.parts.push((name, Duration::from_millis(ms)));
            phases.last += Duration::from_millis(ms);
        }
        assert_eq!(phases.total(), Duration::from_millis(1002));
        assert_eq!(phases.summary(), "local=900ms");
        phases.parts.push(("publish", Duration::from_millis(600)));
        phases.last += Duration::from_millis(600);
        assert_eq!(phases.summary(), "local=900ms publish=600ms");
    }
}
