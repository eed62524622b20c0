//! Upstreams: where the guest's outgoing requests go.
//!
//! The guest calls `{base}/path`; the host routes each outgoing request by
//! the authority of its URI to the upstream registered for it. An authority
//! that nobody registered is refused with `HttpRequestDenied`, so a guest
//! reaches only what the operator configured.
//!
//! An upstream is an [`Upstream`]: one async call per request. The built-in
//! adapters are in [`adapters`](crate::adapters): real HTTP on a pooled
//! keep-alive client, JSON fixtures, in-process Rust closures, and a
//! simulator with latency and fault injection. Between the guest and the
//! adapter sit the upstream's [guardrails](crate::guard) and the
//! [`OutboundHooks`], whose default, [`default_send_request`], an override
//! can wrap.

use crate::guard::{self, Call, GuardedService, Guardrails};
use http::{Request, Response};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tower::ServiceExt;
use tracing::Instrument;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

pub use crate::adapters::{from_fn, json_response};
pub use wasmtime_wasi_http::Error as TransportError;

/// Body of the requests the guest sends and of the answers it reads.
pub type UpstreamBody = WasiBody;

/// What an upstream call resolves to.
pub type UpstreamResult = Result<Response<UpstreamBody>, TransportError>;

/// A boxed, sendable upstream future.
pub type UpstreamFuture = Pin<Box<dyn Future<Output = UpstreamResult> + Send>>;

/// One upstream service: an async function from request to response.
///
/// `options` carries the guest's `wasi:http` request options (connect and
/// first-byte timeouts); an implementation should honour them where they
/// make sense.
pub trait Upstream: Send + Sync + 'static {
    fn call(&self, request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture;
}

/// A registered upstream: its logical name, the base URL the guest is told,
/// and the guarded service that reaches it.
#[derive(Clone)]
pub struct UpstreamHandle {
    name: String,
    base_url: String,
    service: GuardedService,
    /// Served by a shared HTTP client: several such upstreams may share an
    /// authority (one gateway in front of several services).
    is_http: bool,
}

impl UpstreamHandle {
    /// An upstream behind its guardrails, as the host routes to it.
    /// `is_http` lets several such handles share an authority.
    pub fn new(
        name: String,
        base_url: String,
        upstream: Arc<dyn Upstream>,
        guardrails: &Guardrails,
        is_http: bool,
    ) -> UpstreamHandle {
        UpstreamHandle {
            name,
            base_url,
            service: guardrails.wrap(upstream),
            is_http,
        }
    }

    /// The upstream's logical name (`inventory`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL the guest was given for it.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

/// Hooks into the guest's outgoing requests, in the manner of wasmtime's
/// `WasiHttpHooks`: every method has a default, and the default of
/// [`send_request`](OutboundHooks::send_request) is a public function that an
/// override can wrap:
///
/// ```
/// use fanout_host::guard::Call;
/// use fanout_host::upstream::{OutboundHooks, UpstreamFuture, UpstreamHandle, default_send_request};
///
/// struct Tagged;
///
/// impl OutboundHooks for Tagged {
///     fn send_request(&self, upstream: &UpstreamHandle, mut call: Call) -> UpstreamFuture {
///         call.request.headers_mut().insert("x-caller", "fanout".parse().unwrap());
///         default_send_request(upstream, call)
///     }
/// }
/// ```
pub trait OutboundHooks: Send + Sync + 'static {
    /// Sends one outgoing request of the guest to `upstream`, which the
    /// routing already chose. The hint headers are stripped.
    fn send_request(&self, upstream: &UpstreamHandle, call: Call) -> UpstreamFuture {
        default_send_request(upstream, call)
    }

    /// Called when the guest asks for an authority nobody registered. The
    /// request is refused with `HttpRequestDenied` whatever this does.
    fn denied(&self, authority: &str, uri: &http::Uri) {
        tracing::warn!(%authority, %uri, "outgoing request denied: no upstream has this authority");
    }
}

/// The hooks used unless the embedder sets others.
pub struct DefaultHooks;

impl OutboundHooks for DefaultHooks {}

/// Sends `call` through `upstream`'s guardrails to its adapter.
pub fn default_send_request(upstream: &UpstreamHandle, call: Call) -> UpstreamFuture {
    let service = upstream.service.clone();
    Box::pin(async move {
        service
            .oneshot(call)
            .await
            .map_err(guard::to_transport_error)
    })
}

/// The routing table from authority to upstream.
#[derive(Clone, Default)]
pub(crate) struct Upstreams {
    by_authority: HashMap<String, UpstreamHandle>,
    all: Vec<UpstreamHandle>,
}

