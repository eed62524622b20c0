//! The circuit breaker: while open, calls fail at once; after `open_for`
//! one probe goes through (half-open) and its outcome closes or reopens it.
//!
//! Every call admitted records an outcome, however it ends: an answer (a
//! 5xx is a failure), an error (a shed is not counted: it says nothing of
//! the upstream), or the call being dropped unfinished, which is what the
//! guest's attempt timeout and the request's deadline do to a hanging
//! upstream: a failure. A timeout or a drop while the host itself runs
//! late (see [`lag`](crate::lag)) is not counted either. A probe has its own timeout, so that a hanging
//! probe reopens the circuit rather than holding it half-open.
//!
//! Why not `tower-resilience-circuitbreaker` (0.14, read for this): a call
//! dropped before it ends records no outcome there (its half-open permit
//! is handed back), so an upstream that hangs past every caller's timeout
//! never opens the circuit, the second defect this layer had; it also
//! takes an async mutex on every call. This one is ~250 lines and is
//! tested for exactly these cases.

use super::{Blocked, CircuitBreakerConfig};
use crate::upstream::{Call, TransportError, UpstreamBody};
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
        };
        let response = self.inner.call(call);
        Box::pin(async move {
            let result = if probe {
                match tokio::time::timeout(probe_timeout, response).await {
                    Ok(result) => result,
                    // As the guest's own timeout would have said it.
                    Err(_) => Err(TransportError::ConnectionReadTimeout.into()),
                }
            } else {
                response.await
            };
            let outcome = match &result {
                Ok(response) if response.status().is_server_error() => Some(false),
                Ok(_) => Some(true),
                // A shed says nothing about the upstream's health.
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => None,
                // Nor does a timeout while the host ran late (see `lag`).
                Err(e) if is_timeout(e) && crate::lag::lagging() => None,
                Err(_) => Some(false),
            };
            pending.end(outcome);
            result
        })
    }
}

fn lock(state: &Mutex<Breaker>) -> std::sync::MutexGuard<'_, Breaker> {
    // The breaker's state is valid after any panic: each change is whole.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// An admitted call whose outcome is not recorded yet: dropped unfinished,
/// it records a failure.
struct Pending {
    /// `None` once the outcome is recorded.
    state: Option<Arc<Mutex<Breaker>>>,
    probe: bool,
}

impl Pending {
    /// Records the outcome (`None`: the call says nothing either way).
    fn end(&mut self, outcome: Option<bool>) {
        let Some(state) = self.state.take() else {
            return;
        };
        let mut breaker = lock(&state);
        match outcome {
            Some(ok) => breaker.record(ok, self.probe, Instant::now()),
            None if self.probe => breaker.probe_in_flight = false,
            None => {}
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Dropped unfinished: a deadline passed. While the host ran late,
        // the wait was the host's as much as the upstream's.
        let lagging = self.state.is_some() && crate::lag::lagging();
        self.end(if lagging { None } else { Some(false) });
    }
}

/// Whether `error` is a call that ran out of time.
fn is_timeout(error: &BoxError) -> bool {
    matches!(
        error.downcast_ref::<TransportError>(),
        Some(TransportError::ConnectionReadTimeout | TransportError::ConnectionTimeout)
    )
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
            probe_timeout: Duration::from_millis(50),
        }
    }

    /// A breaker (open for 50 ms, probes time out after 50 ms) around an
    /// upstream that hangs while `hang` is set and answers 200 otherwise.
    fn guarded(
        hang: Arc<std::sync::atomic::AtomicBool>,
    ) -> impl Service<Call, Response = Response<UpstreamBody>, Error = BoxError, Future: Send> + Clone
    {
        use std::sync::atomic::Ordering;
        let upstream = tower::service_fn(move |_call: Call| {
            let hang = hang.load(Ordering::SeqCst);
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok::<_, BoxError>(Response::new(crate::response::full_body("{}")))
            }
        });
        let config = CircuitBreakerConfig {
            open_for: Duration::from_millis(50),
            ..config()
        };
        CircuitBreakerLayer::new(config).layer(upstream)
    }

    fn call() -> Call {
        Call {
            request: http::Request::new(crate::response::full_body("")),
            options: Default::default(),
            attempt: 1,
        }
    }

    fn is_open(result: &Result<Response<UpstreamBody>, BoxError>) -> bool {
        matches!(result, Err(e) if e.downcast_ref::<Blocked>() == Some(&Blocked::CircuitOpen))
    }

    #[tokio::test]
    async fn calls_dropped_unfinished_count_as_failures() {
        use tower::ServiceExt;
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let service = guarded(hang.clone());
        // The guest's attempt timeout drops each call: three failures.
        for _ in 0..3 {
            let call = service.clone().oneshot(call());
            assert!(
                tokio::time::timeout(Duration::from_millis(5), call)
                    .await
                    .is_err()
            );
        }
        assert!(is_open(&service.clone().oneshot(call()).await), "open");
    }

    #[tokio::test]
    async fn a_hanging_probe_reopens_and_a_later_probe_closes() {
        use std::sync::atomic::Ordering;
        use tower::ServiceExt;
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let service = guarded(hang.clone());
        for _ in 0..3 {
            let call = service.clone().oneshot(call());
            let _ = tokio::time::timeout(Duration::from_millis(5), call).await;
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Half-open: the probe hangs, and its own timeout ends it.
        let started = Instant::now();
        let probe = service.clone().oneshot(call()).await;
        assert!(
            matches!(
                probe
                    .as_ref()
                    .err()
                    .and_then(|e| e.downcast_ref::<TransportError>()),
                Some(TransportError::ConnectionReadTimeout)
            ),
            "{:?}",
            probe.map(|r| r.status())
        );
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(is_open(&service.clone().oneshot(call()).await), "reopened");

        // A probe the caller drops reopens it too, rather than wedging it.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let dropped = service.clone().oneshot(call());
        assert!(
            tokio::time::timeout(Duration::from_millis(5), dropped)
                .await
                .is_err()
        );
        assert!(is_open(&service.clone().oneshot(call()).await), "reopened");

        // The upstream recovers: the next probe closes the circuit.
        hang.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let probe = service.clone().oneshot(call()).await;
        assert_eq!(probe.unwrap().status(), http::StatusCode::OK);
        for _ in 0..5 {
            let after = service.clone().oneshot(call()).await;
            assert_eq!(after.unwrap().status(), http::StatusCode::OK, "closed");
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
