//! The orchestration: call every upstream of every requested item, within
//! the request's budget, at most `max_in_flight` at once, retrying what is
//! worth retrying, and merge.
//!
//! It is written against [`Env`] (clock, sleep, randomness, one attempt), so
//! the same code runs in the component on WASI and in unit tests on a fake
//! clock with a scripted transport.

use crate::api::{self, Item, Outcome, UpstreamFailure};
use crate::config::{Config, Mode, Route, Upstream};
use crate::trace::TraceContext;
use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use std::future::Future;
use std::time::Duration;

/// A retry starts only if at least this much of the budget is left after its
/// backoff: an attempt with less could not finish, and would only add load to
/// an upstream that is already failing.
pub const MIN_RETRY_BUDGET: Duration = Duration::from_millis(10);

/// One attempt at one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt<'a> {
    pub upstream: &'a str,
    pub url: String,
    /// 1 for the first attempt.
    pub number: u32,
    /// The attempt gives up after this long (and reports a timeout).
    pub timeout: Duration,
    /// W3C `traceparent` to send: the request's trace, a span of its own.
    pub traceparent: String,
}

/// What the orchestration needs from its surroundings.
pub trait Env {
    /// Time since an arbitrary origin; monotonic.
    fn now(&self) -> Duration;
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()>;
    /// 64 random bits, for backoff jitter.
    fn random(&self) -> u64;
    /// Performs one attempt, bounded by `attempt.timeout`. Dropping the
    /// future must cancel the request.
    fn attempt(&self, attempt: Attempt<'_>)
    -> impl Future<Output = Result<Value, UpstreamFailure>>;
}

/// The time a request may take, as an absolute deadline on [`Env::now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    deadline: Duration,
}

impl Budget {
    pub fn starting_at(now: Duration, budget: Duration) -> Budget {
        Budget {
            deadline: now + budget,
        }
    }

    pub fn remaining(&self, now: Duration) -> Duration {
        self.deadline.saturating_sub(now)
    }

    /// An attempt waits for the smaller of the upstream's own timeout and
    /// what is left of the budget.
    pub fn attempt_timeout(&self, now: Duration, upstream_timeout: Duration) -> Duration {
        upstream_timeout.min(self.remaining(now))
    }
}

/// Calls one upstream for one id, retrying per its policy, within `budget`.
pub async fn call<E: Env>(
    env: &E,
    upstream: &Upstream,
    id: &str,
    budget: Budget,
    trace: &TraceContext,
) -> Result<Value, UpstreamFailure> {
    let url = upstream.url(id);
    let mut number = 1;
    let mut previous: Option<UpstreamFailure> = None;
    loop {
        let timeout = budget.attempt_timeout(env.now(), upstream.timeout);
        if timeout.is_zero() {
            return Err(UpstreamFailure::Timeout);
        }
        let failure = match env
            .attempt(Attempt {
                upstream: &upstream.name,
                url: url.clone(),
                number,
                timeout,
                traceparent: trace.child_header(env.random()),
            })
            .await
        {
            Ok(value) => return Ok(value),
            // A retry the host refused (its retry budget is spent) says
            // nothing new: report what made us retry.
            Err(UpstreamFailure::Shed(_)) if previous.is_some() => {
                return Err(previous.unwrap_or(UpstreamFailure::Timeout));
            }
            Err(failure) => failure,
        };
        if number >= upstream.retry.max_attempts || !failure.is_retryable() {
            return Err(failure);
        }
        let backoff = upstream.retry.backoff(number, env.random());
        if budget.remaining(env.now()) < backoff + MIN_RETRY_BUDGET {
            return Err(failure);
        }
        env.sleep(backoff).await;
        number += 1;
        previous = Some(failure);
    }
}

/// The result of one fan-out: the merged items, in the order of the ids,
/// and how long each upstream took (first call started to last call ended),
/// in route order.
#[derive(Debug)]
pub struct FanOut {
    pub items: Vec<Item>,
    pub timings: Vec<(String, Duration)>,
}

