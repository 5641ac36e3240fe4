//! The fencing watchdog: it stops a primary's PostgreSQL when its right to accept writes lapsed
//! while the run loop was busy (a slow query, a hanging call) or the whole instance manager did
//! not run at all (stopped by SIGSTOP, starved, swapped out). The run loop extends that right on
//! every renewal of the Lease (and while its peers confirm an API-server outage); the watchdog
//! never depends on the run loop getting a turn.
//!
//! Two guards read the same deadline: a task of the manager ([`Watchdog::run`]), and the fence
//! process ([`Fence`]), forked before the manager starts, which keeps watching while the manager
//! process itself is stopped. Without that second one, a primary whose manager hangs keeps
//! acknowledging writes on its open connections after another instance took the Lease and was
//! promoted: writes the rewind of the old primary then throws away. Patroni needs a kernel
//! watchdog device for this; a process of our own needs no privilege.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Shared between the run loop and the watchdog task; what it guards is published to the fence
/// process, when there is one.
#[derive(Debug, Default)]
pub struct Watchdog {
    guard: Mutex<Guard>,
    fence: Option<Fence>,
}

impl Watchdog {
    /// A watchdog whose guard the fence process `fence` keeps as well.
    pub fn with_fence(fence: Fence) -> Self {
        Self {
            guard: Mutex::default(),
            fence: Some(fence),
        }
    }

    /// Guards the postmaster `pid` of a primary (`None`: not a primary, nothing to guard).
    pub fn guard(&self, pid: Option<u32>) {
        if let Ok(mut guard) = self.guard.lock() {
            guard.pid = pid;
            if pid.is_none() {
                guard.serve_until = None;
            }
            self.publish(&guard);
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
            self.publish(&guard);
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
                self.publish(&guard);
                Some(pid)
            }
            _ => None,
        }
    }

    /// Hands the guard to the fence process (under the lock, so publications keep its order).
    fn publish(&self, guard: &Guard) {
        if let Some(fence) = &self.fence {
            fence.publish(guard.pid.zip(guard.serve_until));
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

/// The fence process's view of the guard: one word in memory shared with it (a `MAP_SHARED`
/// page made before the fork), so that it is never read half-written.
#[derive(Debug)]
pub struct Fence {
    word: &'static AtomicU64,
}

/// Bits of the deadline in a [`Fence`] word (milliseconds of `CLOCK_MONOTONIC`, about 34 years
/// of uptime); the pid takes the bits above (Linux pids are below 2^22).
const DEADLINE_BITS: u32 = 40;

/// How often the fence process looks: well inside the gap between the end of a primary's right
/// (the watchdog window) and the end of its Lease.
const FENCE_PERIOD: Duration = Duration::from_millis(50);

impl Fence {
    /// Forks the fence process. Called while this process has a single thread (before the async
    /// runtime starts): the child then only sleeps, reads the shared word and signals. It dies
    /// with its parent (`PR_SET_PDEATHSIG`).
    pub fn start() -> std::io::Result<Self> {
        let size = NonZeroUsize::new(std::mem::size_of::<AtomicU64>()).expect("not zero");
        // SAFETY: a new anonymous mapping, aligned to a page, zeroed, never unmapped: a valid
        // `AtomicU64` for the life of the process (and of the child, which inherits it).
        let word: &'static AtomicU64 = unsafe {
            let page = nix::sys::mman::mmap_anonymous(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
            )?;
            &*page.as_ptr().cast::<AtomicU64>()
        };
        let parent = nix::unistd::getpid();
        // SAFETY: the caller has one thread, so no lock is held across the fork; the child runs
        // `watch`, which allocates nothing it did not have and never returns.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => watch(word, parent),
            nix::unistd::ForkResult::Parent { child } => {
                tracing::debug!(pid = child.as_raw(), "fence process started");
                Ok(Self { word })
            }
        }
    }

    /// What is guarded now: a postmaster and until when it may serve, or nothing.
    fn publish(&self, guarded: Option<(u32, Instant)>) {
        self.word
            .store(encode(guarded, Instant::now()), Ordering::SeqCst);
    }
}

/// The word for `guarded`, `now` being the same moment as [`monotonic_ms`]'s now.
fn encode(guarded: Option<(u32, Instant)>, now: Instant) -> u64 {
    let Some((pid, until)) = guarded else {
        return 0;
    };
    let left = until.saturating_duration_since(now).as_millis() as u64;
    let deadline = monotonic_ms().saturating_add(left);
    if pid == 0 || u64::from(pid) >= 1 << (64 - DEADLINE_BITS) || deadline >= 1 << DEADLINE_BITS {
        return 0;
    }
    (u64::from(pid) << DEADLINE_BITS) | deadline
}

/// `(pid, deadline in ms of CLOCK_MONOTONIC)` of a word; `None` for nothing guarded.
fn decode(word: u64) -> Option<(u32, u64)> {
    let pid = (word >> DEADLINE_BITS) as u32;
    (pid != 0).then_some((pid, word & ((1 << DEADLINE_BITS) - 1)))
}

/// Milliseconds of `CLOCK_MONOTONIC`, the clock of `Instant`: the same in both processes.
fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1000 + now.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// The fence process: stops a guarded postmaster whose deadline passed (immediate shutdown, as
/// the watchdog task does), and exits when its parent is gone.
fn watch(word: &AtomicU64, parent: Pid) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    loop {
        if nix::unistd::getppid() != parent {
            std::process::exit(0);
        }
        let seen = word.load(Ordering::SeqCst);
        if let Some((pid, deadline)) = decode(seen)
            && monotonic_ms() > deadline
            && word
                .compare_exchange(seen, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            tracing::error!(
                pid,
                "the primary's right to accept writes lapsed while the instance manager did not run: the fence process stops PostgreSQL"
            );
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
        }
        std::thread::sleep(FENCE_PERIOD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_word_holds_the_pid_and_the_deadline_on_the_monotonic_clock() {
        let now = Instant::now();
        let before = monotonic_ms();
        let word = encode(Some((4_194_303, now + Duration::from_secs(3))), now);
        let (pid, deadline) = decode(word).expect("guarded");
        assert_eq!(pid, 4_194_303);
        assert!(
            (before + 3000..=monotonic_ms() + 3000).contains(&deadline),
            "{deadline} is 3 s after {before}"
        );
        assert_eq!(decode(encode(None, now)), None, "nothing guarded");
        assert_eq!(
            decode(encode(Some((12, now - Duration::from_secs(1))), now))
                .map(|(_, d)| d <= monotonic_ms()),
            Some(true),
            "a past deadline stays past"
        );
    }

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
