//! The circuit breaker: while open, calls fail at once; after `open_for`
//! one probe goes through (half-open) and its outcome closes or reopens it.
//!
//! Every call admitted records an outcome, however it ends ([`Outcome`]):
//! an answer (a 5xx is a failure), an error (a shed is not counted: it says
//! nothing of the upstream), or the call running out of time: timed out,
//! or dropped unfinished, which is what the guest's attempt timeout and the
//! request's deadline do to a hanging upstream. Running out of time is a
//! failure unless it says nothing of the upstream:
//! - the host itself ran late then (see [`lag`](crate::lag)): the answer
//!   may be waiting unread;
//! - or the call was cut off sooner than the upstream usually answers (the
//!   moving average of its answers): a request that spent its budget
//!   waiting in line gives its calls a few milliseconds, and their
//!   timeouts opened all three circuits of the overload benchmark within
//!   its first second (every answer a 503 for the five seconds after).
//!
//! Two rules keep a short stall at thousands of calls a second from
//! opening the circuit, which would turn it into `open_for` (5 s) of
//! refusals:
//! - timeouts of calls that were in flight together are one failure in a
//!   row, not hundreds: a call that times out counts toward
//!   `consecutive_failures` only if it began after the last one counted
//!   was recorded. A hanging upstream still opens the circuit, one attempt
//!   timeout a step; a stall it comes out of counts once.
//! - the failure rate is taken over the last `window` calls, or over all
//!   of the last second's ([`RATE_SPAN`]) when there are more: at 6,000
//!   calls a second, 100 calls are 17 ms, and a burst of timeouts filled
//!   them all.
//!
//! Both were seen together: 5,000 clients honouring `Retry-After` come
//! back in one burst each second, the upstreams (on the same two cores)
//! answer a few hundred calls late at once, and a circuit opened for its
//! five seconds, every answer a 503: in 2 of 8 windows of 10 s
//! (`fanout-bench serve-fanout`, 50 ms upstreams), and in none of 8 with
//! these rules.
//!
//! A probe has its own timeout, so that a hanging probe reopens the circuit
//! rather than holding it half-open, and runs to its end on a task of its
//! own even when its caller leaves. A caller leaves early when another
//! required upstream of its request failed: with two circuits half-open,
//! each request could take one's probe and drop it on the other's refusal,
//! so that neither ever learnt anything and both stayed shut.
//!
//! Why not `tower-resilience-circuitbreaker` (0.14, read for this): a call
//! dropped before it ends records no outcome there (its half-open permit
//! is handed back), so an upstream that hangs past every caller's timeout
//! never opens the circuit, the second defect this layer had; it also
//! takes an async mutex on every call. This one is ~300 lines and is
//! tested for exactly these cases.

use super::{Blocked, CircuitBreakerConfig};
use crate::admission::ewma;
use crate::upstream::{Call, TransportError, UpstreamBody, is_timeout};
use http::Response;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{BoxError, Layer, Service};

#[derive(Clone)]
pub(crate) struct CircuitBreakerLayer {
    state: Arc<Mutex<Breaker>>,
}

impl CircuitBreakerLayer {
    pub(crate) fn new(config: CircuitBreakerConfig) -> CircuitBreakerLayer {
        CircuitBreakerLayer {
            state: Arc::new(Mutex::new(Breaker::new(config))),
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct CircuitBreakerService<S> {
    inner: S,
    state: Arc<Mutex<Breaker>>,
}

impl<S> Service<Call> for CircuitBreakerService<S>
where
    S: Service<Call, Response = Response<UpstreamBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<UpstreamBody>;
    type Error = BoxError;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let (admitted, probe_timeout) = {
            let mut breaker = lock(&self.state);
            (breaker.admit(Instant::now()), breaker.config.probe_timeout)
        };
        let Some(probe) = admitted else {
            return Box::pin(std::future::ready(Err(Blocked::CircuitOpen.into())));
        };
        let mut pending = Pending {
            state: Some(self.state.clone()),
            probe,
            started: Instant::now(),
            timeout: call.options.first_byte_timeout,
        };
        let response = self.inner.call(call);
        if !probe {
            return Box::pin(async move {
                let result = response.await;
                pending.end(Outcome::of(&result, pending.started.elapsed()));
                result
            });
        }
        let probe = tokio::spawn(async move {
            let result = match tokio::time::timeout(probe_timeout, response).await {
                Ok(result) => result,
                // As the guest's own timeout would have said it.
                Err(_) => Err(TransportError::ConnectionReadTimeout.into()),
            };
            pending.end(Outcome::of(&result, pending.started.elapsed()));
            result
        });
        Box::pin(async move {
            // A probe that panicked is dropped unfinished: `Pending` has
            // recorded it.
            probe.await.unwrap_or_else(|e| Err(e.into()))
        })
    }
}

fn lock(state: &Mutex<Breaker>) -> std::sync::MutexGuard<'_, Breaker> {
    // The breaker's state is valid after any panic: each change is whole.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// What counts as the upstream's usual answer time until it has answered
/// once: a call cut off sooner says nothing. Below the guest's default
/// attempt timeout (150 ms), so that an upstream that hangs from the start
/// still opens its circuit; above what a request that waited in line at
/// start-up leaves its calls.
const UNKNOWN_TYPICAL: Duration = Duration::from_millis(100);

/// How a call admitted through the breaker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// An answer below 500, after this long.
    Answered(Duration),
    /// A 5xx, or an error of the upstream's (refused, reset, malformed).
    Failed,
    /// Timed out, or dropped unfinished, after this long.
    OutOfTime(Duration),
    /// Nothing learnt (a shed).
    Neutral,
}

