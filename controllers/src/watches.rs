//! How the controllers watch the API server so that a connection that dies without a word (a
//! load balancer or NAT forgot it: nothing answered, nothing refused) costs seconds, not the
//! events of every object from then on.
//!
//! Three clocks are in play. The client's read timeout (`--api-timeout-seconds`) fails a request
//! that got no byte for that long. kube's watcher gives up on a watch that delivered nothing for
//! its server-side timeout plus 5 s, quietly: it opens the watch again from where it was. And
//! each controller's trigger backoff pauses *all* its watches after an error from any one of
//! them. A read timeout is such an error, so a watch must end on the quiet clock first: the
//! server-side timeout is 10 s below the read timeout. The errors that remain (a new watch sent
//! on a pooled connection that is dead too) each pause the controller's watches, one after
//! another: kube's default pause grows to 30 s (60 with its jitter), and the eleven watches of
//! the PostgresCluster controller, measured, stayed blind for minutes; ours stops at 5 s.

use std::time::Duration;

use kube::runtime::utils::Backoff;
use kube::runtime::watcher;

/// The narrowest read timeout that leaves a watch a server-side timeout of 5 s (pg-router's:
/// its watches follow the same rule).
pub const MIN_API_TIMEOUT: Duration = router::kubernetes::MIN_API_TIMEOUT;

/// A watch the API server ends after `api_timeout` less 10 s (kube's watcher then opens it again
/// from the last resourceVersion, and gives up on it 5 s later if even the end never came): the
/// rule pg-router's watches follow, from its `kubernetes::watch_config`.
pub fn config(api_timeout: Duration) -> watcher::Config {
    router::kubernetes::watch_config(api_timeout)
}

/// The pause after a failed watch: kube's (client-go's) 0.8 s doubling with jitter, up to
/// [`MAX_PAUSE`] instead of 30 s; reset by any event.
#[derive(Debug)]
pub struct TriggerBackoff {
    next: Duration,
}

const FIRST_PAUSE: Duration = Duration::from_millis(800);
/// The longest pause before a jitter of up to as much again.
pub const MAX_PAUSE: Duration = Duration::from_secs(5);

impl Default for TriggerBackoff {
    fn default() -> Self {
        Self { next: FIRST_PAUSE }
    }
}

impl Iterator for TriggerBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let pause = self.next;
        self.next = (pause * 2).min(MAX_PAUSE);
        Some(pause.mul_f64(1.0 + rand::random::<f64>()))
    }
}

impl Backoff for TriggerBackoff {
    fn reset(&mut self) {
        self.next = FIRST_PAUSE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_ends_on_the_server_before_the_client_would_time_it_out() {
        let config = config(Duration::from_secs(60));
        assert_eq!(config.timeout, Some(50));
        // kube's watcher gives up 5 s after the server-side timeout: still before 60.
        assert_eq!(self::config(MIN_API_TIMEOUT).timeout, Some(5));
    }

    #[test]
    fn pauses_double_up_to_the_ceiling_with_jitter_and_start_over_on_reset() {
        let mut backoff = TriggerBackoff::default();
        let pauses: Vec<Duration> = backoff.by_ref().take(8).collect();
        let bases = [0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0];
        for (pause, base) in pauses.iter().zip(bases) {
            let pause = pause.as_secs_f64();
            assert!(pause >= base && pause <= 2.0 * base, "{pause} for {base}");
        }
        backoff.reset();
        assert!(backoff.next().unwrap() <= 2 * FIRST_PAUSE);
    }
}
