//! Access lines of sheds, a few a second.
//!
//! Under overload, clients that re-send at once are shed by the thousand a
//! second (four 503s to each answer at c=5000 in BENCHMARKS.md). A line for
//! each would spend on logging the CPU the answers need, and flood whatever
//! ships the log. `fanout_shed_total` counts every shed; the log keeps a
//! few a second (`FanoutBuilder::shed_lines_per_second`, 10 by default),
//! each saying how many sheds went unlogged before it. Every other answer
//! keeps its line.
//!
//! Not tracing-subscriber's filtering: it decides per callsite, not per
//! rate, and the count of what was left out belongs on the line.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One host's budget of shed lines: `per_second` a second.
#[derive(Debug)]
pub(crate) struct ShedLines {
    per_second: u32,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    written: u32,
    /// Sheds not logged since the last line written.
    skipped: u64,
}

impl ShedLines {
    /// A budget of `per_second` lines a second (at least one).
    pub(crate) fn new(per_second: u32) -> ShedLines {
        ShedLines {
            per_second: per_second.max(1),
            state: Mutex::new(Window {
                started: Instant::now(),
                written: 0,
                skipped: 0,
            }),
        }
    }

    /// Whether a shed at `now` gets its line: `Some(n)`, `n` being the
    /// sheds not logged since the last line, or `None` (counted for the
    /// next line).
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(window.started) >= Duration::from_secs(1) {
            window.started = now;
            window.written = 0;
        }
        if window.written < self.per_second {
            window.written += 1;
            Some(std::mem::take(&mut window.skipped))
        } else {
            window.skipped += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::SHED_LINES_PER_SECOND;

    #[test]
    fn a_burst_is_logged_a_few_lines_a_second_and_counted() {
        let lines = ShedLines::new(SHED_LINES_PER_SECOND);
        let t0 = Instant::now();
        let burst: Vec<_> = (0..100).map(|_| lines.admit(t0)).collect();
        let written: Vec<u64> = burst.iter().flatten().copied().collect();
        assert_eq!(written.len(), SHED_LINES_PER_SECOND as usize);
        assert!(written.iter().all(|&n| n == 0), "{written:?}");
        // Still the same second: nothing more.
        assert_eq!(lines.admit(t0 + Duration::from_millis(999)), None);
        // The next second's first line stands for all that were left out.
        let skipped = 100 - u64::from(SHED_LINES_PER_SECOND) + 1;
        assert_eq!(lines.admit(t0 + Duration::from_secs(1)), Some(skipped));
        assert_eq!(lines.admit(t0 + Duration::from_secs(1)), Some(0));
    }

    #[test]
    fn a_trickle_is_logged_whole() {
        let lines = ShedLines::new(SHED_LINES_PER_SECOND);
        let t0 = Instant::now();
        for i in 0..50 {
            let at = t0 + Duration::from_millis(200 * i);
            assert_eq!(lines.admit(at), Some(0), "shed {i}");
        }
    }
}
