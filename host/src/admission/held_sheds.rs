//! How long a shed to a client that came back too soon is held: long
//! enough that such clients, all together, come back no faster than the
//! host answers.
//!
//! A held client gets its 503 when the hold ends and, re-sending at once,
//! is held again: each costs the host one shed per hold. With a fixed one
//! second, 5,000 such clients cost 5,000 sheds a second however few
//! answers the host can give (measured at c=5000: 7,300 sheds a second
//! beside 1,350 answers; the HTTP server, mostly those sheds, took 23.5 %
//! of the host's CPU, and the clients' own CPU on the same two cores grew
//! with them). Holding for
//! `held / (answers a second × HELD_SHEDS_PER_ANSWER)` keeps the held
//! sheds' share of the work fixed as the crowd grows, and leaves the hold
//! at `Retry-After` (one second) while the crowd is small: at c=500 about
//! 250 are held beside ~2,000 answers a second.
//!
//! The hold is bounded by [`MAX_SHED_HOLD`], and ends early when the server
//! stops (see `Fanout::serve`), so that a shutdown's grace is not spent
//! holding 503s.

use super::RETRY_AFTER;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Held sheds per answer the host gives, at most, once holds pass
/// `Retry-After`: beside the [`FAST_SHEDS_PER_ANSWER`](super::FAST_SHEDS_PER_ANSWER)
/// that go out at once, a shed costs the host ~35 µs against ~700 µs for
/// an answer, so the two together take about a seventh of its CPU.
pub const HELD_SHEDS_PER_ANSWER: f64 = 1.0;

/// The longest a shed is held. Clients' own timeouts are longer (k6 60 s,
/// hey 20 s, most HTTP libraries none; wrk counts a reply after 2 s as a
/// timeout in its report but keeps the connection), and a client that
/// waits out its `Retry-After` is never held.
pub const MAX_SHED_HOLD: Duration = Duration::from_secs(5);

/// Sheds held now, and how long the next one should be.
#[derive(Debug, Default)]
pub struct HeldSheds {
    held: AtomicUsize,
}

/// One shed being held; dropped when it goes out.
pub struct Holding<'a>(&'a HeldSheds);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HeldSheds {
    /// Sheds held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Counts a shed as held until the guard is dropped.
    pub fn hold(&self) -> Holding<'_> {
        self.held.fetch_add(1, Ordering::Relaxed);
        Holding(self)
    }

    /// How long to hold the next shed, counted from the client's previous
    /// one, when the host answers `answers_per_second` (`None`: not known
    /// yet, and the hold is `Retry-After`).
    pub fn next_hold(&self, answers_per_second: Option<f64>) -> Duration {
        let Some(rate) = answers_per_second.filter(|rate| *rate > 0.0) else {
            return RETRY_AFTER;
        };
        let held = (self.held() + 1) as f64;
        let seconds = held / (rate * HELD_SHEDS_PER_ANSWER);
        if seconds >= MAX_SHED_HOLD.as_secs_f64() {
            MAX_SHED_HOLD
        } else {
            Duration::from_secs_f64(seconds).max(RETRY_AFTER)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_grows_with_the_crowd_held_against_the_answers() {
        let sheds = HeldSheds::default();
        assert_eq!(sheds.next_hold(None), RETRY_AFTER, "rate not known");
        assert_eq!(sheds.next_hold(Some(0.0)), RETRY_AFTER, "rate not known");
        // A few held beside 2,000 answers a second: Retry-After.
        let few: Vec<_> = (0..249).map(|_| sheds.hold()).collect();
        assert_eq!(sheds.held(), 249);
        assert_eq!(sheds.next_hold(Some(2000.0)), RETRY_AFTER);
        // 4,000 held (with the next) beside 1,600 answers: 2.5 s each, so
        // that they come back 1,600 times a second.
        let many: Vec<_> = (0..3750).map(|_| sheds.hold()).collect();
        assert_eq!(sheds.next_hold(Some(1600.0)), Duration::from_millis(2500));
        // A host that answers next to nothing: the bound.
        assert_eq!(sheds.next_hold(Some(1.0)), MAX_SHED_HOLD);
        drop(many);
        drop(few);
        assert_eq!(sheds.held(), 0, "every guard gives its count back");
    }
}