impl Upstreams {
    /// Registers `handle`, keyed by the authority of its base URL.
    pub(crate) fn insert(&mut self, handle: UpstreamHandle) -> Result<(), crate::Error> {
        let invalid = |reason: String| crate::Error::InvalidUpstream {
            name: handle.name.clone(),
            reason,
        };
        let uri: http::Uri = handle
            .base_url
            .parse()
            .map_err(|e| invalid(format!("base URL `{}`: {e}", handle.base_url)))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "https upstreams are not supported yet by the built-in client".into(),
                ));
            }
            _ => {
                return Err(invalid(format!(
                    "base URL `{}` must be http://",
                    handle.base_url
                )));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| invalid(format!("base URL `{}` has no host", handle.base_url)))?
            .as_str()
            .to_ascii_lowercase();
        if let Some(other) = self.by_authority.get(&authority) {
            if !(other.is_http && handle.is_http) {
                return Err(invalid(format!(
                    "authority `{authority}` is already used by upstream `{}`; \
                     requests are routed by authority, so in-process upstreams need their own",
                    other.name
                )));
            }
        } else {
            self.by_authority.insert(authority, handle.clone());
        }
        self.all.push(handle);
        Ok(())
    }

    pub(crate) fn handles(&self) -> impl Iterator<Item = &UpstreamHandle> {
        self.all.iter()
    }

    fn get(&self, authority: &str) -> Option<&UpstreamHandle> {
        self.by_authority.get(&authority.to_ascii_lowercase())
    }
}

/// The `wasi:http` hooks of one request: outgoing requests go to the
/// registered upstreams and nowhere else.
pub(crate) struct Hooks {
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) outbound: Arc<dyn OutboundHooks>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// This request's upstream attempts, for its access log line.
    pub(crate) calls: Arc<std::sync::Mutex<Vec<CallRecord>>>,
    /// The request's server span: the parent of each attempt's client span.
    pub(crate) span: tracing::Span,
}

/// One upstream attempt of one request.
#[derive(Debug, Clone)]
pub(crate) struct CallRecord {
    pub(crate) started: std::time::Instant,
    pub(crate) upstream: String,
    pub(crate) attempt: u32,
    pub(crate) outcome: &'static str,
    pub(crate) duration: std::time::Duration,
}

