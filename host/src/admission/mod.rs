//! Adaptive admission control: how many requests may be in flight, learned
//! from their latency (the host's own part of it: see
//! [`Admission::learn`]), and the line in front of the limit.
//!
//! A fixed limit sized to the instance pool admits far more requests than
//! two cores can finish inside the budget; they queue for CPU until their
//! deadline passes, and goodput collapses. This limiter follows measured
//! latency instead (AIMD, as in TCP congestion control and Netflix's
//! concurrency-limits), with goodput inside the budget as its aim: it
//! shrinks by a tenth, at most once per round trip, only when requests'
//! own time passes all of twice the fastest seen lately, 20 ms more than
//! it, and [`LATENCY_SHARE`] of the budget less the upstreams' wait (more
//! in flight than keep the CPUs busy each cost more CPU), and never
//! below what the highest recent answer rate needs in flight. It grows by
//! one per completion at start, after a collapse (TCP's slow start) and
//! while far below what counts as slow, else by about one per round trip.
//! A request beyond the limit waits in a line bounded by its budget, or is
//! shed at the door, before an instance is spent, with a 503 that says
//! when to retry; [`FastSheds`] decides which sheds to clients that did
//! not wait go out at once, [`HeldSheds`] how long the others are held,
//! and [`PacingProbe`] whether holding them slows the load at all.
//!
//! No maintained crate implements this for tower (tower's `ConcurrencyLimit`
//! is fixed); the logic is small, pure and unit-tested with explicit times.

mod aimd;
mod fast_sheds;
mod held_sheds;
mod pacing_probe;

pub(crate) use aimd::ewma;
pub use aimd::{AdmissionConfig, Aimd, LATENCY_SHARE};
pub use fast_sheds::{FAST_SHEDS_PER_ANSWER, FastSheds};
pub use held_sheds::{HELD_SHEDS_PER_ANSWER, HeldSheds, Holding, MAX_SHED_HOLD};
pub use pacing_probe::{Pacing, PacingProbe};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a shed answer's `Retry-After` asks of the client, and the least time
/// between two shed answers on one connection.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The shared limiter, with its line of waiting requests.
#[derive(Clone)]
pub struct Admission {
    state: Arc<Mutex<Shared>>,
    /// Earned by answers, spent on sheds to clients back too soon.
    fast_sheds: Arc<FastSheds>,
    /// The sheds to clients back too soon that wait for their 503.
    held_sheds: Arc<HeldSheds>,
    /// Whether to hold such sheds at all.
    pacing: Arc<PacingProbe>,
}

struct Shared {
    aimd: Aimd,
    /// Requests waiting for the limit, oldest first. A place is handed over
    /// (already counted in flight) by sending on its channel.
    waiters: std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>,
    /// Moving average of how long a place is held: with the limit, it says
    /// how fast places free up.
    hold: Duration,
}

impl Shared {
    /// Hands free places to the oldest waiters still waiting.
    fn dispatch(&mut self) {
        while !self.waiters.is_empty() && self.aimd.try_admit() {
            let waiter = self.waiters.pop_front().expect("not empty");
            if waiter.send(()).is_err() {
                // It gave up (timed out, or its client left): not admitted.
                self.aimd.in_flight = self.aimd.in_flight.saturating_sub(1);
            }
        }
    }
}

/// A place in line. Dropped before its place was taken (the client went
/// away while it waited), it gives back a place handed over meanwhile:
/// counted in flight with no ticket to release it, each such place was
/// lost for good, and clients that hang up mid-request (the soak's) shut
/// the host within seconds (every place lost, every request a 503).
struct InLine {
    handed: tokio::sync::oneshot::Receiver<()>,
    state: Arc<Mutex<Shared>>,
    taken: bool,
}

