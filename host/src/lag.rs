//! Whether the host itself runs late: a probe task sleeps [`TICK`] at a
//! time and notes each time it wakes more than [`LATE`] after it asked.
//!
//! The circuit breakers need it. Under overload every task waits in a long
//! run queue, upstream answers included: calls then pass their deadline
//! with the upstream blameless, and five of them in a row used to open a
//! circuit for five seconds, turning an overloaded host into one that
//! answered nothing (the overload benchmark's c=5000 rows: 0 answers, all
//! `upstream_shed`). A call that times out or is dropped while the host
//! lags says nothing of the upstream; see `guard::circuit_breaker`.
//!
//! One probe per process, on the runtime that runs the guests, where the
//! upstreams' answers are read: started by the first request to reach it,
//! and again by the next should that runtime end (as each test's does).
//! Not on the connections' runtime: its one thread sleeps most of the time,
//! so the kernel runs it on time while the guests' threads wait. At c=5000
//! clients honouring `Retry-After` (50 ms upstreams, `fanout-bench
//! serve-fanout`, 2 cores, 10 s windows), a probe there let circuits open
//! in 4 windows of 8, each answering nothing for its five seconds; on the
//! guests' runtime, in 1 of 6.
//!
//! tokio-metrics reports scheduling delay per task after the fact; this
//! needs a yes or no now, for ~20 lines.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the probe sleeps between two looks.
const TICK: Duration = Duration::from_millis(10);

/// A wake this much later than asked is the host running late. A tenth of
/// the guest's default budget.
pub const LATE: Duration = Duration::from_millis(20);

/// A late wake counts this long after it was seen.
const REMEMBER: Duration = Duration::from_secs(2);

struct Probe {
    running: AtomicBool,
    /// Milliseconds since `epoch` of the last late wake, or 0 for none.
    last_late: AtomicU64,
    epoch: Instant,
}

impl Probe {
    fn new() -> Probe {
        Probe {
            running: AtomicBool::new(false),
            last_late: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The probe asked to wake at `asked + TICK` and woke at `woke`.
    fn woke(&self, asked: Instant, woke: Instant) {
        if woke.saturating_duration_since(asked) > TICK + LATE {
            let at = woke.saturating_duration_since(self.epoch).as_millis() as u64;
            self.last_late.store(at.max(1), Ordering::Relaxed);
        }
    }

    fn lagging_at(&self, now: Instant) -> bool {
        let last = self.last_late.load(Ordering::Relaxed);
        let now = now.saturating_duration_since(self.epoch).as_millis() as u64;
        last != 0 && now.saturating_sub(last) < REMEMBER.as_millis() as u64
    }
}

fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(Probe::new)
}

/// Starts the probe on the current tokio runtime unless one is running.
pub(crate) fn ensure_probe() {
    let state = probe();
    // A load first: this runs on every request, and a swap would write.
    if state.running.load(Ordering::Acquire) || state.running.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        state.running.store(false, Ordering::Release);
        return;
    };
    /// Marks the probe stopped however its task ends.
    struct Stopped;
    impl Drop for Stopped {
        fn drop(&mut self) {
            probe().running.store(false, Ordering::Release);
        }
    }
    runtime.spawn(async move {
        let _stopped = Stopped;
        loop {
            let asked = Instant::now();
            tokio::time::sleep(TICK).await;
            state.woke(asked, Instant::now());
        }
    });
}

/// Whether the host ran late within the last [`REMEMBER`].
pub(crate) fn lagging() -> bool {
    probe().lagging_at(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_wake_counts_for_a_while() {
        let probe = Probe::new();
        let t0 = probe.epoch + Duration::from_secs(1);
        assert!(!probe.lagging_at(t0), "nothing seen yet");
        probe.woke(t0, t0 + TICK + Duration::from_millis(5));
        assert!(!probe.lagging_at(t0 + TICK), "5 ms late is on time");
        let late = t0 + TICK + LATE * 2;
        probe.woke(t0, late);
        assert!(probe.lagging_at(late));
        assert!(probe.lagging_at(late + REMEMBER - Duration::from_millis(10)));
        assert!(!probe.lagging_at(late + REMEMBER), "forgotten");
    }
}
