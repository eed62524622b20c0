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
//!    one probe goes through (half-open, with its own timeout) and its
//!    outcome closes or reopens it. Every admitted call records an outcome,
//!    a call that timed out or was dropped unfinished as a failure unless
//!    the host itself ran late or the call was cut off sooner than the
//!    upstream usually answers. It
//!    sits above the concurrency limit so that an open circuit takes no
//!    slot, and it ignores sheds (they say nothing about the upstream).
//! 3. **load shed + concurrency limit**: at most `max_concurrency` calls in
//!    flight; beyond, a call fails at once instead of queueing.
//! 4. the adapter itself.
//!
//! Each refusal reaches the guest as a `wasi:http` error code it can tell
//! apart: `ConnectionLimitReached` for a shed or an exhausted retry budget,
//! `DestinationUnavailable` for an open circuit.

mod circuit_breaker;
mod retry_budget;

use crate::upstream::{Call, Upstream, UpstreamBody};
use circuit_breaker::CircuitBreakerLayer;
use http::Response;
use retry_budget::RetryBudgetLayer;
use std::sync::Arc;
use std::time::Duration;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

/// The guarded service of one upstream.
pub(crate) type GuardedService = BoxCloneSyncService<Call, Response<UpstreamBody>, BoxError>;

/// Guardrail settings of one upstream. `None` turns a guardrail off; an
/// `http` upstream starts from [`Guardrails::http_defaults`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Guardrails {
    /// Calls in flight at once; beyond, a call is shed.
    pub max_concurrency: Option<usize>,
    /// When the circuit opens, and for how long.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// How many retries the upstream takes.
    pub retry_budget: Option<RetryBudgetConfig>,
}

/// When a circuit opens, and for how long.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Opens after this many failures in a row; timeouts of calls that
    /// were in flight together count as one.
    pub consecutive_failures: u32,
    /// Or when this fraction of the last `window` calls failed...
    pub failure_rate: f64,
    /// ...over this many of the last calls, or over the last second's
    /// calls when there were more...
    pub window: usize,
    /// ...once the window holds at least this many calls.
    pub min_calls: usize,
    /// Stays open this long before letting a probe through.
    #[serde(rename = "open_ms", with = "crate::units::millis")]
    pub open_for: Duration,
    /// A probe not answered within this fails, and the circuit reopens.
    #[serde(rename = "probe_timeout_ms", with = "crate::units::millis")]
    pub probe_timeout: Duration,
}

/// The defaults are sized for an upstream that takes thousands of calls a
/// second, where a few failures in a row are ordinary. With 8 % of calls
/// failing at random (the soak's faulty upstreams) at 3,700 calls a
/// second, five in a row come about every 90 s and half of a window of 20
/// about every 5 minutes: with those as the defaults, the circuits of the
/// required upstreams opened five times in the 120 s soak, every answer a
/// 503 for `open_for` each time. Ten in a row come about once in ten
/// months at that rate, half of 100 never; an upstream that fails every
/// call still opens its circuit within ten.
impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            consecutive_failures: 10,
            failure_rate: 0.5,
            window: 100,
            min_calls: 20,
            open_for: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
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
    #[serde(rename = "window_ms", with = "crate::units::millis")]
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

/// The concurrency cap of an `http` upstream unless configured: four calls
/// per instance of the default pool (256), so that it never binds on a
/// healthy upstream, only on one that stalls and would otherwise take
/// every pooled connection and file descriptor.
pub const DEFAULT_HTTP_MAX_CONCURRENCY: usize = 1024;

impl Guardrails {
    /// What an `http` upstream gets unless configured otherwise: a
    /// concurrency cap ([`DEFAULT_HTTP_MAX_CONCURRENCY`]), a circuit breaker
    /// and a retry budget with their defaults. A remote service can fail in
    /// every way these guard against; in-process upstreams get none.
    pub fn http_defaults() -> Guardrails {
        Guardrails {
            max_concurrency: Some(DEFAULT_HTTP_MAX_CONCURRENCY),
            circuit_breaker: Some(CircuitBreakerConfig::default()),
            retry_budget: Some(RetryBudgetConfig::default()),
        }
    }

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
            if cb.probe_timeout.is_zero() {
                return Err("circuit_breaker.probe_timeout_ms must be at least 1".into());
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

/// Why a guardrail blocked a call before it reached the upstream. The
/// mapping to the guest's error code is in the host's `error` module.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// The upstream's circuit breaker is open.
    #[error("the upstream's circuit breaker is open")]
    CircuitOpen,
    /// Retries to this upstream used up their budget.
    #[error("the upstream's retry budget is used up")]
    RetryBudget,
}
