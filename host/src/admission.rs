//! Adaptive admission control: how many requests may be in flight, learned
//! from their latency.
//!
//! A fixed limit sized to the instance pool admits far more requests than
//! two cores can finish inside the budget; they queue for CPU until their
//! deadline passes, and goodput collapses. This limiter follows measured
//! latency instead (AIMD, as in TCP congestion control and Netflix's
//! concurrency-limits): it grows by about one per round trip while requests
//! finish near the fastest latency seen lately, and shrinks by a tenth, at
//! most once per round trip, when they take much longer. A request beyond
//! the limit is shed at the door, before an instance is spent, with a 503
//! that says when to retry.
//!
//! No maintained crate implements this for tower (tower's `ConcurrencyLimit`
//! is fixed); the logic is small, pure and unit-tested with explicit times.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Settings of the limiter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Limit at start; it adapts from there.
    pub initial: usize,
    pub min: usize,
    /// Never more than this (the instance pool's size).
    pub max: usize,
    /// A request is "slow" when it takes longer than `tolerance` times the
    /// fastest latency of the last `min_window` (and at least `slack` more).
    pub tolerance: f64,
    pub slack: Duration,
    /// How long the fastest latency is remembered; old minima expire so
    /// that a change in upstream latency is learnt.
    pub min_window: Duration,
    /// Multiplicative decrease on a slow request.
    pub decrease: f64,
}

impl AdmissionConfig {
    pub fn new(max: usize) -> AdmissionConfig {
        AdmissionConfig {
            initial: (max / 4).clamp(1, max.max(1)),
            min: 2.min(max.max(1)),
            max: max.max(1),
            tolerance: 2.0,
            slack: Duration::from_millis(20),
            min_window: Duration::from_secs(10),
            decrease: 0.9,
        }
    }
}

/// The limiter's state, with time passed in: the logic is testable.
#[derive(Debug, Clone)]
pub struct Aimd {
    config: AdmissionConfig,
    limit: f64,
    in_flight: usize,
    min_latency: Option<(Duration, Instant)>,
    last_decrease: Option<Instant>,
}