impl CallRecord {
    /// `inventory:ok:23.1ms pricing#2:timeout:150.2ms`, for the access log.
    pub(crate) fn summary(calls: &[CallRecord]) -> String {
        calls
            .iter()
            .map(|c| {
                let attempt = if c.attempt > 1 {
                    format!("#{}", c.attempt)
                } else {
                    String::new()
                };
                format!(
                    "{}{attempt}:{}:{:.1}ms",
                    c.upstream,
                    c.outcome,
                    c.duration.as_secs_f64() * 1e3
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How long, between `since` and `until`, at least one of `calls` was in
/// flight: the time a request spent waiting on its upstreams rather than
/// on the host.
pub(crate) fn upstream_wait(
    calls: &[CallRecord],
    since: std::time::Instant,
    until: std::time::Instant,
) -> std::time::Duration {
    let mut spans: Vec<(std::time::Instant, std::time::Instant)> = calls
        .iter()
        .map(|c| (c.started.max(since), (c.started + c.duration).min(until)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort();
    let mut total = std::time::Duration::ZERO;
    let mut current: Option<(std::time::Instant, std::time::Instant)> = None;
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

/// The outcome label of an attempt's result.
fn outcome(result: &Result<Response<WasiBody>, TransportError>) -> &'static str {
    match result {
        Ok(response) if response.status().is_server_error() => "error",
        Ok(_) => "ok",
        Err(TransportError::ConnectionLimitReached) => "shed",
        Err(TransportError::DestinationUnavailable) => "circuit_open",
        Err(
            TransportError::HttpResponseTimeout
            | TransportError::ConnectionTimeout
            | TransportError::ConnectionReadTimeout,
        ) => "timeout",
        Err(_) => "error",
    }
}

/// The `error.type` of a failed attempt: the status code of a 5xx answer,
/// or the name of the transport error (`ConnectionRefused`), low in
/// cardinality as the semantic conventions ask.
fn error_type(result: &Result<Response<WasiBody>, TransportError>) -> Option<String> {
    match result {
        Ok(response) if response.status().is_server_error() => {
            Some(response.status().as_str().to_string())
        }
        Ok(_) => None,
        Err(e) => {
            let name = format!("{e:?}");
            let end = name
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(name.len());
            Some(name[..end].to_string())
        }
    }
}

/// The client span of one attempt (OpenTelemetry HTTP client conventions).
fn client_span(
    parent: &tracing::Span,
    upstream: &str,
    attempt: u32,
    request: &Request<WasiBody>,
) -> tracing::Span {
    let uri = request.uri();
    let span = tracing::info_span!(
        target: "fanout::otel",
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
    );
    if attempt > 1 {
        span.record("http.request.resend_count", attempt - 1);
    }
    span
}

/// Records an attempt when it ends, or as `timeout` if the guest drops it
/// first (its own timeout or deadline ran out).
struct AttemptRecorder {
    metrics: Arc<crate::metrics::Metrics>,
    calls: Arc<std::sync::Mutex<Vec<CallRecord>>>,
    upstream: String,
    attempt: u32,
    started: std::time::Instant,
    done: bool,
    span: tracing::Span,
}

impl AttemptRecorder {
    fn finish(&mut self, outcome: &'static str) {
        self.done = true;
        if outcome != "ok" {
            self.span.record("otel.status_code", "ERROR");
        }
        let duration = self.started.elapsed();
        self.metrics
            .client_attempt(&self.upstream, outcome, duration);
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(CallRecord {
                started: self.started,
                upstream: self.upstream.clone(),
                attempt: self.attempt,
                outcome,
                duration,
            });
        }
    }
}

impl Drop for AttemptRecorder {
    fn drop(&mut self) {
        if !self.done {
            // The guest gave up on the attempt: its timeout or deadline.
            self.span.record("error.type", "timeout");
            self.finish("timeout");
        }
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), TransportError>> + Send>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        mut request: Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_done: IoFuture,
    ) -> Box<dyn Future<Output = Result<(Response<WasiBody>, IoFuture), TransportError>> + Send>
    {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let Some(upstream) = self.upstreams.get(&authority) else {
            self.outbound.denied(&authority, request.uri());
            // Let the guest finish writing the body first: dropping it now
            // would surface as a write error, hiding the denial.
            let body = request.into_body();
            return Box::new(async move {
                use http_body_util::BodyExt;
                let _ = body.collect().await;
                Err(TransportError::HttpRequestDenied)
            });
        };
        let hints = take_hints(request.headers_mut());
        tracing::debug!(
            upstream = %upstream.name,
            attempt = hints.attempt,
            uri = %request.uri(),
            "outgoing request"
        );
        if hints.attempt > 1 {
            self.metrics
                .retries
                .get_or_create(&crate::metrics::UpstreamLabel {
                    upstream: upstream.name.clone(),
                })
                .inc();
        }
        let span = client_span(&self.span, &upstream.name, hints.attempt, &request);
        // The upstream sees the host's client span as its parent; without an
        // exporter the guest's own `traceparent` goes out unchanged.
        if let Some(traceparent) = crate::telemetry::traceparent_of(&span) {
            request.headers_mut().insert("traceparent", traceparent);
        }
        let mut recorder = AttemptRecorder {
            metrics: self.metrics.clone(),
            calls: self.calls.clone(),
            upstream: upstream.name.clone(),
            attempt: hints.attempt,
            started: std::time::Instant::now(),
            done: false,
            span: span.clone(),
        };
        let call = self.outbound.send_request(
            upstream,
            Call {
                request,
                options: options.unwrap_or_default(),
                attempt: hints.attempt,
            },
        );
        Box::new(async move {
            let result = call.instrument(span).await;
            if !recorder.span.is_disabled() {
                if let Ok(response) = &result {
                    recorder
                        .span
                        .record("http.response.status_code", response.status().as_u16());
                }
                if let Some(error_type) = error_type(&result) {
                    recorder.span.record("error.type", error_type);
                }
            }
            recorder.finish(outcome(&result));
            let response = result?;
            // The adapters drive their connections themselves: there is no
            // per-request I/O future to hand back.
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}

/// Prefix of the headers in which the guest leaves hints for the host (the
/// attempt number, the upstream's logical name). They never leave the host.
pub const HINT_PREFIX: &str = fanout_guest::api::HINT_PREFIX;

/// What the guest said about one outgoing request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Hints {
    /// 1 for a first attempt, 2 and up for retries.
    pub(crate) attempt: u32,
}

/// Removes every hint header from `headers` and returns what they said.
pub(crate) fn take_hints(headers: &mut http::HeaderMap) -> Hints {
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(HINT_PREFIX))
        .cloned()
        .collect();
    let mut hints = Hints { attempt: 1 };
    for name in names {
        let value = headers.remove(&name);
        if name.as_str() == fanout_guest::api::HINT_ATTEMPT
            && let Some(n) = value.and_then(|v| v.to_str().ok()?.parse().ok())
        {
            hints.attempt = n;
        }
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_wait_is_the_union_of_the_attempts() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let call = |from: u64, took: u64| CallRecord {
            started: t0 + ms(from),
            upstream: "u".into(),
            attempt: 1,
            outcome: "ok",
            duration: ms(took),
        };
        // Two overlapping (10-60, 20-50), then a retry (70-90): 70 ms.
        let calls = [call(10, 50), call(20, 30), call(70, 20)];
        assert_eq!(upstream_wait(&calls, t0, t0 + ms(100)), ms(70));
        // Clipped to the window.
        assert_eq!(upstream_wait(&calls, t0 + ms(30), t0 + ms(80)), ms(40));
        assert_eq!(upstream_wait(&[], t0, t0 + ms(100)), Duration::ZERO);
    }

    #[test]
    fn hints_are_read_and_stripped() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-fanout-hint-attempt", "3".parse().unwrap());
        headers.insert("x-fanout-hint-upstream", "pricing".parse().unwrap());
        headers.insert("accept", "application/json".parse().unwrap());
        assert_eq!(take_hints(&mut headers), Hints { attempt: 3 });
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("accept"));
        // No hints: a first attempt, as from any other guest.
        assert_eq!(take_hints(&mut headers), Hints { attempt: 1 });
    }
}