impl Outcome {
    /// The outcome of a call that ended with `result` after `took`.
    fn of(result: &Result<Response<UpstreamBody>, BoxError>, took: Duration) -> Outcome {
        match result {
            Ok(response) if response.status().is_server_error() => Outcome::Failed,
            Ok(_) => Outcome::Answered(took),
            // A shed says nothing about the upstream's health.
            Err(e) if e.is::<tower::load_shed::error::Overloaded>() => Outcome::Neutral,
            Err(e) if e.downcast_ref::<TransportError>().is_some_and(is_timeout) => {
                Outcome::OutOfTime(took)
            }
            Err(_) => Outcome::Failed,
        }
    }

    /// A call dropped unfinished after `took`, the guest having given it
    /// `timeout`. Dropped near or past it, the call ran out of time (the
    /// guest's timer starts a little before the call reaches the host, so
    /// "near" leaves a margin). Dropped well before, the caller gave up for
    /// its own reasons: the client went away (wrk closes all its
    /// connections at the end of a run), or a required sibling failed and
    /// the guest answered without this one. That says nothing about the
    /// upstream: counted, a client closing 64 connections at once opened
    /// every circuit of a healthy host.
    fn dropped(took: Duration, timeout: Option<Duration>) -> Outcome {
        match timeout {
            Some(timeout) if took + CANCEL_MARGIN.max(timeout / 4) < timeout => Outcome::Neutral,
            _ => Outcome::OutOfTime(took),
        }
    }
}

/// An admitted call whose outcome is not recorded yet: dropped unfinished,
/// it ran out of time, unless it was dropped well before its own timeout.
struct Pending {
    /// `None` once the outcome is recorded.
    state: Option<Arc<Mutex<Breaker>>>,
    probe: bool,
    started: Instant,
    /// The guest's timeout for this attempt, when it gave one.
    timeout: Option<Duration>,
}

impl Pending {
    fn end(&mut self, outcome: Outcome) {
        let Some(state) = self.state.take() else {
            return;
        };
        // Only a call out of time asks: the rest is every answer's path.
        let lagging = matches!(outcome, Outcome::OutOfTime(_)) && crate::lag::lagging();
        lock(&state).record(outcome, self.probe, lagging, self.started, Instant::now());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.end(Outcome::dropped(took, self.timeout));
    }
}

/// The failure rate is taken over the calls of at least this long, when
/// there are more than `window` of them: a second at the calls' rate, so
/// that a burst of failures is weighed against the second around it.
const RATE_SPAN: Duration = Duration::from_secs(1);

/// The most calls the rate's window holds, whatever the rate: 1.5 MiB per
/// upstream at 24 bytes a call.
const MAX_RATE_CALLS: usize = 65_536;

/// Below a quarter of the timeout, the least margin between a call dropped
/// by its timeout and one dropped by a caller that gave up.
const CANCEL_MARGIN: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

struct Breaker {
    config: CircuitBreakerConfig,
    circuit: Circuit,
    consecutive_failures: u32,
    /// When the last timeout counted in a row was recorded: a timeout of
    /// a call begun before then belongs to the same stall.
    stall_counted_at: Option<Instant>,
    /// When each call of the rate's window ended, true for success: the
    /// last `window` calls, or the last [`RATE_SPAN`]'s when more.
    window: std::collections::VecDeque<(Instant, bool)>,
    /// Failures in `window`.
    window_failures: usize,
    probe_in_flight: bool,
    /// Moving average of how long the upstream takes to answer (weight
    /// 1/8): a call cut off sooner says nothing of its health.
    typical: Option<Duration>,
}

