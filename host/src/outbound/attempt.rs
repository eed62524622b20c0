//! The record of one request's upstream attempts: what its access log line
//! lists, what admission subtracts from its latency, and each attempt's
//! client span and metrics.

use crate::metrics::Metrics;
use crate::response_cache::CacheStatus;
use crate::upstream::{TransportError, UpstreamBody};
use http::{Request, Response};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One upstream attempt of one request.
#[derive(Debug, Clone)]
pub(crate) struct CallRecord {
    pub(crate) started: Instant,
    pub(crate) upstream: String,
    pub(crate) attempt: u32,
    pub(crate) outcome: &'static str,
    pub(crate) duration: Duration,
    /// Answered without a call of its own: `hit`, `stale` or `coalesced`.
    pub(crate) cache: Option<&'static str>,
}

impl CallRecord {
    fn end(&self) -> Instant {
        self.started + self.duration
    }
}

/// The attempts of one request so far, shared between its outgoing calls
/// (which add to it) and the request (which reads it when it answers).
#[derive(Clone, Default)]
pub(crate) struct AttemptLog(Arc<Mutex<Vec<CallRecord>>>);

impl AttemptLog {
    fn push(&self, record: CallRecord) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }

    fn with<T>(&self, f: impl FnOnce(&[CallRecord]) -> T) -> T {
        f(&self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `inventory:ok:23.1ms pricing#2:timeout:150.2ms reviews:ok:0.1ms:hit`,
    /// for the access log. A request of more than [`SUMMARY_CALLS`] calls
    /// (a route that calls an upstream once per list element makes up to a
    /// thousand) is summed up per upstream instead, so that a log line stays
    /// a line: `pricing:calls=998:ok=997,timeout=1:max=48.1ms`.
    pub(crate) fn summary(&self) -> String {
        self.with(|calls| {
            if calls.len() > SUMMARY_CALLS {
                return per_upstream(calls);
            }
            calls
                .iter()
                .map(|c| {
                    let attempt = if c.attempt > 1 {
                        format!("#{}", c.attempt)
                    } else {
                        String::new()
                    };
                    let cache = c.cache.map(|c| format!(":{c}")).unwrap_or_default();
                    format!(
                        "{}{attempt}:{}:{:.1}ms{cache}",
                        c.upstream,
                        c.outcome,
                        c.duration.as_secs_f64() * 1e3
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    /// How long, between `since` and `until`, at least one attempt was in
    /// flight or the guest was backing off before a retry: the time the
    /// request spent waiting on its upstreams rather than on the host.
    pub(crate) fn upstream_wait(&self, since: Instant, until: Instant) -> Duration {
        self.with(|calls| union_of(calls, since, until))
    }
}

/// Calls an access log line lists one by one, at most.
pub(crate) const SUMMARY_CALLS: usize = 16;

/// Each upstream's calls, outcomes (cache answers as outcomes of their own)
/// and longest attempt, in the order the upstreams were first called.
fn per_upstream(calls: &[CallRecord]) -> String {
    struct Tally<'a> {
        upstream: &'a str,
        calls: usize,
        outcomes: Vec<(&'static str, usize)>,
        longest: Duration,
    }
    let mut tallies: Vec<Tally<'_>> = Vec::new();
    for call in calls {
        let at = match tallies.iter().position(|t| t.upstream == call.upstream) {
            Some(at) => at,
            None => {
                tallies.push(Tally {
                    upstream: &call.upstream,
                    calls: 0,
                    outcomes: Vec::new(),
                    longest: Duration::ZERO,
                });
                tallies.len() - 1
            }
        };
        let tally = &mut tallies[at];
        tally.calls += 1;
        tally.longest = tally.longest.max(call.duration);
        let outcome = call.cache.unwrap_or(call.outcome);
        match tally.outcomes.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, n)) => *n += 1,
            None => tally.outcomes.push((outcome, 1)),
        }
    }
    tallies
        .iter()
        .map(|t| {
            let outcomes: Vec<String> =
                t.outcomes.iter().map(|(o, n)| format!("{o}={n}")).collect();
            format!(
                "{}:calls={}:{}:max={:.1}ms",
                t.upstream,
                t.calls,
                outcomes.join(","),
                t.longest.as_secs_f64() * 1e3
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn union_of(calls: &[CallRecord], since: Instant, until: Instant) -> Duration {
    let mut spans: Vec<(Instant, Instant)> = calls
        .iter()
        .map(|c| (waited_from(calls, c).max(since), c.end().min(until)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort();
    let mut total = Duration::ZERO;
    let mut current: Option<(Instant, Instant)> = None;
    for (a, b) in spans {
        current = match current {
            Some((s, e)) if a <= e => Some((s, e.max(b))),
            Some((s, e)) => {
                total += e - s;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((s, e)) = current {
        total += e - s;
    }
    total
}

/// When the request began waiting for `call`: a retry, from the end of the
/// upstream's attempt before it (the latest to end before the retry began,
/// should a batch have several), since the guest's backoff in between is
/// waiting on the upstream too (its failure, its `Retry-After`). Counted as
/// the host's own time, each retry's 10-50 ms of backoff read as the host
/// slowing down, and the admission limit shrank under upstream faults.
fn waited_from(calls: &[CallRecord], call: &CallRecord) -> Instant {
    if call.attempt <= 1 {
        return call.started;
    }
    calls
        .iter()
        .filter(|c| c.upstream == call.upstream && c.attempt + 1 == call.attempt)
        .map(CallRecord::end)
        .filter(|end| *end <= call.started)
        .max()
        .unwrap_or(call.started)
}

/// Records an attempt when it ends, or as `timeout` if the guest drops it
/// first (its own timeout or deadline ran out).
pub(crate) struct AttemptRecorder {
    metrics: Arc<Metrics>,
    log: AttemptLog,
    upstream: String,
    attempt: u32,
    started: Instant,
    done: bool,
    cache: Option<&'static str>,
    span: tracing::Span,
}

impl AttemptRecorder {
    /// Starts the record and the client span of attempt `attempt` to
    /// `upstream`, under the request's `parent` span.
    pub(crate) fn start(
        metrics: Arc<Metrics>,
        log: AttemptLog,
        parent: &tracing::Span,
        upstream: &str,
        attempt: u32,
        request: &Request<UpstreamBody>,
    ) -> AttemptRecorder {
        AttemptRecorder {
            metrics,
            log,
            upstream: upstream.to_string(),
            attempt,
            started: Instant::now(),
            done: false,
            cache: None,
            span: client_span(parent, upstream, attempt, request),
        }
    }

    /// The attempt's client span.
    pub(crate) fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Records how the attempt ended.
    pub(crate) fn finish(mut self, result: &Result<Response<UpstreamBody>, TransportError>) {
        let cache = result
            .as_ref()
            .ok()
            .and_then(|r| r.extensions().get::<CacheStatus>().copied());
        if let Some(cache) = cache {
            self.span.record("fanout.cache", cache.as_str());
            if matches!(
                cache,
                CacheStatus::Hit | CacheStatus::Stale | CacheStatus::Coalesced
            ) {
                self.cache = Some(cache.as_str());
            }
        }
        if !self.span.is_disabled() {
            if let Ok(response) = result {
                self.span
                    .record("http.response.status_code", response.status().as_u16());
            }
            match result {
                Ok(response) if response.status().is_server_error() => {
                    self.span.record("error.type", response.status().as_str());
                }
                Ok(_) => {}
                Err(e) => {
                    self.span
                        .record("error.type", crate::error::error_code_name(e));
                }
            }
        }
        self.end(outcome(result));
    }

    fn end(&mut self, outcome: &'static str) {
        self.done = true;
        if outcome != "ok" {
            self.span.record("otel.status_code", "ERROR");
        }
        let duration = self.started.elapsed();
        self.metrics
            .client_attempt(&self.upstream, outcome, duration);
        self.log.push(CallRecord {
            started: self.started,
            upstream: self.upstream.clone(),
            attempt: self.attempt,
            outcome,
            duration,
            cache: self.cache,
        });
    }
}

impl Drop for AttemptRecorder {
    fn drop(&mut self) {
        if !self.done {
            // The guest gave up on the attempt: its timeout or deadline.
            self.span.record("error.type", "timeout");
            self.end("timeout");
        }
    }
}

/// The outcome label of an attempt's result (metrics and access log).
fn outcome(result: &Result<Response<UpstreamBody>, TransportError>) -> &'static str {
    match result {
        Ok(response) if response.status().is_server_error() => "error",
        Ok(_) => "ok",
        Err(TransportError::ConnectionLimitReached) => "shed",
        Err(TransportError::DestinationUnavailable) => "circuit_open",
        Err(e) if crate::upstream::is_timeout(e) => "timeout",
        Err(_) => "error",
    }
}

/// The client span of one attempt (OpenTelemetry HTTP client conventions).
fn client_span(
    parent: &tracing::Span,
    upstream: &str,
    attempt: u32,
    request: &Request<UpstreamBody>,
) -> tracing::Span {
    let uri = request.uri();
    let span = tracing::info_span!(
        target: crate::telemetry::SPAN_TARGET,
        parent: parent,
        "upstream",
        otel.name = %request.method(),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = %request.method(),
        server.address = uri.host().unwrap_or_default(),
        server.port = uri.port_u16().unwrap_or(80),
        url.full = %uri,
        http.request.resend_count = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        fanout.upstream = upstream,
        fanout.cache = tracing::field::Empty,
    );
    if attempt > 1 {
        span.record("http.request.resend_count", attempt - 1);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_wait_is_the_union_of_the_attempts() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let call = |from: u64, took: u64| CallRecord {
            started: t0 + ms(from),
            upstream: "u".into(),
            attempt: 1,
            outcome: "ok",
            duration: ms(took),
            cache: None,
        };
        let log = AttemptLog::default();
        // Two overlapping (10-60, 20-50), then a retry (70-90): 70 ms.
        for c in [call(10, 50), call(20, 30), call(70, 20)] {
            log.push(c);
        }
        assert_eq!(log.upstream_wait(t0, t0 + ms(100)), ms(70));
        // Clipped to the window.
        assert_eq!(log.upstream_wait(t0 + ms(30), t0 + ms(80)), ms(40));
        assert_eq!(
            AttemptLog::default().upstream_wait(t0, t0 + ms(100)),
            Duration::ZERO
        );
    }

    #[test]
    fn the_backoff_before_a_retry_is_waiting_on_the_upstream() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let call = |upstream: &str, attempt: u32, from: u64, took: u64| CallRecord {
            started: t0 + ms(from),
            upstream: upstream.into(),
            attempt,
            outcome: "ok",
            duration: ms(took),
            cache: None,
        };
        let log = AttemptLog::default();
        // pricing fails at 10-30, backs off 15 ms, retries at 45-60;
        // reviews' first attempt at 70-80 is no retry: the gap before it
        // (60-70) is the host's.
        for c in [
            call("pricing", 1, 10, 20),
            call("pricing", 2, 45, 15),
            call("reviews", 1, 70, 10),
        ] {
            log.push(c);
        }
        assert_eq!(log.upstream_wait(t0, t0 + ms(100)), ms(60));
        // A retry of one upstream does not wait from another's attempt.
        let log = AttemptLog::default();
        for c in [call("pricing", 1, 10, 20), call("reviews", 2, 45, 15)] {
            log.push(c);
        }
        assert_eq!(log.upstream_wait(t0, t0 + ms(100)), ms(35));
    }

    #[test]
    fn the_summary_names_each_attempt() {
        let t0 = Instant::now();
        let log = AttemptLog::default();
        log.push(CallRecord {
            started: t0,
            upstream: "inventory".into(),
            attempt: 1,
            outcome: "ok",
            duration: Duration::from_micros(23_140),
            cache: None,
        });
        log.push(CallRecord {
            started: t0,
            upstream: "pricing".into(),
            attempt: 2,
            outcome: "timeout",
            duration: Duration::from_micros(150_200),
            cache: None,
        });
        log.push(CallRecord {
            started: t0,
            upstream: "reviews".into(),
            attempt: 1,
            outcome: "ok",
            duration: Duration::from_micros(80),
            cache: Some("hit"),
        });
        assert_eq!(
            log.summary(),
            "inventory:ok:23.1ms pricing#2:timeout:150.2ms reviews:ok:0.1ms:hit"
        );
    }

    #[test]
    fn a_thousand_calls_are_summed_up_per_upstream() {
        let t0 = Instant::now();
        let log = AttemptLog::default();
        let call = |upstream: &str, outcome, micros, cache| CallRecord {
            started: t0,
            upstream: upstream.into(),
            attempt: 1,
            outcome,
            duration: Duration::from_micros(micros),
            cache,
        };
        log.push(call("orders", "ok", 20_000, None));
        for i in 0..997 {
            log.push(call("pricing", "ok", 10_000 + i, None));
        }
        log.push(call("pricing", "timeout", 48_100, None));
        log.push(call("pricing", "ok", 10, Some("coalesced")));
        let summary = log.summary();
        assert_eq!(
            summary,
            "orders:calls=1:ok=1:max=20.0ms pricing:calls=999:ok=997,timeout=1,coalesced=1:max=48.1ms"
        );
    }
}