impl InLine {
    /// Stops waiting; whether a place had been handed over (now taken).
    fn take_if_handed(&mut self) -> bool {
        self.handed.close();
        self.taken = self.handed.try_recv().is_ok();
        self.taken
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        if !self.taken && self.take_if_handed() {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.aimd.release();
            state.dispatch();
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// At the limit, and waiting is not allowed.
    AtLimit {
        /// The limit then.
        limit: usize,
    },
    /// The expected wait in line is longer than allowed.
    LineTooLong {
        /// The wait the line would have meant.
        expected: Duration,
    },
    /// Waited as long as allowed.
    WaitedTooLong {
        /// How long it waited.
        waited: Duration,
    },
}

/// A request's place, given back when dropped: hold it as long as the
/// request holds its instance.
pub struct Ticket {
    state: Arc<Mutex<Shared>>,
    admitted: Instant,
    waited: Duration,
}

impl Admission {
    /// An adaptive limit with `config`.
    pub fn new(config: AdmissionConfig) -> Admission {
        Admission {
            state: Arc::new(Mutex::new(Shared {
                aimd: Aimd::new(config),
                waiters: Default::default(),
                hold: Duration::ZERO,
            })),
            fast_sheds: Arc::default(),
            held_sheds: Arc::default(),
            pacing: Arc::default(),
        }
    }

    /// A limit that never moves: `limit` at once, as a fixed pool.
    pub fn fixed(limit: usize) -> Admission {
        let limit = limit.max(1);
        Admission::new(AdmissionConfig {
            initial: limit,
            min: limit,
            max: limit,
            ..AdmissionConfig::new(limit)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ticket(&self, waited: Duration) -> Ticket {
        Ticket {
            state: self.state.clone(),
            admitted: Instant::now(),
            waited,
        }
    }

    /// A ticket now, or after waiting in line (first come, first served)
    /// for at most `max_wait`, and never longer than leaves the request
    /// time to run: its `budget` less how long a place is held (the moving
    /// average), when the budget is known. A request whose expected wait is
    /// longer is refused at once: the wait in line for position `n` is
    /// about `n * hold / limit` (Little's law).
    pub async fn admit(
        &self,
        max_wait: Duration,
        budget: Option<Duration>,
    ) -> Result<Ticket, Refusal> {
        let (mut handed, max_wait) = {
            let mut state = self.lock();
            if state.waiters.is_empty() && state.aimd.try_admit() {
                return Ok(self.ticket(Duration::ZERO));
            }
            let max_wait = match budget {
                Some(budget) => max_wait.min(budget.saturating_sub(state.hold)),
                None => max_wait,
            };
            let limit = state.aimd.limit();
            if max_wait.is_zero() {
                return Err(Refusal::AtLimit { limit });
            }
            let position = state.waiters.len() + 1;
            let expected = state.hold.mul_f64(position as f64 / limit.max(1) as f64);
            if expected > max_wait.mul_f64(LINE_SHARE) {
                return Err(Refusal::LineTooLong { expected });
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            state.waiters.push_back(tx);
            (
                InLine {
                    handed: rx,
                    state: self.state.clone(),
                    taken: false,
                },
                max_wait,
            )
        };
        let started = Instant::now();
        match tokio::time::timeout(max_wait, &mut handed.handed).await {
            Ok(Ok(())) => {
                handed.taken = true;
                Ok(self.ticket(started.elapsed()))
            }
            _ => {
                // A place handed over just as the wait ran out is still ours.
                if handed.take_if_handed() {
                    Ok(self.ticket(started.elapsed()))
                } else {
                    Err(Refusal::WaitedTooLong {
                        waited: started.elapsed(),
                    })
                }
            }
        }
    }

    /// A request admitted at `admitted` answered now (its response head),
    /// having spent `upstream_wait` of that time waiting on upstreams. The
    /// limit learns from the rest, the host's own time: slower upstreams
    /// need more requests in flight, not fewer, and only the host's own
    /// time says that it has more than it can run.
    pub fn learn(&self, admitted: Instant, upstream_wait: Duration) {
        let now = Instant::now();
        let own = now.duration_since(admitted).saturating_sub(upstream_wait);
        self.fast_sheds.earn();
        let mut state = self.lock();
        state.aimd.learn_parts(own, upstream_wait, now);
        // The limit may have grown.
        state.dispatch();
    }

    /// As if places had been held `hold` lately: for tests elsewhere in the
    /// crate, whose paused clocks the tickets' own timing does not follow.
    #[cfg(test)]
    pub(crate) fn assume_hold(&self, hold: Duration) {
        Admission::record_hold(&mut self.lock(), hold);
    }

    /// Learns how long a place was held.
    fn record_hold(state: &mut Shared, hold: Duration) {
        state.hold = if state.hold.is_zero() {
            hold
        } else {
            state.hold + hold.saturating_sub(state.hold).mul_f64(HOLD_EWMA_WEIGHT)
                - state.hold.saturating_sub(hold).mul_f64(HOLD_EWMA_WEIGHT)
        };
    }

    /// The sheds that may go out at once to clients back too soon, earned
    /// by the answers [`Admission::learn`] hears of.
    pub fn fast_sheds(&self) -> &FastSheds {
        &self.fast_sheds
    }

    /// The sheds held for clients back too soon (see the server's
    /// `Connection::pace_shed`).
    pub fn held_sheds(&self) -> &HeldSheds {
        &self.held_sheds
    }

    /// Whether sheds to clients back too soon are held at all: only while
    /// holding them slows the load down (see [`PacingProbe`]).
    pub fn pacing(&self) -> &PacingProbe {
        &self.pacing
    }

    /// How many requests a second finish now, by Little's law: those in
    /// flight over how long a place is held. `None` until a place has been
    /// given back.
    pub fn answers_per_second(&self) -> Option<f64> {
        let state = self.lock();
        let hold = state.hold.as_secs_f64();
        (hold > 0.0).then(|| state.aimd.in_flight().max(1) as f64 / hold)
    }

    /// The moving average of how long a place is held (zero until one has
    /// been given back).
    pub fn hold(&self) -> Duration {
        self.lock().hold
    }

    /// The current limit and requests in flight.
    pub fn snapshot(&self) -> (usize, usize) {
        let state = self.lock();
        (state.aimd.limit(), state.aimd.in_flight())
    }

    /// Requests waiting in line now.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }
}

impl Ticket {
    /// When the request was admitted.
    pub fn admitted(&self) -> Instant {
        self.admitted
    }

    /// How long the request waited in line (zero if admitted at once).
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Admission::record_hold(&mut state, self.admitted.elapsed());
        state.aimd.release();
        state.dispatch();
    }
}

/// A request joins a line only when its expected wait is within this share
/// of the longest wait allowed. The estimate errs (sleeping clients come
/// back in bursts, the limit shrinks), and a request that then waits the
/// whole bound leaves with a slow 503; one refused at the door gets a fast
/// one. Measured at c=500: with the whole bound, 1–2% of the answers were
/// 503s after 100 ms. With half of it, such 503s were still 1.2 % of the
/// sheds of an open loop at twice the host's capacity (50 ms upstreams,
/// 2-core AMD box), so its non-2xx p99 was theirs: 27-211 ms in five
/// windows. With a fifth, 4.9-49 ms in five windows alternating with those,
/// at about as many answers there (1,840-3,000 against 1,829-2,644 2xx/s,
/// medians 2,138 and 2,300), and no fewer at c=500 (2,550 and 2,672
/// against 2,204 and 2,420) or c=5000 (2,437 and 2,506 against 2,310 and
/// 2,404) re-sending at once.
const LINE_SHARE: f64 = 0.2;

/// Weight of the newest hold time in the admission's moving average.
const HOLD_EWMA_WEIGHT: f64 = 0.05;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[tokio::test]
    async fn the_line_admits_while_the_expected_wait_fits() {
        let admission = Admission::fixed(10);
        let max_wait = Duration::from_millis(100);
        let mut held: Vec<Ticket> = Vec::new();
        for _ in 0..10 {
            held.push(admission.admit(max_wait, None).await.expect("a free place"));
        }
        // Nothing measured yet: the first in line has no reason to be
        // refused.
        assert_eq!(admission.hold(), Duration::ZERO);
        Admission::record_hold(&mut admission.lock(), Duration::from_millis(50));
        // 10 places held 50 ms each free one every 5 ms: 4 in line wait
        // 20 ms, a fifth of the bound; the 5th would wait 25 ms.
        let line: Vec<_> = (0..4)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.admit(max_wait, None).await })
            })
            .collect();
        while admission.waiting() < 4 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            admission.admit(max_wait, None).await.err(),
            Some(Refusal::LineTooLong {
                expected: Duration::from_millis(25)
            })
        );
        // A place given back goes to the first in line.
        held.pop();
        let first = line.into_iter().next().unwrap().await.unwrap().unwrap();
        assert!(first.waited() > Duration::ZERO);
        assert_eq!(admission.waiting(), 3);
    }

    #[tokio::test]
    async fn a_place_handed_to_a_request_that_left_the_line_is_given_back() {
        let admission = Admission::fixed(1);
        let held = admission.admit(MS(100), None).await.expect("a free place");
        let mut waiting = Box::pin(admission.admit(MS(100), None));
        assert!(futures_util::poll!(&mut waiting).is_pending(), "in line");
        // The place goes to the one in line, which leaves (its client hung
        // up) before it runs again to take it.
        drop(held);
        assert_eq!(admission.snapshot(), (1, 1), "handed over");
        drop(waiting);
        assert_eq!(admission.snapshot(), (1, 0), "given back");
        let next = admission.admit(MS(100), None).await;
        assert!(next.is_ok(), "the place is free again");
    }

    #[test]
    fn the_hold_time_is_a_moving_average() {
        let admission = Admission::fixed(4);
        let record = |ms| Admission::record_hold(&mut admission.lock(), MS(ms));
        record(40);
        for _ in 0..200 {
            record(80);
        }
        let hold = admission.hold().as_secs_f64() * 1e3;
        assert!((79.0..=80.0).contains(&hold), "{hold}");
        // One outlier moves it by a twentieth of the difference.
        record(1080);
        let hold = admission.hold().as_secs_f64() * 1e3;
        assert!((128.0..=131.0).contains(&hold), "{hold}");
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let admission = Admission::fixed(3);
        let t0 = Instant::now();
        let mut state = admission.lock();
        for i in 0..100 {
            state
                .aimd
                .learn(MS(if i < 50 { 5 } else { 500 }), t0 + MS(i * 10));
        }
        assert_eq!(state.aimd.limit(), 3);
    }

    #[tokio::test]
    async fn the_line_leaves_a_request_its_budget_to_run() {
        // One place, held; places are held 60 ms.
        let first_in_line = |budget| async move {
            let admission = Admission::fixed(1);
            let _held = admission.admit(MS(400), None).await.expect("a free place");
            Admission::record_hold(&mut admission.lock(), MS(60));
            let waiting = admission.admit(MS(400), budget);
            tokio::time::timeout(MS(5), waiting).await
        };
        // Without a budget, 60 ms is inside a fifth of the 400 ms bound: it
        // joins the line (and is still waiting when the test looks).
        assert!(first_in_line(None).await.is_err(), "waiting in line");
        // With 100 ms of budget, a 60 ms wait would leave 40 to run a
        // request that takes 60: refused at once.
        assert_eq!(
            first_in_line(Some(MS(100)))
                .await
                .expect("refused at once")
                .err(),
            Some(Refusal::LineTooLong { expected: MS(60) })
        );
        // With a budget of 400 ms it may wait.
        assert!(first_in_line(Some(MS(400))).await.is_err(), "waiting");
    }
}
