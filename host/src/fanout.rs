//! [`Fanout`], the aggregator: what an embedding app holds. It answers one
//! request ([`Fanout::handle`]), serves a listener ([`Fanout::serve`]) and
//! its admin endpoints ([`Fanout::serve_admin`]), and mounts as a
//! `tower::Service`. Each request's work is in [`instance`](crate::instance);
//! this module wraps it in its span, its error answer and its access log.

use crate::admin::{self, AdminView};
use crate::cache::Origin;
use crate::error::{Failure, Shed};
use crate::guest_world::WasiHttpVersion;
use crate::instance::Runner;
use crate::limits::Limits;
use crate::metrics::{CauseLabel, Metrics};
use crate::outbound::AttemptLog;
use crate::response::ResponseBody;
use crate::shed_lines::ShedLines;
use crate::stats::StatsSnapshot;
use crate::telemetry::{self, ACCESS_LOG_TARGET};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Body;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tracing::Instrument;

/// The aggregator: a compiled, pre-instantiated component plus its upstreams
/// and limits. Built by `FanoutBuilder`; cheap to
/// clone, and clones share everything.
#[derive(Clone)]
pub struct Fanout {
    runner: Arc<Runner>,
    origin: Origin,
    /// Whether [`Fanout::serve`] accepts requests, for `/readyz`.
    accepting: Arc<AtomicBool>,
    /// Sheds get a few access lines a second, not one each; `None`: one
    /// each.
    shed_lines: Option<Arc<ShedLines>>,
}

impl Fanout {
    pub(crate) fn new(runner: Runner, origin: Origin, shed_lines_per_second: u32) -> Fanout {
        Fanout {
            runner: Arc::new(runner),
            origin,
            accepting: Arc::new(AtomicBool::new(false)),
            shed_lines: (shed_lines_per_second > 0)
                .then(|| Arc::new(ShedLines::new(shed_lines_per_second))),
        }
    }

    /// The per-request limits every instance runs under.
    pub fn limits(&self) -> &Limits {
        &self.runner.limits
    }

    /// The registered upstreams as `(name, base URL)`, sorted.
    pub fn upstreams(&self) -> Vec<(String, String)> {
        let mut list: Vec<_> = self
            .runner
            .upstreams
            .handles()
            .map(|h| (h.name().to_string(), h.base_url().to_string()))
            .collect();
        list.sort();
        list
    }

    /// Counters since start-up, and the gauges now.
    pub fn stats(&self) -> StatsSnapshot {
        let runner = &self.runner;
        let in_use = runner.limits.max_instances
            - runner.instances.available_permits() as u32
            - runner.idle.len() as u32;
        let limit = runner.adaptive.then(|| runner.admission.snapshot().0);
        runner.stats.snapshot(in_use, limit)
    }

    /// Whether the component was compiled at start or loaded from the cache.
    pub fn component_origin(&self) -> Origin {
        self.origin
    }

    /// Which `wasi:http` world the component exports (and is served by).
    pub fn wasi_http_version(&self) -> WasiHttpVersion {
        self.runner.pre.version()
    }

    /// The Prometheus registry of this host.
    pub fn metrics(&self) -> &Metrics {
        &self.runner.metrics
    }

