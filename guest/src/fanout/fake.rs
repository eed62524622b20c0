//! A virtual clock and a scripted transport for the fan-out's unit tests.

use super::{Attempt, Env};
use crate::errors::UpstreamFailure;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// A scripted answer: after how long, and what.
type Scripted = (Duration, Result<Value, UpstreamFailure>);

/// Milliseconds.
pub const MS: fn(u64) -> Duration = Duration::from_millis;

/// A virtual clock and a scripted upstream: each attempt takes the
/// scripted latency (or times out at its timeout) and returns the scripted
/// result, by URL if the URL is scripted, else the next in line. Nothing
/// ever waits for real: [`run`] moves the clock to the next timer whenever
/// everything waits.
pub struct FakeEnv {
    pub now: Cell<Duration>,
    timers: RefCell<Vec<(Duration, Waker)>>,
    script: RefCell<VecDeque<Scripted>>,
    by_url: RefCell<HashMap<String, Scripted>>,
    pub attempts: RefCell<Vec<(u32, Duration, Duration)>>,
    /// Each attempt's URL, start and end.
    pub calls: RefCell<Vec<(String, Duration, Duration)>>,
    pub sleeps: RefCell<Vec<Duration>>,
    seed: Cell<u64>,
    in_flight: Cell<usize>,
    /// The most attempts that were in flight at once.
    pub max_in_flight: Cell<usize>,
}

impl FakeEnv {
    pub fn new(script: Vec<(u64, Result<Value, UpstreamFailure>)>) -> FakeEnv {
        FakeEnv {
            now: Cell::new(Duration::ZERO),
            timers: RefCell::new(Vec::new()),
            script: RefCell::new(
                script
                    .into_iter()
                    .map(|(ms, r)| (Duration::from_millis(ms), r))
                    .collect(),
            ),
            by_url: RefCell::new(HashMap::new()),
            attempts: RefCell::new(Vec::new()),
            calls: RefCell::new(Vec::new()),
            sleeps: RefCell::new(Vec::new()),
            seed: Cell::new(1),
            in_flight: Cell::new(0),
            max_in_flight: Cell::new(0),
        }
    }

    /// Answers every call to `url` after `ms` with `result`.
    pub fn serve(&self, url: &str, ms: u64, result: Result<Value, UpstreamFailure>) {
        self.by_url
            .borrow_mut()
            .insert(url.to_string(), (MS(ms), result));
    }

    pub fn advance(&self, d: Duration) {
        self.now.set(self.now.get() + d);
    }

    /// Waits until the virtual clock reads `until`.
    fn until(&self, until: Duration) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.now.get() >= until {
                return Poll::Ready(());
            }
            self.timers.borrow_mut().push((until, cx.waker().clone()));
            Poll::Pending
        })
    }

    /// Moves the clock to the earliest timer and wakes what waits for it;
    /// `false` if nothing waits.
    fn tick(&self) -> bool {
        let mut timers = self.timers.borrow_mut();
        let Some(next) = timers.iter().map(|(t, _)| *t).min() else {
            return false;
        };
        self.now.set(self.now.get().max(next));
        let (due, later): (Vec<_>, Vec<_>) = timers.drain(..).partition(|(t, _)| *t <= next);
        *timers = later;
        drop(timers);
        for (_, waker) in due {
            waker.wake();
        }
        true
    }
}

impl Env for FakeEnv {
    fn now(&self) -> Duration {
        self.now.get()
    }

    async fn sleep(&self, duration: Duration) {
        self.sleeps.borrow_mut().push(duration);
        self.until(self.now.get() + duration).await;
    }

    fn random(&self) -> u64 {
        let x = self
            .seed
            .get()
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.seed.set(x);
        x >> 11
    }

    async fn attempt(&self, attempt: Attempt<'_>) -> Result<Value, UpstreamFailure> {
        let started = self.now.get();
        self.in_flight.set(self.in_flight.get() + 1);
        self.max_in_flight
            .set(self.max_in_flight.get().max(self.in_flight.get()));
        self.attempts
            .borrow_mut()
            .push((attempt.number, started, attempt.timeout));
        let scripted = self.by_url.borrow().get(&attempt.url).cloned();
        let (latency, result) = scripted.unwrap_or_else(|| {
            self.script
                .borrow_mut()
                .pop_front()
                .unwrap_or_else(|| panic!("more attempts than scripted: {}", attempt.url))
        });
        let (wait, result) = match latency >= attempt.timeout {
            true => (attempt.timeout, Err(UpstreamFailure::Timeout)),
            false => (latency, result),
        };
        self.until(started + wait).await;
        self.calls
            .borrow_mut()
            .push((attempt.url, started, self.now.get()));
        self.in_flight.set(self.in_flight.get() - 1);
        result
    }
}

/// Runs a future on the virtual clock of `env`.
pub fn run_on<F: Future>(env: &FakeEnv, future: F) -> F::Output {
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            return output;
        }
        assert!(env.tick(), "waiting for nothing: a deadlock");
    }
}