impl Aimd {
    pub fn new(config: AdmissionConfig) -> Aimd {
        Aimd {
            config,
            limit: config.initial as f64,
            in_flight: 0,
            min_latency: None,
            last_decrease: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Admits a request if the limit allows.
    pub fn try_admit(&mut self) -> bool {
        if self.in_flight >= self.limit() {
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// A request admitted earlier finished after `latency`, at `now`.
    /// `None`: it ended without a latency worth learning from (cancelled).
    pub fn finish(&mut self, latency: Option<Duration>, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(latency) = latency else { return };
        let fresh = |(_, at): (Duration, Instant)| now.duration_since(at) < self.config.min_window;
        match self.min_latency {
            Some(min) if fresh(min) && min.0 <= latency => {}
            _ => self.min_latency = Some((latency, now)),
        }
        let min = self.min_latency.map(|(d, _)| d).unwrap_or(latency);
        let threshold = min
            .mul_f64(self.config.tolerance)
            .max(min + self.config.slack);
        if latency > threshold {
            // At most once per round trip: one slow burst is one signal.
            let recent = self
                .last_decrease
                .is_some_and(|at| now.duration_since(at) < latency);
            if !recent {
                self.limit = (self.limit * self.config.decrease).max(self.config.min as f64);
                self.last_decrease = Some(now);
            }
        } else if self.in_flight + 1 >= self.limit() {
            // Grow only when the limit is what holds requests back: about
            // +1 per round trip's worth of completions.
            self.limit = (self.limit + 1.0 / self.limit).min(self.config.max as f64);
        }
    }
}

/// The shared limiter.
#[derive(Clone)]
pub struct Admission {
    state: Arc<Mutex<Aimd>>,
}

/// A request's place; give it back with [`Ticket::finish`], or drop it.
pub struct Ticket {
    state: Arc<Mutex<Aimd>>,
    started: Instant,
    done: bool,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Admission {
        Admission {
            state: Arc::new(Mutex::new(Aimd::new(config))),
        }
    }

    /// A ticket, or `None`: shed the request.
    pub fn try_admit(&self) -> Option<Ticket> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.try_admit().then(|| Ticket {
            state: self.state.clone(),
            started: Instant::now(),
            done: false,
        })
    }

    /// The current limit and requests in flight.
    pub fn snapshot(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.limit(), state.in_flight())
    }
}

impl Ticket {
    /// The request finished: its latency teaches the limiter.
    pub fn finish(mut self) {
        self.done = true;
        let now = Instant::now();
        let latency = now.duration_since(self.started);
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish(Some(latency), now);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .finish(None, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn config() -> AdmissionConfig {
        AdmissionConfig {
            initial: 10,
            min: 2,
            max: 100,
            ..AdmissionConfig::new(100)
        }
    }

    #[test]
    fn sheds_beyond_the_limit() {
        let mut aimd = Aimd::new(config());
        for _ in 0..10 {
            assert!(aimd.try_admit());
        }
        assert!(!aimd.try_admit(), "the 11th is shed");
        aimd.finish(None, Instant::now());
        assert!(aimd.try_admit(), "a finished request frees its place");
    }

    #[test]
    fn grows_while_fast_and_full() {
        let mut aimd = Aimd::new(config());
        let t0 = Instant::now();
        for i in 0..2_000 {
            while aimd.try_admit() {}
            aimd.finish(Some(MS(50)), t0 + MS(i));
        }
        assert!(aimd.limit() > 40, "grew to {}", aimd.limit());
        assert!(aimd.limit() <= 100);
    }

    #[test]
    fn shrinks_when_latency_climbs_then_recovers() {
        let mut aimd = Aimd::new(AdmissionConfig {
            initial: 80,
            ..config()
        });
        let mut now = Instant::now();
        // Learn the fast latency.
        for _ in 0..20 {
            assert!(aimd.try_admit());
            aimd.finish(Some(MS(50)), now);
        }
        let before = aimd.limit();
        // Overload: requests take 400 ms (queueing for CPU).
        for _ in 0..30 {
            now += MS(400);
            assert!(aimd.try_admit());
            aimd.finish(Some(MS(400)), now);
        }
        let squeezed = aimd.limit();
        assert!(squeezed < before / 2, "{before} -> {squeezed}");
        assert!(squeezed >= 2, "never below min");
        // Back to fast: it grows again.
        for _ in 0..5_000 {
            now += MS(1);
            while aimd.try_admit() {}
            aimd.finish(Some(MS(50)), now);
        }
        assert!(
            aimd.limit() > squeezed * 2,
            "{squeezed} -> {}",
            aimd.limit()
        );
    }

    #[test]
    fn one_slow_burst_is_one_decrease() {
        let mut aimd = Aimd::new(AdmissionConfig {
            initial: 50,
            ..config()
        });
        let now = Instant::now();
        aimd.try_admit();
        aimd.finish(Some(MS(50)), now);
        for _ in 0..10 {
            aimd.try_admit();
            aimd.finish(Some(MS(300)), now + MS(1));
        }
        assert_eq!(aimd.limit(), 45, "a single decrease by a tenth");
    }

    #[test]
    fn the_fastest_latency_expires() {
        let mut aimd = Aimd::new(config());
        let t0 = Instant::now();
        aimd.try_admit();
        aimd.finish(Some(MS(5)), t0);
        // Upstreams became slower for good: 100 ms is the new normal once
        // the old 5 ms minimum has expired, and stops counting as slow.
        let later = t0 + Duration::from_secs(11);
        aimd.try_admit();
        aimd.finish(Some(MS(100)), later);
        let limit = aimd.limit();
        for i in 0..10 {
            aimd.try_admit();
            aimd.finish(Some(MS(100)), later + MS(i));
        }
        assert!(aimd.limit() >= limit, "not treated as slow");
    }
}
