//! The guest's outgoing requests, from `wasi:http` to an upstream.
//!
//! Each request the guest sends goes, in order, through:
//!
//! 1. `hints`: the guest's hint headers are read and stripped;
//! 2. `routing`: the upstream is chosen by hinted name and authority, and
//!    an authority nobody registered is refused (`HttpRequestDenied`);
//! 3. `attempt`: the attempt's client span, metrics and access-log record
//!    start (and end however the call ends);
//! 4. the [`OutboundHooks`], whose default [`default_send_request`] sends
//!    the call through the upstream's [guardrails](crate::guard) to its
//!    [adapter](crate::adapters).

mod attempt;
mod hints;
mod routing;

pub(crate) use attempt::AttemptLog;
pub use hints::HINT_PREFIX;
pub use routing::UpstreamHandle;
pub(crate) use routing::Upstreams;

use crate::metrics::{Metrics, UpstreamLabel};
use crate::upstream::{Call, TransportError, UpstreamBody, UpstreamFuture};
use attempt::AttemptRecorder;
use http::{Request, Response};
use std::future::Future;
use std::sync::Arc;
use tower::ServiceExt;
use tracing::Instrument;
use wasmtime_wasi_http::{RequestOptions, WasiHttpHooks};

/// Hooks into the guest's outgoing requests, in the manner of wasmtime's
/// `WasiHttpHooks`: every method has a default, and the default of
/// [`send_request`](OutboundHooks::send_request) is a public function that an
/// override can wrap:
///
/// ```
/// use fanout_host::outbound::{OutboundHooks, UpstreamHandle, default_send_request};
/// use fanout_host::upstream::{Call, UpstreamFuture};
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
            .map_err(crate::error::guarded_error_code)
    })
}

/// The `wasi:http` hooks of one request: outgoing requests go to the
/// registered upstreams and nowhere else.
#[derive(Clone)]
pub(crate) struct RequestHooks {
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) outbound: Arc<dyn OutboundHooks>,
    pub(crate) metrics: Arc<Metrics>,
    /// This request's upstream attempts, for its access log line.
    pub(crate) attempts: AttemptLog,
    /// The request's server span: the parent of each attempt's client span.
    pub(crate) span: tracing::Span,
}

type IoFuture = Box<dyn Future<Output = Result<(), TransportError>> + Send>;

impl WasiHttpHooks for RequestHooks {
    fn send_request(
        &mut self,
        mut request: Request<UpstreamBody>,
        options: Option<RequestOptions>,
        _response_done: IoFuture,
    ) -> Box<dyn Future<Output = Result<(Response<UpstreamBody>, IoFuture), TransportError>> + Send>
    {
        let hints = hints::take_hints(request.headers_mut());
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let Some(upstream) = self.upstreams.route(&authority, hints.upstream.as_deref()) else {
            self.outbound.denied(&authority, request.uri());
            // Let the guest finish writing the body first: dropping it now
            // would surface as a write error, hiding the denial.
            let body = request.into_body();
            return Box::new(async move {
                let _ = crate::adapters::read_limited(body).await;
                Err(TransportError::HttpRequestDenied)
            });
        };
        tracing::debug!(
            upstream = %upstream.name(),
            attempt = hints.attempt,
            uri = %request.uri(),
            "outgoing request"
        );
        if hints.attempt > 1 {
            self.metrics
                .retries
                .get_or_create(&UpstreamLabel {
                    upstream: upstream.name().to_string(),
                })
                .inc();
        }
        let recorder = AttemptRecorder::start(
            self.metrics.clone(),
            self.attempts.clone(),
            &self.span,
            upstream.name(),
            hints.attempt,
            &request,
        );
        let span = recorder.span().clone();
        // The upstream sees the host's client span as its parent; without an
        // exporter the guest's own `traceparent` goes out unchanged.
        if let Some(traceparent) = crate::telemetry::traceparent_of(&span) {
            request.headers_mut().insert("traceparent", traceparent);
        }
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
            recorder.finish(&result);
            let response = result?;
            // The adapters drive their connections themselves: there is no
            // per-request I/O future to hand back.
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}