/// Fans out for every id of `ids` on `route` and merges each item. The
/// answer keeps the order of `ids`. At most `config.max_in_flight` calls run
/// at once across the whole request.
pub async fn fan_out<E: Env>(
    env: &E,
    config: &Config,
    route: &Route,
    ids: &[String],
    budget: Budget,
    trace: &TraceContext,
) -> FanOut {
    type Timed = (usize, Duration, Duration, Result<Value, UpstreamFailure>);
    let outcome = |id: &str, index: usize| {
        let id = id.to_string();
        let upstream = &route.upstreams[index];
        async move {
            let started = env.now();
            let result = call(env, upstream, &id, budget, trace).await;
            (index, started, env.now(), result)
        }
    };
    let per_item: Vec<Vec<Timed>> = match config.mode {
        Mode::Concurrent => {
            // One stream of calls for the whole request: `buffered` keeps at
            // most `max_in_flight` running and yields them in order.
            let calls = ids
                .iter()
                .flat_map(|id| (0..route.upstreams.len()).map(move |i| (id, i)))
                .map(|(id, i)| outcome(id, i));
            let mut results = stream::iter(calls).buffered(config.max_in_flight);
            let mut per_item = Vec::with_capacity(ids.len());
            for _ in ids {
                let mut item = Vec::with_capacity(route.upstreams.len());
                for _ in &route.upstreams {
                    if let Some(result) = results.next().await {
                        item.push(result);
                    }
                }
                per_item.push(item);
            }
            per_item
        }
        Mode::Sequential => {
            let mut per_item = Vec::with_capacity(ids.len());
            for id in ids {
                let mut item = Vec::with_capacity(route.upstreams.len());
                for i in 0..route.upstreams.len() {
                    item.push(outcome(id, i).await);
                }
                per_item.push(item);
            }
            per_item
        }
    };
    let mut spans: Vec<Option<(Duration, Duration)>> = vec![None; route.upstreams.len()];
    for &(index, started, ended, _) in per_item.iter().flatten() {
        let span = spans[index].get_or_insert((started, ended));
        span.0 = span.0.min(started);
        span.1 = span.1.max(ended);
    }
    let timings = route
        .upstreams
        .iter()
        .zip(spans)
        .filter_map(|(u, span)| span.map(|(a, b)| (u.name.clone(), b.saturating_sub(a))))
        .collect();
    let items = ids
        .iter()
        .zip(per_item)
        .map(|(id, results)| {
            let outcomes = results
                .into_iter()
                .map(|(index, _, _, result)| {
                    let upstream = &route.upstreams[index];
                    Outcome {
                        upstream: &upstream.name,
                        field: &upstream.field,
                        required: upstream.required,
                        result,
                    }
                })
                .collect();
            api::merge(id, outcomes)
        })
        .collect();
    FanOut { items, timings }
}

