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
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
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

    /// The fence process's report; `None` without one (tests that run the manager in-process).
    pub fn fence_report(&self) -> Option<FenceReport> {
        self.fence.as_ref().map(Fence::report)
    }

    /// Hands the guard to the fence process (under the lock, so publications keep its order).
    fn publish(&self, guard: &Guard) {
        if let Some(fence) = &self.fence {
            fence.publish(guard.pid.zip(guard.serve_until));
        }
    }

    /// Checks every `period` and stops (immediate shutdown) a primary whose right lapsed; starts
    /// the fence process again when it is gone.
    pub async fn run(self: std::sync::Arc<Self>, period: Duration) {
        let mut interval = tokio::time::interval(period);
        loop {
            interval.tick().await;
            if let Some(fence) = &self.fence {
                fence.keep_alive();
            }
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

/// How the fence process fares, for the status and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FenceReport {
    /// A fence process runs.
    pub running: bool,
    /// Times it was found gone (killed, out of memory) and started again.
    pub restarts: u64,
}

/// The fence process's view of the guard: one word in memory shared with it (a `MAP_SHARED`
/// page made before the fork), so that it is never read half-written.
#[derive(Debug)]
pub struct Fence {
    word: &'static AtomicU64,
    /// The fence process now (another one after a restart); 0 when it is gone and could not
    /// be started again.
    child: AtomicI32,
    /// Times it was found gone and started again.
    restarts: AtomicU64,
    /// This process, which the fence process watches for.
    parent: Pid,
}

/// Bits of the deadline in a [`Fence`] word (milliseconds of `CLOCK_MONOTONIC`, about 34 years
/// of uptime); the pid takes the bits above (Linux pids are below 2^22).
const DEADLINE_BITS: u32 = 40;

/// How often the fence process looks: well inside the gap between the end of a primary's right
/// (the watchdog window) and the end of its Lease.
const FENCE_PERIOD: Duration = Duration::from_millis(50);

impl Fence {
    /// Makes the shared word and forks the fence process. Called before the async runtime
    /// starts, on the thread that lives as long as the process: the child's
    /// `PR_SET_PDEATHSIG` follows the thread that forked it.
    pub fn start() -> std::io::Result<Self> {
        let size = NonZeroUsize::new(std::mem::size_of::<AtomicU64>()).expect("not zero");
        // SAFETY: a new anonymous mapping, aligned to a page, zeroed, never unmapped: a valid
        // `AtomicU64` for the life of the process (and of the children, which inherit it).
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
        let child = Self::spawn(word, parent)?;
        tracing::debug!(pid = child.as_raw(), "fence process started");
        Ok(Self {
            word,
            child: AtomicI32::new(child.as_raw()),
            restarts: AtomicU64::new(0),
            parent,
        })
    }

    /// Forks a fence process on `word`. Sound from any thread: the child only makes
    /// async-signal-safe calls (sleep, clock, kill, write, `_exit`) and takes no lock and no
    /// memory from the allocator, so locks other threads held at the fork do not matter.
    fn spawn(word: &'static AtomicU64, parent: Pid) -> std::io::Result<Pid> {
        // SAFETY: see above; the child runs `watch`, which never returns.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => watch(word, parent),
            nix::unistd::ForkResult::Parent { child } => Ok(child),
        }
    }

    /// The fence process now.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.load(Ordering::SeqCst))
    }

    /// Starts the fence process again when it is gone (killed, out of memory), and says so;
    /// whether it did. Called by the watchdog task, on a runtime worker thread, which lives as
    /// long as the runtime.
    pub fn keep_alive(&self) -> bool {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        let pid = self.pid();
        // Never `waitpid(0)`: that would reap any child of the process group (PostgreSQL's).
        let gone = if pid.as_raw() == 0 {
            "could not be started again before".to_string()
        } else {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return false,
                Ok(status) => format!("{status:?}"),
                Err(error) => error.to_string(),
            }
        };
        match Self::spawn(self.word, self.parent) {
            Ok(child) => {
                self.child.store(child.as_raw(), Ordering::SeqCst);
                self.restarts.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    gone,
                    pid = child.as_raw(),
                    "the fence process was gone: started it again"
                );
                true
            }
            Err(error) => {
                // Started again on the next round.
                self.child.store(0, Ordering::SeqCst);
                tracing::error!(gone, %error, "the fence process is gone and cannot be started again");
                false
            }
        }
    }

    /// Whether a fence process runs (as of the last [`Self::keep_alive`]), and how many times it
    /// was started again.
    pub fn report(&self) -> FenceReport {
        FenceReport {
            running: self.child.load(Ordering::SeqCst) != 0,
            restarts: self.restarts.load(Ordering::SeqCst),
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
/// the watchdog task does), and exits when its parent is gone. Async-signal-safe calls only (see
/// [`Fence::spawn`]): its one message is a fixed line written to stderr.
fn watch(word: &AtomicU64, parent: Pid) -> ! {
    const STOPPED: &[u8] = b"pg-instance fence process: the primary's right to accept writes lapsed while the instance manager did not run; PostgreSQL stopped (SIGQUIT)\n";
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    loop {
        if nix::unistd::getppid() != parent {
            // SAFETY: ends this process at once, running nothing of the parent's.
            unsafe { nix::libc::_exit(0) };
        }
        let seen = word.load(Ordering::SeqCst);
        if let Some((pid, deadline)) = decode(seen)
            && monotonic_ms() > deadline
            && word
                .compare_exchange(seen, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
            // SAFETY: stderr stays open for the life of the process.
            let stderr = unsafe { std::os::fd::BorrowedFd::borrow_raw(2) };
            let _ = nix::unistd::write(stderr, STOPPED);
        }
        std::thread::sleep(FENCE_PERIOD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to 5 s for `child` to end; its signal.
    fn ended_by(child: &mut std::process::Child) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        for _ in 0..100 {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.signal();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        None
    }

    #[test]
    fn the_fence_process_stops_a_process_past_its_deadline_and_comes_back_when_killed() {
        let fence = Fence::start().expect("fence process");
        let mut guarded = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        fence.publish(Some((
            guarded.id(),
            Instant::now() + Duration::from_secs(2),
        )));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            guarded.try_wait().expect("wait").is_none(),
            "stopped before its deadline"
        );
        assert_eq!(ended_by(&mut guarded), Some(Signal::SIGQUIT as i32));
        assert_eq!(fence.word.load(Ordering::SeqCst), 0, "the guard is cleared");

        assert_eq!(
            fence.report(),
            FenceReport {
                running: true,
                restarts: 0
            }
        );
        // Killed, it is started again by the next look, and guards as before.
        let first = fence.pid();
        kill(first, Signal::SIGKILL).expect("kill the fence process");
        let mut restarted = false;
        for _ in 0..100 {
            restarted |= fence.keep_alive();
            if restarted {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(restarted && fence.pid() != first, "a new fence process");
        assert_eq!(
            fence.report(),
            FenceReport {
                running: true,
                restarts: 1
            }
        );
        assert!(!fence.keep_alive(), "alive: nothing to do");
        let mut next = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        fence.publish(Some((next.id(), Instant::now())));
        assert_eq!(ended_by(&mut next), Some(Signal::SIGQUIT as i32));
    }

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
