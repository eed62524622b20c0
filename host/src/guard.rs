//! Cross-request guardrails on the way to each upstream, as tower layers.
//!
//! A guest instance lives for one request, so anything that must remember
//! across requests lives here. Each upstream gets its own stack, outermost
//! first:
//!
//! 1. **retry budget**: a retry attempt (the guest marks it) is refused once
//!    retries would exceed the configured fraction of the upstream's calls;
//!    refusing first means a refused retry costs nothing below.
//! 2. **circuit breaker**: while open, calls fail at once; after `open_for`
//!    one probe goes through (half-open) and its outcome closes or reopens it.
//!    It sits above the concurrency limit so that an open circuit takes no
//!    slot, and it ignores sheds (they say nothing about the upstream).
//! 3. **load shed + concurrency limit**: at most `max_concurrency` calls in
//!    flight; beyond, a call fails at once instead of queueing.
//! 4. the adapter itself.
//!
//! Each refusal reaches the guest as a `wasi:http` error code it can tell
//! apart: `ConnectionLimitReached` for a shed or an exhausted retry budget,
//! `DestinationUnavailable` for an open circuit.

use crate::upstream::{TransportError, Upstream, UpstreamBody};
use http::{Request, Response};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use wasmtime_wasi_http::RequestOptions;

/// One outgoing request of the guest, as the guardrails see it.
pub struct Call {
    pub request: Request<UpstreamBody>,
    pub options: RequestOptions,
    /// 1 for a first attempt, 2 and up for the guest's retries.
    pub attempt: u32,
}

/// The guarded service of one upstream.
pub(crate) type GuardedService = BoxCloneSyncService<Call, Response<UpstreamBody>, BoxError>;

/// Guardrail settings of one upstream. `None` turns a guardrail off.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Guardrails {
    pub max_concurrency: Option<usize>,
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    pub retry_budget: Option<RetryBudgetConfig>,
}

/// When a circuit opens, and for how long.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Opens after this many failures in a row.
    pub consecutive_failures: u32,
    /// Or when this fraction of the last `window` calls failed...
    pub failure_rate: f64,
    pub window: usize,
    /// ...once the window holds at least this many calls.
    pub min_calls: usize,
    /// Stays open this long before letting a probe through.
    #[serde(rename = "open_ms", with = "millis")]
    pub open_for: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            open_for: Duration::from_secs(5),
        }
    }
}

/// How many retries an upstream takes, relative to its first attempts.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Retries may add at most this fraction of the first attempts...
    pub ratio: f32,
    /// ...plus this many per second regardless...
    pub min_per_sec: u32,
    /// ...counted over this sliding window.
    #[serde(rename = "window_ms", with = "millis")]
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_per_sec: 10,
            window: Duration::from_secs(10),
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl Guardrails {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_concurrency == Some(0) {
            return Err("max_concurrency must be at least 1".into());
        }
        if let Some(cb) = &self.circuit_breaker {
            if cb.consecutive_failures == 0 || cb.window == 0 || cb.min_calls > cb.window {
                return Err(
                    "circuit_breaker needs consecutive_failures >= 1 and 1 <= min_calls <= window"
                        .into(),
                );
            }
            if !(0.0..=1.0).contains(&cb.failure_rate) || cb.failure_rate == 0.0 {
                return Err("circuit_breaker.failure_rate must be in (0, 1]".into());
            }
        }
        if let Some(rb) = &self.retry_budget
            && (!(0.0..=1000.0).contains(&rb.ratio) || rb.window < Duration::from_secs(1))
        {
            return Err("retry_budget needs 0 <= ratio <= 1000 and window_ms >= 1000".into());
        }
        Ok(())
    }

    /// Builds the guarded service around `upstream`.
    pub(crate) fn wrap(&self, upstream: Arc<dyn Upstream>) -> GuardedService {
        let adapter = tower::service_fn(move |call: Call| {
            let response = upstream.call(call.request, call.options);
            async move { response.await.map_err(BoxError::from) }
        });
        let limited = ServiceBuilder::new()
            .option_layer(
                self.max_concurrency
                    .map(|_| tower::load_shed::LoadShedLayer::new()),
            )
            .option_layer(
                self.max_concurrency
                    .map(tower::limit::ConcurrencyLimitLayer::new),
            )
            .service(adapter);
        let service = ServiceBuilder::new()
            .option_layer(self.retry_budget.clone().map(RetryBudgetLayer::new))
            .option_layer(self.circuit_breaker.clone().map(CircuitBreakerLayer::new))
            .service(limited)
            .map_err(Into::<BoxError>::into);
        BoxCloneSyncService::new(service)
    }
}

/// Why a guardrail refused a call.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    #[error("the upstream's circuit breaker is open")]
    CircuitOpen,
    #[error("the upstream's retry budget is used up")]
    RetryBudget,
}

/// The guest-facing error code for whatever the stack failed with.
pub(crate) fn to_transport_error(error: BoxError) -> TransportError {
    let error = match error.downcast::<TransportError>() {
        Ok(transport) => return *transport,
        Err(other) => other,
    };
    if error.is::<tower::load_shed::error::Overloaded>() {
        return TransportError::ConnectionLimitReached;
    }
    match error.downcast_ref::<Refused>() {
        Some(Refused::CircuitOpen) => TransportError::DestinationUnavailable,
        Some(Refused::RetryBudget) => TransportError::ConnectionLimitReached,
        None => TransportError::InternalError(Some(error.to_string())),
    }
}

