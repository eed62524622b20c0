//! The circuit breaker: while open, calls fail at once; after `open_for`
//! one probe goes through (half-open) and its outcome closes or reopens it.
//!
//! tower has no circuit breaker, and the crates that offered one were
//! unmaintained or brought their own runtime when this was written; this
//! one is small and knows which failures count (sheds do not).

use super::{Blocked, CircuitBreakerConfig};
use crate::upstream::{Call, UpstreamBody};
use http::Response;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
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
        let admitted = self.state.lock().unwrap().admit(Instant::now());
        let Some(probe) = admitted else {
            return Box::pin(std::future::ready(Err(Blocked::CircuitOpen.into())));
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
    use std::time::Duration;

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