impl Breaker {
    fn new(config: CircuitBreakerConfig) -> Breaker {
        Breaker {
            config,
            circuit: Circuit::Closed,
            consecutive_failures: 0,
            stall_counted_at: None,
            window: Default::default(),
            window_failures: 0,
            probe_in_flight: false,
            typical: None,
        }
    }

    /// Whether a call may go through now: `Some(is_probe)`, or `None`.
    fn admit(&mut self, now: Instant) -> Option<bool> {
        match self.circuit {
            Circuit::Closed => Some(false),
            Circuit::Open { until } if now < until => None,
            Circuit::Open { .. } | Circuit::HalfOpen => {
                if self.probe_in_flight {
                    return None;
                }
                self.circuit = Circuit::HalfOpen;
                self.probe_in_flight = true;
                Some(true)
            }
        }
    }

    /// Records how a call begun at `started` ended, `lagging` saying
    /// whether the host itself ran late then.
    fn record(
        &mut self,
        outcome: Outcome,
        probe: bool,
        lagging: bool,
        started: Instant,
        now: Instant,
    ) {
        let ok = match outcome {
            Outcome::Answered(took) => {
                self.typical = Some(self.typical.map_or(took, |t| ewma(t, took)));
                true
            }
            Outcome::Failed => false,
            Outcome::OutOfTime(took)
                if !lagging && took >= self.typical.unwrap_or(UNKNOWN_TYPICAL) =>
            {
                false
            }
            Outcome::OutOfTime(_) | Outcome::Neutral => {
                if probe {
                    self.probe_in_flight = false;
                }
                return;
            }
        };
        if !ok {
            tracing::debug!(?outcome, probe, "an upstream call failed");
        }
        if !ok && !probe && matches!(outcome, Outcome::OutOfTime(_)) {
            if self.stall_counted_at.is_some_and(|at| started < at) {
                // In flight when the last counted timeout was recorded:
                // the same stall. It still weighs in the failure rate.
                self.record_in_stall(now);
                return;
            }
            self.stall_counted_at = Some(now);
        }
        self.record_health(ok, probe, now);
    }

    fn record_health(&mut self, ok: bool, probe: bool, now: Instant) {
        if probe {
            self.probe_in_flight = false;
            if ok {
                self.close();
            } else {
                self.open(now);
            }
            return;
        }
        if self.circuit != Circuit::Closed {
            // A call admitted before the circuit opened: too late to count.
            return;
        }
        self.consecutive_failures = if ok { 0 } else { self.consecutive_failures + 1 };
        let rate_tripped = self.push_to_window(ok, now);
        if self.consecutive_failures >= self.config.consecutive_failures || rate_tripped {
            self.open(now);
        }
    }

    /// A timeout of the stall last counted: a failure for the rate only.
    fn record_in_stall(&mut self, now: Instant) {
        if self.circuit == Circuit::Closed && self.push_to_window(false, now) {
            self.open(now);
        }
    }

    /// Adds an outcome to the rate's window; returns whether the failure
    /// rate is reached.
    fn push_to_window(&mut self, ok: bool, now: Instant) -> bool {
        self.window.push_back((now, ok));
        self.window_failures += usize::from(!ok);
        while self.window.len() > self.config.window
            && (self.window.len() > MAX_RATE_CALLS
                || self
                    .window
                    .front()
                    .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= RATE_SPAN))
        {
            if let Some((_, ok)) = self.window.pop_front() {
                self.window_failures -= usize::from(!ok);
            }
        }
        let calls = self.window.len();
        calls >= self.config.min_calls
            && self.window_failures as f64 >= self.config.failure_rate * calls as f64
    }

    fn open(&mut self, now: Instant) {
        tracing::warn!(open_for = ?self.config.open_for, "circuit opened");
        self.circuit = Circuit::Open {
            until: now + self.config.open_for,
        };
    }

    fn close(&mut self) {
        tracing::info!("circuit closed");
        self.circuit = Circuit::Closed;
        self.consecutive_failures = 0;
        self.stall_counted_at = None;
        self.window.clear();
        self.window_failures = 0;
    }
}

#[cfg(test)]
mod tests;