/// The `Server-Timing` header: one entry per upstream, then the total, in
/// milliseconds, so a browser's dev tools show the fan-out.
pub fn server_timing(timings: &[(String, Duration)], total: Duration) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(32 * (timings.len() + 1));
    let entries = timings
        .iter()
        .map(|(name, d)| (name.as_str(), d))
        .chain(std::iter::once(("total", &total)));
    for (i, (name, d)) in entries.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        // Milliseconds to a tenth, in integers: float formatting costs the
        // guest several times more fuel, on every request.
        let tenths = (d.as_micros() + 50) / 100;
        let _ = write!(out, "{name};dur={}.{}", tenths / 10, tenths % 10);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// A virtual clock and a scripted upstream: each attempt takes the
    /// scripted latency (or times out at its timeout) and returns the
    /// scripted result. Nothing ever waits for real.
    struct FakeEnv {
        now: Cell<Duration>,
        script: RefCell<VecDeque<(Duration, Result<Value, UpstreamFailure>)>>,
        attempts: RefCell<Vec<(u32, Duration, Duration)>>,
        sleeps: RefCell<Vec<Duration>>,
        seed: Cell<u64>,
    }

    impl FakeEnv {
        fn new(script: Vec<(u64, Result<Value, UpstreamFailure>)>) -> FakeEnv {
            FakeEnv {
                now: Cell::new(Duration::ZERO),
                script: RefCell::new(
                    script
                        .into_iter()
                        .map(|(ms, r)| (Duration::from_millis(ms), r))
                        .collect(),
                ),
                attempts: RefCell::new(Vec::new()),
                sleeps: RefCell::new(Vec::new()),
                seed: Cell::new(1),
            }
        }

        fn advance(&self, d: Duration) {
            self.now.set(self.now.get() + d);
        }
    }

    impl Env for FakeEnv {
        fn now(&self) -> Duration {
            self.now.get()
        }

        async fn sleep(&self, duration: Duration) {
            self.sleeps.borrow_mut().push(duration);
            self.advance(duration);
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
            self.attempts
                .borrow_mut()
                .push((attempt.number, self.now.get(), attempt.timeout));
            let (latency, result) = self
                .script
                .borrow_mut()
                .pop_front()
                .expect("more attempts than scripted");
            if latency >= attempt.timeout {
                self.advance(attempt.timeout);
                return Err(UpstreamFailure::Timeout);
            }
            self.advance(latency);
            result
        }
    }

    /// Runs a future that never really waits (the fake env never pends).
    fn run<F: Future>(future: F) -> F::Output {
        let mut future = pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("the fake env never pends"),
        }
    }

    fn upstream(timeout_ms: u64, max_attempts: u32) -> Upstream {
        let config = crate::config::Config::from_lookup(|k| match k {
            "FANOUT_CONFIG" => Some(format!(
                r#"{{"routes": [{{"path": "/p/{{id}}", "upstreams": [{{"name": "u", "url": "http://u/{{id}}",
                   "timeout_ms": {timeout_ms}, "retry": {{"max_attempts": {max_attempts},
                   "initial_backoff_ms": 10, "max_backoff_ms": 40}}}}]}}]}}"#
            )),
            _ => None,
        })
        .unwrap();
        config.routes[0].upstreams[0].clone()
    }

    /// One call for id "1" with a fresh 200 ms budget.
    fn call_200ms(env: &impl Env, upstream: &Upstream) -> Result<Value, UpstreamFailure> {
        run(call(
            env,
            upstream,
            "1",
            Budget::starting_at(MS(0), MS(200)),
            &TRACE,
        ))
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const TRACE: TraceContext = TraceContext {
        trace_id: [7; 16],
        parent_id: [1; 8],
        flags: 1,
    };

    #[test]
    fn budget_arithmetic() {
        let budget = Budget::starting_at(MS(100), MS(200));
        assert_eq!(budget.remaining(MS(100)), MS(200));
        assert_eq!(budget.remaining(MS(250)), MS(50));
        assert_eq!(budget.remaining(MS(400)), Duration::ZERO);
        assert_eq!(budget.attempt_timeout(MS(100), MS(150)), MS(150));
        assert_eq!(budget.attempt_timeout(MS(250), MS(150)), MS(50));
        assert_eq!(budget.attempt_timeout(MS(300), MS(150)), Duration::ZERO);
    }

    #[test]
    fn every_attempt_carries_the_trace_with_its_own_span() {
        let env = FakeEnv::new(vec![
            (1, Err(UpstreamFailure::Status(503))),
            (1, Ok(Value::Null)),
        ]);
        let traced = std::cell::RefCell::new(Vec::new());
        let recording = Recording {
            env: &env,
            traced: &traced,
        };
        let _ = run(call(
            &recording,
            &upstream(100, 3),
            "1",
            Budget::starting_at(MS(0), MS(200)),
            &TRACE,
        ));
        let traced = traced.borrow();
        assert_eq!(traced.len(), 2);
        for header in traced.iter() {
            let ctx = TraceContext::parse(header).expect("valid traceparent");
            assert_eq!(ctx.trace_id, TRACE.trace_id);
        }
        assert_ne!(traced[0], traced[1], "each attempt is its own span");
    }

    /// Wraps the fake env to record each attempt's traceparent.
    struct Recording<'a> {
        env: &'a FakeEnv,
        traced: &'a std::cell::RefCell<Vec<String>>,
    }

    impl Env for Recording<'_> {
        fn now(&self) -> Duration {
            self.env.now()
        }
        fn sleep(&self, d: Duration) -> impl Future<Output = ()> {
            self.env.sleep(d)
        }
        fn random(&self) -> u64 {
            self.env.random()
        }
        fn attempt(&self, a: Attempt<'_>) -> impl Future<Output = Result<Value, UpstreamFailure>> {
            self.traced.borrow_mut().push(a.traceparent.clone());
            self.env.attempt(a)
        }
    }

    #[test]
    fn server_timing_lists_upstreams_then_total() {
        let header = server_timing(
            &[
                ("inventory".into(), MS(23)),
                ("pricing".into(), Duration::from_micros(41_250)),
            ],
            MS(42),
        );
        assert_eq!(
            header,
            "inventory;dur=23.0, pricing;dur=41.3, total;dur=42.0"
        );
    }

    #[test]
    fn flaky_upstream_succeeds_on_the_third_attempt() {
        let env = FakeEnv::new(vec![
            (5, Err(UpstreamFailure::Status(503))),
            (
                5,
                Err(UpstreamFailure::Transport(
                    "ErrorCode::ConnectionRefused".into(),
                )),
            ),
            (5, Ok(serde_json::json!({"ok": true}))),
        ]);
        let result = call_200ms(&env, &upstream(100, 3));
        assert_eq!(result, Ok(serde_json::json!({"ok": true})));
        let attempts = env.attempts.borrow();
        assert_eq!(attempts.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3]);
        // Backoffs stay under their ceilings (10 ms, then 20 ms).
        let sleeps = env.sleeps.borrow();
        assert!(sleeps[0] <= MS(10) && sleeps[1] <= MS(20), "{sleeps:?}");
    }

    #[test]
    fn hard_down_upstream_costs_at_most_max_attempts() {
        let env = FakeEnv::new(vec![(1, Err(UpstreamFailure::Status(503))); 10]);
        let result = call_200ms(&env, &upstream(100, 3));
        assert_eq!(result, Err(UpstreamFailure::Status(503)));
        assert_eq!(env.attempts.borrow().len(), 3);
        assert!(env.now() < MS(200));
    }

    #[test]
    fn client_errors_are_not_retried() {
        for failure in [
            UpstreamFailure::Status(404),
            UpstreamFailure::Status(400),
            UpstreamFailure::Status(500),
            UpstreamFailure::Denied,
            UpstreamFailure::Shed("limit".into()),
        ] {
            let env = FakeEnv::new(vec![(1, Err(failure.clone())), (1, Ok(Value::Null))]);
            let result = call_200ms(&env, &upstream(100, 3));
            assert_eq!(result, Err(failure));
            assert_eq!(env.attempts.borrow().len(), 1);
        }
    }

    #[test]
    fn attempt_timeouts_are_cut_to_the_budget_and_retried_while_it_lasts() {
        // Every attempt hangs. Timeout 150 ms in a 200 ms budget: the first
        // attempt gets 150 ms, the retry gets what is left, then no more.
        let env = FakeEnv::new(vec![(10_000, Ok(Value::Null)); 5]);
        let result = call_200ms(&env, &upstream(150, 5));
        assert_eq!(result, Err(UpstreamFailure::Timeout));
        let attempts = env.attempts.borrow();
        assert_eq!(attempts[0].2, MS(150));
        assert!(attempts.len() == 2, "{attempts:?}");
        // The retry's timeout ends exactly at the deadline.
        let (_, started, timeout) = attempts[1];
        assert_eq!(started + timeout, MS(200));
        assert_eq!(env.now(), MS(200));
    }

    #[test]
    fn no_retry_starts_that_cannot_finish() {
        // 195 ms of a 200 ms budget are gone after the first failure: the
        // retry would have under MIN_RETRY_BUDGET, so it is not started.
        let env = FakeEnv::new(vec![
            (195, Err(UpstreamFailure::Status(503))),
            (1, Ok(Value::Null)),
        ]);
        let result = call_200ms(&env, &upstream(1000, 3));
        assert_eq!(result, Err(UpstreamFailure::Status(503)));
        assert_eq!(env.attempts.borrow().len(), 1);
    }

    #[test]
    fn a_retry_the_host_sheds_reports_the_original_failure() {
        let env = FakeEnv::new(vec![
            (1, Err(UpstreamFailure::Status(503))),
            (0, Err(UpstreamFailure::Shed("retry budget".into()))),
        ]);
        let result = call_200ms(&env, &upstream(100, 3));
        assert_eq!(result, Err(UpstreamFailure::Status(503)));
        assert_eq!(env.attempts.borrow().len(), 2);
    }

    #[test]
    fn an_exhausted_budget_calls_nothing() {
        let env = FakeEnv::new(vec![]);
        let budget = Budget::starting_at(MS(0), MS(200));
        env.advance(MS(200));
        assert_eq!(
            run(call(&env, &upstream(100, 3), "1", budget, &TRACE)),
            Err(UpstreamFailure::Timeout)
        );
    }

    #[test]
    fn fan_out_merges_in_id_order() {
        let env = FakeEnv::new(vec![
            (1, Ok(serde_json::json!({"n": 1}))),
            (1, Ok(serde_json::json!({"n": 2}))),
        ]);
        let config = crate::config::Config::from_lookup(|k| match k {
            "FANOUT_CONFIG" => Some(
                r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "u", "url": "http://u/{id}"}]}]}"#.into(),
            ),
            _ => None,
        })
        .unwrap();
        let ids = vec!["a".to_string(), "b".to_string()];
        let items = run(fan_out(
            &env,
            &config,
            &config.routes[0],
            &ids,
            Budget::starting_at(MS(0), MS(200)),
            &TRACE,
        ));
        let fan_out = items;
        // The fake clock advanced 1 ms per attempt, one after the other.
        assert_eq!(fan_out.timings, [("u".to_string(), MS(2))]);
        let summary: Vec<(String, Value)> = fan_out
            .items
            .into_iter()
            .map(|i| (i.id, i.result.unwrap()["u"].clone()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a".into(), serde_json::json!({"n": 1})),
                ("b".into(), serde_json::json!({"n": 2}))
            ]
        );
    }
}