    /// Serves one request in an instance. Never fails: every failure
    /// becomes a JSON error answer (see [`Failure`]).
    pub async fn handle<B>(&self, request: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tower::BoxError>,
    {
        let started = Instant::now();
        let method = request.method().clone();
        // The client chooses the path: logs and spans get a bounded copy.
        let path = telemetry::bounded(request.uri().path()).into_owned();
        let route = match &self.runner.builtin {
            Some(guest) => guest.route_label(&path),
            None => "other".into(),
        };
        let span = telemetry::server_span(&method, &route, &path);
        let mut request = request;
        telemetry::set_remote_parent(&span, request.headers());
        // The guest's spans and calls belong under the server span.
        if let Some(traceparent) = telemetry::traceparent_of(&span) {
            request.headers_mut().insert("traceparent", traceparent);
        }
        let (request, trace_id) = telemetry::with_trace_context(request);
        let attempts = AttemptLog::default();
        let mut line = AccessLine {
            metrics: self.runner.metrics.clone(),
            trace_id,
            method,
            path,
            route,
            started,
            attempts: attempts.clone(),
            span: span.clone(),
            done: false,
            shed_lines: None,
        };
        let ran = self
            .runner
            .run(request, &line.trace_id, attempts, span.clone())
            .instrument(span)
            .await;
        let response = match ran {
            Ok(response) => response,
            Err(failure) => {
                if failure.is_shed() {
                    line.shed_lines = self.shed_lines.clone();
                }
                self.failed(&failure, &line.trace_id, &line.method, &line.path)
            }
        };
        line.finish(response.status().as_u16());
        response
    }

    /// Counts and logs a request that did not get the guest's answer, and
    /// answers it.
    fn failed(
        &self,
        failure: &Failure,
        trace_id: &str,
        method: &http::Method,
        path: &str,
    ) -> Response<ResponseBody> {
        self.runner.stats.failures.fetch_add(1, Ordering::Relaxed);
        let metrics = &self.runner.metrics;
        let cause = failure.code();
        let status = failure.status().as_u16();
        if failure.is_shed() {
            // Expected under overload, and by the ten thousand per second
            // when clients ignore Retry-After: `fanout_shed_total` and a
            // few access lines a second say enough. Its cause tells a shed
            // at the door (a fast 503) from one that waited in line first.
            metrics.shed.get_or_create(&CauseLabel { cause }).inc();
            tracing::debug!(%trace_id, %method, %path, cause, status, "{}", failure.message());
        } else if failure.status().is_client_error() {
            // The client's mistake, not the guest's: the access line says it.
            tracing::debug!(%trace_id, %method, %path, cause, status, "{}", failure.message());
        } else {
            metrics.failures.get_or_create(&CauseLabel { cause }).inc();
            tracing::warn!(%trace_id, %method, %path, cause, status, "{}", failure.message());
        }
        failure.to_response(trace_id)
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown` resolves, then stops
    /// accepting and lets the requests in flight finish (bounded by the
    /// request deadline). A client that comes back on its connection sooner
    /// than a shed's `Retry-After` asked gets its next shed no sooner than
    /// that once the sheds answered at once pass their share (see
    /// [`FastSheds`](crate::admission::FastSheds)), and later when many
    /// such clients are held (see [`HeldSheds`](crate::admission::HeldSheds)).
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let fanout = self.clone();
        let grace = self.runner.limits.deadline + Duration::from_secs(1);
        // Unready from the moment shutdown begins, before the listener
        // closes, so that a load balancer stops sending first.
        let accepting = self.accepting.clone();
        accepting.store(true, Ordering::Relaxed);
        // Sheds held for clients back too soon go out when shutdown
        // begins: holds may pass the grace.
        let (release_held, released) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            accepting.store(false, Ordering::Relaxed);
            release_held.send_replace(true);
        };
        crate::http_server::serve_http(
            listener,
            shutdown,
            grace,
            self.runner.limits.connections(),
            crate::http_server::ConnectionMetrics {
                open: self.runner.metrics.connections_open.clone(),
                refused_heads: self.runner.metrics.refused_heads.clone(),
            },
            move |request, connection| {
                let (fanout, released) = (fanout.clone(), released.clone());
                async move {
                    fanout.runner.admission.pacing().arrived();
                    let response = fanout.handle(request).await;
                    if is_paced(&response)
                        && connection
                            .pace_shed(
                                &fanout.runner.admission,
                                fanout.runner.metrics.connections_open.get(),
                                &released,
                            )
                            .await
                    {
                        fanout.runner.metrics.sheds_held.inc();
                    }
                    response
                }
            },
        )
        .await
    }

    /// Serves the admin endpoints on `listener` until `shutdown`:
    /// `/metrics` (Prometheus text), `/healthz` (the process is up) and
    /// `/readyz` (200 while [`Fanout::serve`] accepts requests, 503 before
    /// and from the moment its shutdown begins).
    pub async fn serve_admin(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let view = AdminView {
            metrics: self.runner.metrics.clone(),
            accepting: self.accepting.clone(),
        };
        admin::serve(view, listener, shutdown).await
    }
}

/// Whether `response` is one a client should not answer at once with a new
/// request: the host's own sheds, and any 503 that says when to come back
/// (the guest's, when the host shed its upstream call: an open circuit
/// answers those in microseconds, and clients that re-send at once would
/// spin on them).
fn is_paced(response: &Response<ResponseBody>) -> bool {
    response.extensions().get::<Shed>().is_some()
        || (response.status() == http::StatusCode::SERVICE_UNAVAILABLE
            && response.headers().contains_key(http::header::RETRY_AFTER))
}

/// HTTP status of the access line of a client that went away before its
/// answer, as nginx logs it.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// A request's access line, metrics and span status, written once however
/// the request ends: with its answer's status, or, when the request's
/// future is dropped first (the client closed its connection), with
/// [`CLIENT_CLOSED_REQUEST`].
struct AccessLine {
    metrics: Arc<Metrics>,
    trace_id: String,
    method: http::Method,
    path: String,
    route: String,
    started: Instant,
    attempts: AttemptLog,
    span: tracing::Span,
    done: bool,
    /// Set for a shed: its line is written only if this admits it.
    shed_lines: Option<Arc<ShedLines>>,
}

impl AccessLine {
    fn finish(&mut self, status: u16) {
        self.done = true;
        let took = self.started.elapsed();
        let span = &self.span;
        span.record("http.response.status_code", status);
        if status >= 500 {
            span.record("error.type", status.to_string());
            span.record("otel.status_code", "ERROR");
        }
        self.metrics.server_request(&self.route, status, took);
        // The summary costs allocations: only when someone reads it.
        if !tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO) {
            return;
        }
        let (trace_id, method, path, route) =
            (&self.trace_id, &self.method, &self.path, &self.route);
        let duration_ms = took.as_secs_f64() * 1e3;
        let Some(shed_lines) = &self.shed_lines else {
            let upstreams = self.attempts.summary();
            tracing::info!(
                target: ACCESS_LOG_TARGET,
                %trace_id, %method, %path, %route, status, duration_ms, %upstreams,
                "request"
            );
            return;
        };
        // A shed called no upstream: no summary.
        if let Some(sheds_not_logged) = shed_lines.admit(Instant::now()) {
            tracing::info!(
                target: ACCESS_LOG_TARGET,
                %trace_id, %method, %path, %route, status, duration_ms, sheds_not_logged,
                "request"
            );
        }
    }
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        if !self.done {
            self.span.record("error.type", "client_closed_request");
            self.finish(CLIENT_CLOSED_REQUEST);
        }
    }
}

/// Fanout as a tower service, so that any Rust HTTP stack can mount it
/// (axum's `nest_service`, a tower `ServiceBuilder`, hyper's `service_fn`).
/// It is always ready and never fails: errors are JSON answers.
impl<B> tower::Service<Request<B>> for Fanout
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Admission happens per request (a full pool answers 503), so the
        // service itself never applies backpressure.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let fanout = self.clone();
        Box::pin(async move { Ok(fanout.handle(request).await) })
    }
}
