//! [`Fanout`], the aggregator: what an embedding app holds. It answers one
//! request ([`Fanout::handle`]), serves a listener ([`Fanout::serve`]) and
//! its admin endpoints ([`Fanout::serve_admin`]), and mounts as a
//! `tower::Service`. Each request's work is in [`instance`](crate::instance);
//! this module wraps it in its span, its error answer and its access log.

use crate::admin::{self, AdminView};
use crate::cache::Origin;
use crate::error::{Failure, Shed};
use crate::instance::Runner;
use crate::limits::Limits;
use crate::metrics::{CauseLabel, Metrics};
use crate::outbound::AttemptLog;
use crate::response::ResponseBody;
use crate::stats::StatsSnapshot;
use crate::telemetry::{self, ACCESS_LOG_TARGET};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Body;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
}

impl Fanout {
    pub(crate) fn new(runner: Runner, origin: Origin) -> Fanout {
        Fanout {
            runner: Arc::new(runner),
            origin,
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
        let in_use = runner.limits.max_instances - runner.instances.available_permits() as u32;
        let limit = runner.adaptive.then(|| runner.admission.snapshot().0);
        runner.stats.snapshot(in_use, limit)
    }

    /// Whether the component was compiled at start or loaded from the cache.
    pub fn component_origin(&self) -> Origin {
        self.origin
    }

    /// The Prometheus registry of this host.
    pub fn metrics(&self) -> &Metrics {
        &self.runner.metrics
    }

    /// Serves one request with a fresh instance. Never fails: every failure
    /// becomes a JSON error answer (see [`Failure`]).
    pub async fn handle<B>(&self, request: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tower::BoxError>,
    {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
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
        let ran = self
            .runner
            .run(request, &trace_id, attempts.clone(), span.clone())
            .instrument(span.clone())
            .await;
        let response = match ran {
            Ok(response) => response,
            Err(failure) => self.failed(&failure, &trace_id, &method, &path),
        };
        let took = started.elapsed();
        let status = response.status().as_u16();
        span.record("http.response.status_code", status);
        if response.status().is_server_error() {
            span.record("error.type", status.to_string());
            span.record("otel.status_code", "ERROR");
        }
        drop(span);
        self.runner.metrics.server_request(&route, status, took);
        // The summary costs allocations: only when someone reads it.
        if tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO) {
            let upstreams = attempts.summary();
            tracing::info!(
                target: ACCESS_LOG_TARGET,
                %trace_id, %method, %path, %route, status,
                duration_ms = took.as_secs_f64() * 1e3,
                %upstreams,
                "request"
            );
        }
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
            // when clients ignore Retry-After: the access line and
            // `fanout_shed_total` say enough.
            metrics.shed.inc();
            tracing::debug!(%trace_id, %method, %path, cause, status, "{}", failure.message());
        } else {
            metrics.failures.get_or_create(&CauseLabel { cause }).inc();
            tracing::warn!(%trace_id, %method, %path, cause, status, "{}", failure.message());
        }
        failure.to_response()
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown` resolves, then stops
    /// accepting and lets the requests in flight finish (bounded by the
    /// request deadline). A client that comes back on its connection sooner
    /// than a shed's `Retry-After` asked gets its next shed no sooner than
    /// that (see `Connection::pace_shed`).
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let fanout = self.clone();
        let grace = self.runner.limits.deadline + Duration::from_secs(1);
        crate::http_server::serve_http(listener, shutdown, grace, move |request, connection| {
            let fanout = fanout.clone();
            async move {
                let response = fanout.handle(request).await;
                if response.extensions().get::<Shed>().is_some() && connection.pace_shed().await {
                    fanout.runner.metrics.sheds_held.inc();
                }
                response
            }
        })
        .await
    }

    /// Serves the admin endpoints on `listener` until `shutdown`:
    /// `/metrics` (Prometheus text), `/healthz` (the process is up) and
    /// `/readyz` (the component is compiled and the pool has a free
    /// instance).
    pub async fn serve_admin(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let view = AdminView {
            metrics: self.runner.metrics.clone(),
            instances: self.runner.instances.clone(),
        };
        admin::serve(view, listener, shutdown).await
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