// --- retry budget -------------------------------------------------------

#[derive(Clone)]
pub(crate) struct RetryBudgetLayer {
    budget: Arc<TpsBudget>,
}

impl RetryBudgetLayer {
    fn new(config: RetryBudgetConfig) -> RetryBudgetLayer {
        RetryBudgetLayer {
            budget: Arc::new(TpsBudget::new(
                config.window,
                config.min_per_sec,
                config.ratio,
            )),
        }
    }
}

impl<S> Layer<S> for RetryBudgetLayer {
    type Service = RetryBudgetService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryBudgetService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct RetryBudgetService<S> {
    inner: S,
    budget: Arc<TpsBudget>,
}

impl<S> Service<Call> for RetryBudgetService<S>
where
    S: Service<Call, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future =
        futures_util::future::Either<std::future::Ready<Result<S::Response, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        // tower's TpsBudget: first attempts deposit, retries withdraw.
        if call.attempt <= 1 {
            self.budget.deposit();
        } else if !self.budget.withdraw() {
            return futures_util::future::Either::Left(std::future::ready(Err(
                Refused::RetryBudget.into(),
            )));
        }
        futures_util::future::Either::Right(self.inner.call(call))
    }
}

// --- circuit breaker ----------------------------------------------------
//
// tower has no circuit breaker, and the crates that offer one are either
// unmaintained or bring their own runtime; this one is ~100 lines and knows
// which failures count (sheds do not).

#[derive(Clone)]
pub(crate) struct CircuitBreakerLayer {
    state: Arc<Mutex<Breaker>>,
}

impl CircuitBreakerLayer {
    fn new(config: CircuitBreakerConfig) -> CircuitBreakerLayer {
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
        let admitted = self.state.lock().unwrap().admit(Instant::now());
        let Some(probe) = admitted else {
            return Box::pin(std::future::ready(Err(Refused::CircuitOpen.into())));
        };
        let state = self.state.clone();
        let response = self.inner.call(call);
        Box::pin(async move {
            let result = response.await;
            let outcome = match &result {
                Ok(response) if response.status().is_server_error() => Some(false),
                Ok(_) => Some(true),
                // A shed says nothing about the upstream's health.
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => None,
                Err(_) => Some(false),
            };
            let mut breaker = state.lock().unwrap();
            match outcome {
                Some(ok) => breaker.record(ok, probe, Instant::now()),
                None if probe => breaker.probe_in_flight = false,
                None => {}
            }
            result
        })
    }
}

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
    /// Outcomes of the last `window` calls, true for success.
    window: std::collections::VecDeque<bool>,
    probe_in_flight: bool,
}

impl Breaker {
    fn new(config: CircuitBreakerConfig) -> Breaker {
        Breaker {
            config,
            circuit: Circuit::Closed,
            consecutive_failures: 0,
            window: Default::default(),
            probe_in_flight: false,
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

    fn record(&mut self, ok: bool, probe: bool, now: Instant) {
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
        self.window.push_back(ok);
        if self.window.len() > self.config.window {
            self.window.pop_front();
        }
        self.consecutive_failures = if ok { 0 } else { self.consecutive_failures + 1 };
        let failures = self.window.iter().filter(|ok| !**ok).count();
        let rate_tripped = self.window.len() >= self.config.min_calls
            && failures as f64 >= self.config.failure_rate * self.window.len() as f64;
        if self.consecutive_failures >= self.config.consecutive_failures || rate_tripped {
            self.open(now);
        }
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
        self.window.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: 10,
            min_calls: 6,
            open_for: Duration::from_millis(100),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_when_half_open() {
        let mut b = Breaker::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.admit(t0), Some(false));
            b.record(false, false, t0);
        }
        assert_eq!(b.admit(t0), None, "open");
        assert_eq!(b.admit(t0 + Duration::from_millis(99)), None);
        let later = t0 + Duration::from_millis(100);
        assert_eq!(b.admit(later), Some(true), "one probe when half-open");
        assert_eq!(b.admit(later), None, "only one probe at a time");
        b.record(false, true, later);
        assert_eq!(b.admit(later), None, "a failed probe reopens");
        let later = later + Duration::from_millis(100);
        assert_eq!(b.admit(later), Some(true));
        b.record(true, true, later);
        assert_eq!(b.admit(later), Some(false), "a good probe closes");
    }

    #[test]
    fn opens_on_failure_rate() {
        let mut b = Breaker::new(config());
        let t0 = Instant::now();
        // Alternating: never 3 in a row, but half of the calls fail.
        for i in 0..6 {
            assert_eq!(b.admit(t0), Some(false), "call {i}");
            b.record(i % 2 == 0, false, t0);
        }
        assert_eq!(b.admit(t0), None);
    }

    #[test]
    fn successes_keep_it_closed() {
        let mut b = Breaker::new(config());
        let t0 = Instant::now();
        for i in 0..100 {
            assert_eq!(b.admit(t0), Some(false));
            b.record(i % 5 != 0, false, t0);
        }
    }
}
