//! The request path: one fresh instance per request, bounded by the limits,
//! and the HTTP server around it.

use crate::ResponseBody;
use crate::adapters::HttpUpstream;
use crate::error::{Error, Failure};
use crate::guard::Guardrails;
use crate::limits::{GUEST_OUTPUT_CAPACITY, HANDOFF_BUFFER, Limits};
use crate::metrics::{CauseLabel, Metrics};
use crate::runtime::{self, EpochTicker};
use crate::upstream::{
    CallRecord, DefaultHooks, Hooks, OutboundHooks, Upstream, UpstreamHandle, Upstreams,
};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Body;
use std::borrow::Cow;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tracing::Instrument;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode as OutparamError, Scheme};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Builds a [`Fanout`]. Everything is validated and the component compiled in
/// [`build`](FanoutBuilder::build), before anything listens.
pub struct FanoutBuilder {
    component: ComponentSource,
    limits: Limits,
    upstreams: Vec<PendingUpstream>,
    env: Vec<(String, String)>,
    http: HttpUpstream,
    hooks: Arc<dyn OutboundHooks>,
    cache_dir: Option<PathBuf>,
    admission: Admission,
    guest_threads: Option<usize>,
}

/// How requests are admitted before they get an instance. Either way, a
/// request that finds no place waits in line for up to
/// [`Limits::queue_wait`], when its expected wait fits, and is otherwise
/// shed at once with a 503 and `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Up to `max_instances` at once.
    Fixed,
    /// A limit learnt from latency (see [`admission`](crate::admission)),
    /// at most `max_instances`: the default. `None` derives the settings
    /// from the limits.
    Adaptive(Option<crate::admission::AdmissionConfig>),
}

struct PendingUpstream {
    name: String,
    base_url: String,
    upstream: Arc<dyn Upstream>,
    guardrails: Guardrails,
    is_http: bool,
}

enum ComponentSource {
    /// The guest built from `guest/`, whose configuration the host knows.
    BuiltIn,
    Bytes(Cow<'static, [u8]>),
    Path(PathBuf),
}

impl Default for FanoutBuilder {
    fn default() -> Self {
        FanoutBuilder {
            component: ComponentSource::BuiltIn,
            limits: Limits::default(),
            upstreams: Vec::new(),
            env: Vec::new(),
            http: HttpUpstream::default(),
            hooks: Arc::new(DefaultHooks),
            cache_dir: None,
            admission: Admission::Adaptive(None),
            guest_threads: None,
        }
    }
}

impl FanoutBuilder {
    /// Runs this component (a `wasi:http/proxy` component, as bytes) instead
    /// of the built-in guest.
    pub fn component_bytes(mut self, bytes: impl Into<Cow<'static, [u8]>>) -> Self {
        self.component = ComponentSource::Bytes(bytes.into());
        self
    }

    /// Runs the component at `path` instead of the built-in guest.
    pub fn component_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.component = ComponentSource::Path(path.into());
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Registers upstream `name`: the guest is told `base_url` (through the
    /// `FANOUT_UPSTREAM_<NAME>` environment variable) and its requests to
    /// that authority go to `upstream`. A second call with the same name
    /// replaces the first.
    pub fn upstream(
        self,
        name: impl Into<String>,
        base_url: impl Into<String>,
        upstream: Arc<dyn Upstream>,
    ) -> Self {
        self.add_upstream(name.into(), base_url.into(), upstream, false)
    }

    fn add_upstream(
        mut self,
        name: String,
        base_url: String,
        upstream: Arc<dyn Upstream>,
        is_http: bool,
    ) -> Self {
        // A replaced upstream keeps the guardrails set for its name.
        let guardrails = self
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.guardrails.clone())
            .unwrap_or_default();
        self.upstreams.retain(|u| u.name != name);
        self.upstreams.push(PendingUpstream {
            name,
            base_url,
            upstream,
            guardrails,
            is_http,
        });
        self
    }

    /// Registers upstream `name` served over HTTP at `base_url` by
    /// `upstream` (for example an [`HttpUpstream`] with its own timeouts).
    /// Upstreams registered this way may share an authority.
    pub fn http_upstream_with(
        self,
        name: impl Into<String>,
        base_url: impl Into<String>,
        upstream: HttpUpstream,
    ) -> Self {
        self.add_upstream(name.into(), base_url.into(), Arc::new(upstream), true)
    }

    /// Sets the cross-request guardrails of upstream `name` (registered
    /// before or after this call).
    pub fn guardrails(mut self, name: &str, guardrails: Guardrails) -> Self {
        match self.upstreams.iter_mut().find(|u| u.name == name) {
            Some(upstream) => upstream.guardrails = guardrails,
            None => self.upstreams.push(PendingUpstream {
                name: name.to_string(),
                base_url: String::new(),
                upstream: Arc::new(HttpUpstream::default()),
                guardrails,
                is_http: false,
            }),
        }
        self
    }

    /// Caches the compiled component in `dir`, so that the next start with
    /// the same component and engine settings skips compilation (see
    /// [`cache`](crate::cache)). Off by default in the library; the `fanout`
    /// binary turns it on.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// How requests are admitted ([`Admission::Adaptive`] by default: see
    /// BENCHMARKS.md for the two under overload).
    pub fn admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// Runs the guests on a runtime of their own with `threads` workers,
    /// apart from the caller's runtime that accepts connections and sheds.
    /// Under overload a shed 503 is then answered in about 2 ms (p99)
    /// rather than 6 ms, at the price of about a quarter of the throughput
    /// at saturation; see BENCHMARKS.md. Off by default: the guests run on
    /// the caller's runtime.
    ///
    /// Each request crosses between the runtimes once each way: the guest's
    /// answer is read to its end (up to [`HANDOFF_BUFFER`]) before it goes
    /// back, so its first byte leaves when its last is written, and a
    /// guest that fails before then gets its failure's own answer (a 504
    /// at the deadline) instead of a broken body. A larger body streams.
    pub fn guest_threads(mut self, threads: usize) -> Self {
        self.guest_threads = Some(threads.max(1));
        self
    }

    /// Hooks into every outgoing request (see [`OutboundHooks`]).
    pub fn outbound_hooks(mut self, hooks: Arc<dyn OutboundHooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Registers upstream `name` served over real HTTP at `base_url`, on the
    /// shared pooled client.
    pub fn http_upstream(self, name: impl Into<String>, base_url: impl Into<String>) -> Self {
        let http = Arc::new(self.http.clone());
        self.add_upstream(name.into(), base_url.into(), http, true)
    }

    /// Registers the built-in in-process demo upstreams.
    pub fn demo_upstreams(mut self) -> Self {
        for (name, base, upstream) in crate::demo::upstreams() {
            self = self.upstream(name, base, upstream);
        }
        self
    }

    /// Sets an extra environment variable for the guest (for example
    /// `FANOUT_DEADLINE_MS`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Validates the configuration, compiles and links the component, and
    /// starts the epoch ticker.
    pub fn build(self) -> Result<Fanout, Error> {
        self.limits.validate()?;
        let mut upstreams = Upstreams::default();
        let mut env = self.env;
        for pending in self.upstreams {
            let name = pending.name;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::InvalidUpstream {
                    name,
                    reason: "names are made of A-Z, a-z, 0-9 and '_'".into(),
                });
            }
            if pending.base_url.is_empty() {
                return Err(Error::InvalidUpstream {
                    name,
                    reason: "guardrails were set, but no upstream was registered".into(),
                });
            }
            pending
                .guardrails
                .validate()
                .map_err(|reason| Error::InvalidUpstream {
                    name: name.clone(),
                    reason,
                })?;
            env.push((
                format!("FANOUT_UPSTREAM_{}", name.to_ascii_uppercase()),
                pending.base_url.clone(),
            ));
            upstreams.insert(UpstreamHandle::new(
                name,
                pending.base_url,
                pending.upstream,
                &pending.guardrails,
                pending.is_http,
            ))?;
        }

        let collections = match self.component {
            ComponentSource::BuiltIn => Some(validate_guest_config(&env, &self.limits)?),
            _ => None,
        };

        let engine = runtime::engine(&self.limits).map_err(Error::wasmtime)?;
        let bytes: Cow<'_, [u8]> = match &self.component {
            ComponentSource::BuiltIn => Cow::Borrowed(crate::GUEST_COMPONENT),
            ComponentSource::Bytes(bytes) => Cow::Borrowed(bytes),
            ComponentSource::Path(path) => {
                Cow::Owned(std::fs::read(path).map_err(|source| Error::ReadComponent {
                    path: path.clone(),
                    source,
                })?)
            }
        };
        let (component, origin) =
            crate::cache::load_or_compile(&engine, &bytes, self.cache_dir.as_deref())
                .map_err(|e| Error::Component(format!("{e:#}")))?;
        tracing::debug!(?origin, "component ready");

        let mut linker = Linker::<RequestState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(Error::wasmtime)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(Error::wasmtime)?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(ProxyPre::new)
            .map_err(|e| Error::Component(format!("{e:#}")))?;

        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Fanout {
            inner: Arc::new(Inner {
                pre,
                limits: self.limits,
                upstreams: Arc::new(upstreams),
                hooks: self.hooks,
                env,
                instances: Arc::new(Semaphore::new(self.limits.max_instances as usize)),
                stats: Stats::default(),
                metrics: Arc::new(Metrics::default()),
                guest_budget: collections.as_ref().map(|(_, budget)| *budget),
                collections: collections.map(|(c, _)| c).unwrap_or_default(),
                origin,
                admission: match self.admission {
                    Admission::Fixed => {
                        crate::admission::Admission::fixed(self.limits.max_instances as usize)
                    }
                    Admission::Adaptive(config) => {
                        crate::admission::Admission::new(config.unwrap_or_else(|| {
                            crate::admission::AdmissionConfig::new(
                                self.limits.max_instances as usize,
                            )
                        }))
                    }
                },
                adaptive: matches!(self.admission, Admission::Adaptive(_)),
                guests: self.guest_threads.map(GuestRuntime::new).transpose()?,
                _ticker: ticker,
            }),
        })
    }
}

/// Reads the built-in guest's configuration from the environment it will get,
/// exactly as the guest will, so that a mistake is a start-up error naming
/// the key rather than a 500 on every request.
fn validate_guest_config(
    env: &[(String, String)],
    limits: &Limits,
) -> Result<(Vec<String>, Duration), Error> {
    let lookup = |key: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let config =
        fanout_guest::config::Config::from_lookup(lookup).map_err(|e| Error::GuestConfig {
            key: e.key,
            reason: e.reason,
        })?;
    if config.max_deadline >= limits.deadline {
        return Err(Error::GuestConfig {
            key: "max_deadline_ms".into(),
            reason: format!(
                "the guest's largest budget ({} ms) must be below the host's deadline ({} ms), \
                 or the host cuts requests before the guest can answer them",
                config.max_deadline.as_millis(),
                limits.deadline.as_millis()
            ),
        });
    }
    // A request that waited in line as long as its budget has none left to
    // run. Clients may ask for up to the largest budget: a line that long
    // serves nobody; one as long as the default budget serves only those
    // who ask for more, which is worth a word at start-up.
    if limits.queue_wait >= config.max_deadline {
        return Err(Error::InvalidLimit {
            key: "queue_wait",
            reason: format!(
                "{} ms is as long as the guest's largest budget ({} ms): a request that \
                 waited that long would have no time left to run; keep it well below its \
                 default budget ({} ms)",
                limits.queue_wait.as_millis(),
                config.max_deadline.as_millis(),
                config.deadline.as_millis(),
            ),
        });
    }
    if limits.queue_wait >= config.deadline {
        tracing::warn!(
            queue_wait_ms = limits.queue_wait.as_millis() as u64,
            budget_ms = config.deadline.as_millis() as u64,
            "the line may be as long as the guest's default budget: a request that waits \
             that long is answered 503 queue_timeout instead of running"
        );
    }
    Ok((
        config.routes.into_iter().map(|r| r.collection).collect(),
        config.deadline,
    ))
}

/// The aggregator: a compiled, pre-instantiated component plus its upstreams
/// and limits. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<Inner>,
}

struct Inner {
    pre: ProxyPre<RequestState>,
    limits: Limits,
    upstreams: Arc<Upstreams>,
    hooks: Arc<dyn OutboundHooks>,
    env: Vec<(String, String)>,
    instances: Arc<Semaphore>,
    stats: Stats,
    metrics: Arc<Metrics>,
    /// Collections of the built-in guest's routes (`/products`), for the
    /// `route` label; empty for another component.
    collections: Vec<String>,
    /// The built-in guest's default budget; `None` for another component.
    guest_budget: Option<Duration>,
    origin: crate::cache::Origin,
    /// The admission limit and its line; a fixed one for
    /// [`Admission::Fixed`].
    admission: crate::admission::Admission,
    adaptive: bool,
    /// Where the guests run: apart from the runtime that accepts
    /// connections and answers sheds (see [`GuestRuntime`]).
    guests: Option<GuestRuntime>,
    // Dropped last among the fields that matter: stops and joins the thread.
    _ticker: EpochTicker,
}

/// A tokio runtime of its own for the guests
/// ([`FanoutBuilder::guest_threads`]).
///
/// Under overload the CPU is full of guest work. On one runtime, a new
/// request waits in the same run queue as the guests' tasks before the host
/// can even decide to shed it, so a 503 took 13–20 ms (p99) at c=500. On
/// their own threads, the connections get their share of the CPU from the
/// kernel's scheduler, and a shed is answered at once. Dropped without
/// waiting: the guests still running are cut off with it.
struct GuestRuntime(Option<tokio::runtime::Runtime>);

impl GuestRuntime {
    fn new(workers: usize) -> Result<GuestRuntime, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("fanout-guest")
            .enable_all()
            .build()?;
        Ok(GuestRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Counters since start-up.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    failures: AtomicU64,
    fuel_consumed: AtomicU64,
    instantiations: AtomicU64,
    instantiate_nanos: AtomicU64,
}

/// A snapshot of [`Fanout::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests that got an instance.
    pub requests: u64,
    /// Requests answered by the host instead of the guest (traps, limits).
    pub failures: u64,
    /// Fuel consumed by all finished requests.
    pub fuel_consumed: u64,
    /// Instantiations and the time they took in total.
    pub instantiations: u64,
    pub instantiate_time: Duration,
    /// Instances running right now.
    pub instances_in_use: u32,
    /// The adaptive admission limit now (`None` with fixed admission).
    pub admission_limit: Option<usize>,
}

/// Per-request store data.
struct RequestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: Hooks,
    limiter: MemoryLimiter,
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// [`StoreLimits`] plus a record of whether it refused to grow a memory, so
/// that the trap that follows (usually an abort in the guest's allocator) is
/// reported as what it is.
struct MemoryLimiter {
    limits: StoreLimits,
    memory_denied: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.memory_denied |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl Fanout {
    pub fn builder() -> FanoutBuilder {
        FanoutBuilder::default()
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The registered upstreams as `(name, base URL)`.
    pub fn upstreams(&self) -> Vec<(String, String)> {
        let mut list: Vec<_> = self
            .inner
            .upstreams
            .handles()
            .map(|h| (h.name().to_string(), h.base_url().to_string()))
            .collect();
        list.sort();
        list
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        StatsSnapshot {
            requests: s.requests.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            fuel_consumed: s.fuel_consumed.load(Ordering::Relaxed),
            instantiations: s.instantiations.load(Ordering::Relaxed),
            instantiate_time: Duration::from_nanos(s.instantiate_nanos.load(Ordering::Relaxed)),
            instances_in_use: self.inner.limits.max_instances
                - self.inner.instances.available_permits() as u32,
            admission_limit: self
                .inner
                .adaptive
                .then(|| self.inner.admission.snapshot().0),
        }
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
        let route = self.route_label(&path);
        let span = server_span(&method, &route, &path);
        let mut request = request;
        crate::telemetry::set_remote_parent(&span, request.headers());
        // The guest's spans and calls belong under the server span.
        if let Some(traceparent) = crate::telemetry::traceparent_of(&span) {
            request.headers_mut().insert("traceparent", traceparent);
        }
        let (request, trace_id) = with_trace_context(request);
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let ran = self
            .run(request, &trace_id, calls.clone(), span.clone())
            .instrument(span.clone())
            .await;
        let response = match ran {
            Ok(response) => response,
            Err(failure) => {
                self.inner.stats.failures.fetch_add(1, Ordering::Relaxed);
                let metrics = &self.inner.metrics;
                let cause = failure.code();
                let status = failure.status().as_u16();
                if failure.is_shed() {
                    // Expected under overload, and by the ten thousand per
                    // second when clients ignore Retry-After: the access
                    // line and `fanout_shed_total` say enough.
                    metrics.shed.inc();
                    tracing::debug!(%trace_id, %method, %path, cause, status, "{}", failure.message());
                } else {
                    metrics.failures.get_or_create(&CauseLabel { cause }).inc();
                    tracing::warn!(%trace_id, %method, %path, cause, status, "{}", failure.message());
                }
                failure.to_response()
            }
        };
        let took = started.elapsed();
        let status = response.status().as_u16();
        span.record("http.response.status_code", status);
        if response.status().is_server_error() {
            span.record("error.type", status.to_string());
            span.record("otel.status_code", "ERROR");
        }
        drop(span);
        self.inner.metrics.server_request(&route, status, took);
        // The summary costs allocations: only when someone reads it.
        if tracing::enabled!(target: "fanout::access", tracing::Level::INFO) {
            let upstreams = CallRecord::summary(&calls.lock().unwrap_or_else(|e| e.into_inner()));
            tracing::info!(
                target: "fanout::access",
                %trace_id, %method, %path, %route, status,
                duration_ms = took.as_secs_f64() * 1e3,
                %upstreams,
                "request"
            );
        }
        response
    }

    /// The metrics label for `path`: a route template of the built-in guest
    /// (`/products/{id}`, `/products`), or `other` (bounded cardinality).
    fn route_label(&self, path: &str) -> String {
        for collection in &self.inner.collections {
            if path == collection {
                return collection.clone();
            }
            if path
                .strip_prefix(collection.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
            {
                return format!("{collection}/{{id}}");
            }
        }
        "other".into()
    }

    /// Whether the component was compiled at start or loaded from the cache.
    pub fn component_origin(&self) -> crate::cache::Origin {
        self.inner.origin
    }

    /// The Prometheus registry of this host.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
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
        let fanout = self.clone();
        serve_http(listener, shutdown, Duration::from_secs(1), move |request| {
            let fanout = fanout.clone();
            async move { fanout.admin(request.uri().path()) }
        })
        .await
    }

    fn admin(&self, path: &str) -> Response<ResponseBody> {
        use http_body_util::BodyExt;
        let text = |status: http::StatusCode, content_type: &'static str, body: String| {
            let mut response = Response::new(
                http_body_util::Full::new(Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *response.status_mut() = status;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            response
        };
        match path {
            "/metrics" => text(
                http::StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.inner.metrics.encode(),
            ),
            "/healthz" => text(
                http::StatusCode::OK,
                "application/json",
                r#"{"status":"ok"}"#.into(),
            ),
            "/readyz" => {
                let free = self.inner.instances.available_permits();
                let status = if free > 0 {
                    http::StatusCode::OK
                } else {
                    http::StatusCode::SERVICE_UNAVAILABLE
                };
                let state = if free > 0 { "ready" } else { "busy" };
                text(
                    status,
                    "application/json",
                    format!(r#"{{"status":"{state}","instances_free":{free}}}"#),
                )
            }
            _ => crate::error_response(
                http::StatusCode::NOT_FOUND,
                "not_found",
                "admin endpoints: /metrics, /healthz, /readyz",
            ),
        }
    }

    async fn run<B>(
        &self,
        request: Request<B>,
        trace_id: &str,
        calls: Arc<std::sync::Mutex<Vec<CallRecord>>>,
        span: tracing::Span,
    ) -> Result<Response<ResponseBody>, Failure>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tower::BoxError>,
    {
        use http_body_util::BodyExt;
        let mut request = request.map(|body| body.map_err(incoming_body_error));
        // wasi:http requires an authority. An HTTP/1.0 client or an
        // embedding app may send none: the guest gets `localhost`.
        if request.uri().authority().is_none()
            && !request.headers().contains_key(http::header::HOST)
        {
            request.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_static("localhost"),
            );
        }
        let inner = &self.inner;
        let limits = inner.limits;
        // Admission happens at the door, before an instance is spent: the
        // limit (learnt, or the pool's size) and its line. A place is held
        // as long as the instance, so the pool always has one for it. A
        // request that waited has the wait taken out of its budget.
        use crate::admission::Refusal;
        let admitted = inner.admission.admit(limits.queue_wait).await;
        let waited = match &admitted {
            Ok(ticket) => ticket.waited(),
            Err(Refusal::WaitedTooLong { waited }) => *waited,
            Err(_) => Duration::ZERO,
        };
        if !waited.is_zero() {
            inner.metrics.queue_wait.observe(waited.as_secs_f64());
        }
        let ticket = admitted.map_err(|refusal| match refusal {
            Refusal::AtLimit { limit } if inner.adaptive => Failure::Overloaded { limit },
            Refusal::AtLimit { .. } => Failure::PoolFull {
                max_instances: limits.max_instances,
            },
            Refusal::LineTooLong { expected } => Failure::QueueFull {
                expected_wait: expected,
                max_wait: limits.queue_wait,
            },
            Refusal::WaitedTooLong { waited } => Failure::QueueTimeout { waited },
        })?;
        let admitted_at = ticket.admitted();
        let permit =
            inner
                .instances
                .clone()
                .try_acquire_owned()
                .map_err(|_| Failure::PoolFull {
                    max_instances: limits.max_instances,
                })?;
        if waited > WAIT_WORTH_CHARGING {
            self.charge_wait(&mut request, waited)?;
        }
        inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        inner.metrics.instances_in_use.inc();

        let calls_seen = calls.clone();
        let stdout = MemoryOutputPipe::new(GUEST_OUTPUT_CAPACITY);
        let stderr = MemoryOutputPipe::new(GUEST_OUTPUT_CAPACITY);
        let mut store = Store::new(
            inner.pre.engine(),
            RequestState {
                wasi: WasiCtx::builder()
                    .envs(&inner.env)
                    .stdout(stdout.clone())
                    .stderr(stderr.clone())
                    .build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                hooks: Hooks {
                    upstreams: inner.upstreams.clone(),
                    outbound: inner.hooks.clone(),
                    metrics: inner.metrics.clone(),
                    calls,
                    span,
                },
                limiter: MemoryLimiter {
                    limits: StoreLimitsBuilder::new()
                        .memory_size(limits.memory_bytes)
                        .build(),
                    memory_denied: false,
                },
            },
        );
        store.limiter(|state| &mut state.limiter);
        let internal = |e: wasmtime::Error| Failure::Internal(format!("{e:#}"));
        if let Some(fuel) = limits.fuel {
            store.set_fuel(fuel).map_err(internal)?;
            store
                .fuel_async_yield_interval(runtime::fuel_yield_interval())
                .map_err(internal)?;
        }
        store.set_epoch_deadline(limits.epoch_ticks());
        store.epoch_deadline_trap();

        let (sender, receiver) = oneshot::channel();
        let http = store.data_mut().http();
        let (request, outparam) = (|| {
            let mut http = http;
            let request = http.new_incoming_request(Scheme::Http, request)?;
            let outparam = http.new_response_outparam(sender)?;
            Ok((request, outparam))
        })()
        .map_err(internal)?;

        // How the guest failed, if it did: set before the store (and with it
        // the body's sender) is dropped, so that a body it leaves unfinished
        // ends in an error, not in what looks like a complete answer.
        let cut = Arc::new(std::sync::OnceLock::new());
        let cut_seen = GuestCut {
            failure: cut.clone(),
            metrics: inner.metrics.clone(),
            trace_id: trace_id.to_string(),
        };
        let task_inner = inner.clone();
        let answer_inner = inner.clone();
        let trace_id = trace_id.to_string();
        // The guest keeps streaming the body after the head is returned, and
        // still holds its pool slot while it does.
        let guest = async move {
            let inner = task_inner;
            let ran = tokio::time::timeout(limits.deadline, async {
                let t0 = Instant::now();
                let proxy = inner.pre.instantiate_async(&mut store).await?;
                inner.stats.record_instantiation(t0.elapsed());
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, outparam)
                    .await
            })
            .await;
            if let Some(fuel) = limits.fuel {
                let used = fuel.saturating_sub(store.get_fuel().unwrap_or(0));
                inner.stats.fuel_consumed.fetch_add(used, Ordering::Relaxed);
                inner.metrics.fuel.observe(used as f64);
            }
            log_guest_output("stdout", &stdout, &trace_id);
            log_guest_output("stderr", &stderr, &trace_id);
            let failure = match ran {
                Err(_elapsed) => Some(Failure::Deadline {
                    deadline: limits.deadline,
                }),
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(classify(&e, store.data().limiter.memory_denied, &limits)),
            };
            if let Some(failure) = &failure {
                let _ = cut.set(failure.clone());
            }
            // The store holds the instance's pool slot: free the slot before
            // the permit, or a request admitted in between finds the pool
            // full ("maximum concurrent limit reached").
            drop(store);
            drop(permit);
            drop(ticket);
            inner.metrics.instances_in_use.dec();
            failure
        };
        match &inner.guests {
            // In a task of its own, which outlives the answer's head.
            None => {
                let task = tokio::spawn(guest);
                let ended = async move { task.await.map_err(|join| join.to_string()) };
                let response =
                    answer(answer_inner, receiver, ended, calls_seen, admitted_at).await?;
                Ok(response.map(|body| cut_seen.guard(body)))
            }
            // The whole exchange happens over there, in one task, body
            // included: the connection's runtime is woken once, for a
            // finished answer, not for each frame of a stream.
            Some(guests) => guests
                .handle()
                .spawn(async move {
                    let (outcome_tx, outcome) = oneshot::channel();
                    let guest = async move {
                        let _ = outcome_tx.send(guest.await);
                    };
                    let answered = async move {
                        let ended = async move { outcome.await.map_err(|e| e.to_string()) };
                        let response =
                            answer(answer_inner, receiver, ended, calls_seen, admitted_at).await?;
                        buffer_body(response, HANDOFF_BUFFER, cut_seen).await
                    };
                    // Both in this task; a guest still running once the
                    // answer is ready (a body beyond the buffer, work after
                    // the answer) goes on in a task of its own.
                    let (mut guest, mut answered) = (Box::pin(guest), std::pin::pin!(answered));
                    let mut guest_done = false;
                    let answer = loop {
                        tokio::select! {
                            answer = &mut answered => break answer,
                            () = &mut guest, if !guest_done => guest_done = true,
                        }
                    };
                    if !guest_done {
                        tokio::spawn(guest);
                    }
                    answer
                })
                .await
                .unwrap_or_else(|join| {
                    Err(Failure::Internal(format!("guest task failed: {join}")))
                }),
        }
    }

    /// Takes the time a request waited for an instance out of its budget, so
    /// that the answer still comes within the budget its client counts
    /// from: a smaller `x-request-timeout-ms` for the guest. Without the
    /// header the built-in guest's default budget is the base; another
    /// component's budget is unknown to the host, and is left alone.
    fn charge_wait<B>(&self, request: &mut Request<B>, waited: Duration) -> Result<(), Failure> {
        const HEADER: &str = fanout_guest::api::TIMEOUT_HEADER;
        let asked = request
            .headers()
            .get(HEADER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_millis);
        // A malformed header is the guest's to reject, with its own error.
        if asked.is_none() && request.headers().contains_key(HEADER) {
            return Ok(());
        }
        let Some(budget) = asked.or(self.inner.guest_budget) else {
            return Ok(());
        };
        let left = budget.saturating_sub(waited).as_millis() as u64;
        if left == 0 {
            return Err(Failure::QueueTimeout { waited });
        }
        request
            .headers_mut()
            .insert(HEADER, http::HeaderValue::from(left));
        Ok(())
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown` resolves, then stops
    /// accepting and lets the requests in flight finish (bounded by the
    /// request deadline).
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let fanout = self.clone();
        let grace = self.inner.limits.deadline + Duration::from_secs(1);
        serve_http(listener, shutdown, grace, move |request| {
            let fanout = fanout.clone();
            async move { fanout.handle(request).await }
        })
        .await
    }
}

/// Waits for the guest's response head and learns from its timing; when
/// the guest ended without one, `task` says why.
async fn answer(
    inner: Arc<Inner>,
    receiver: oneshot::Receiver<Result<Response<ResponseBody>, OutparamError>>,
    task: impl Future<Output = Result<Option<Failure>, String>>,
    calls: Arc<std::sync::Mutex<Vec<CallRecord>>>,
    admitted_at: Instant,
) -> Result<Response<ResponseBody>, Failure> {
    let answered = receiver.await;
    // The time to the response head, less the time spent waiting on
    // upstreams, is what the limiter learns from.
    let upstream_wait = {
        let calls = calls.lock().unwrap_or_else(|e| e.into_inner());
        crate::upstream::upstream_wait(&calls, admitted_at, Instant::now())
    };
    inner.admission.learn(admitted_at, upstream_wait);
    if inner.adaptive {
        inner
            .metrics
            .admission_limit
            .set(inner.admission.snapshot().0 as i64);
    }
    match answered {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(code)) => Err(Failure::NoResponse(format!(
            "the guest answered with error code {code:?}"
        ))),
        // The sender was dropped with the store: the task ended without
        // an answer, and its result says why.
        Err(_) => match task.await {
            Ok(Some(failure)) => Err(failure),
            Ok(None) => Err(Failure::NoResponse(
                "the handler returned without setting a response".into(),
            )),
            Err(join) => Err(Failure::Internal(format!("guest task failed: {join}"))),
        },
    }
}

/// What a guest that failed after sending its answer's head left behind:
/// the failure (set by the guest's task), and where to report it.
struct GuestCut {
    failure: Arc<std::sync::OnceLock<Failure>>,
    metrics: Arc<Metrics>,
    trace_id: String,
}

impl GuestCut {
    fn guard(self, body: ResponseBody) -> ResponseBody {
        use http_body_util::BodyExt;
        CutOff { body, cut: self }.boxed_unsync()
    }
}

/// A guest's answer body that ends in an error when the guest failed
/// before finishing it.
///
/// wasmtime-wasi-http ends the body cleanly when the store is dropped with
/// the body unfinished (a trap, fuel, the deadline), so that the client
/// would take a truncated answer for a complete one. Here that end becomes
/// `HttpResponseIncomplete`: hyper then leaves out the last chunk (or closes
/// the connection short of the announced length) and the client sees the
/// cut.
struct CutOff {
    body: ResponseBody,
    cut: GuestCut,
}

impl Body for CutOff {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => match this.cut.failure.get() {
                Some(failure) => {
                    let cause = failure.code();
                    this.cut
                        .metrics
                        .failures
                        .get_or_create(&CauseLabel { cause })
                        .inc();
                    tracing::warn!(
                        trace_id = %this.cut.trace_id, cause,
                        "the guest failed after its answer's head was sent, \
                         the body is cut off: {}", failure.message()
                    );
                    Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
                }
                None => Poll::Ready(None),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // The end is only known once the inner body has said so and the
        // guest's outcome has been looked at.
        false
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Reads up to `cap` bytes of `response`'s body before handing it on, so
/// that a small body crosses to the connection's runtime in one piece.
///
/// The head is not out yet: a guest that fails before its body ends gets
/// the failure's own answer (a 504 at the deadline, say) rather than a
/// broken body. A body that is larger or has trailers is replayed as far as
/// it was read and streams the rest, [guarded](GuestCut::guard) as on one
/// runtime.
async fn buffer_body(
    response: Response<ResponseBody>,
    cap: usize,
    cut: GuestCut,
) -> Result<Response<ResponseBody>, Failure> {
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    let (parts, mut body) = response.into_parts();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0;
    let rest = loop {
        match body.frame().await {
            None => break None,
            Some(Ok(frame)) if frame.is_data() && size < cap => {
                let data = frame.into_data().unwrap_or_default();
                size += data.len();
                chunks.push(data);
            }
            Some(Ok(frame)) => break Some(frame),
            Some(Err(e)) => {
                return Err(cut.failure.get().cloned().unwrap_or_else(|| {
                    Failure::NoResponse(format!("the guest aborted its answer's body: {e}"))
                }));
            }
        }
    };
    let body = match rest {
        None => {
            if let Some(failure) = cut.failure.get() {
                return Err(failure.clone());
            }
            let whole = match chunks.len() {
                1 => chunks.pop().unwrap_or_default(),
                _ => Bytes::from(chunks.concat()),
            };
            http_body_util::Full::new(whole)
                .map_err(|never| match never {})
                .boxed_unsync()
        }
        Some(next) => {
            use futures_util::StreamExt;
            let read = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))))
                .chain(futures_util::stream::once(async move { Ok(next) }))
                .chain(http_body_util::BodyStream::new(cut.guard(body)));
            http_body_util::StreamBody::new(read).boxed_unsync()
        }
    };
    Ok(Response::from_parts(parts, body))
}

/// An HTTP/1.1 server loop with graceful shutdown: `handler` answers every
/// request; after `shutdown`, connections get `grace` to finish.
pub(crate) async fn serve_http<H, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    use hyper_util::rt::TokioIo;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: keep serving the
                // connections we have, retry shortly.
                Err(e) => {
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request| {
            let answer = handler(request);
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {grace:?}; closing them");
    }
    Ok(())
}

/// An error reading the client's request body, as the guest will see it.
fn incoming_body_error(e: impl Into<tower::BoxError>) -> wasmtime_wasi_http::Error {
    match e.into().downcast::<hyper::Error>() {
        Ok(hyper) => wasmtime_wasi_http::Error::from(*hyper),
        Err(other) => wasmtime_wasi_http::Error::InternalError(Some(other.to_string())),
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

impl Stats {
    fn record_instantiation(&self, took: Duration) {
        self.instantiations.fetch_add(1, Ordering::Relaxed);
        self.instantiate_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Names the cause of a failed guest run. The memory flag goes first: a
/// refused `memory.grow` surfaces as whatever the guest's allocator does next.
fn classify(e: &wasmtime::Error, memory_denied: bool, limits: &Limits) -> Failure {
    if memory_denied {
        return Failure::MemoryLimit {
            bytes: limits.memory_bytes,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::FuelExhausted {
            fuel: limits.fuel.unwrap_or(u64::MAX),
        },
        Some(Trap::Interrupt) => Failure::Deadline {
            deadline: limits.deadline,
        },
        Some(trap) => Failure::Trap(trap.to_string()),
        None => Failure::Trap(format!("{e:#}")),
    }
}

/// Guest output becomes log events, one per line, never raw bytes on the
/// host's own stdout.
fn log_guest_output(stream: &'static str, pipe: &MemoryOutputPipe, trace_id: &str) {
    let contents = pipe.contents();
    if contents.is_empty() {
        return;
    }
    for line in String::from_utf8_lossy(&contents).lines() {
        tracing::info!(target: "fanout::guest", stream, %trace_id, "{line}");
    }
}

/// A wait shorter than this is not taken out of the guest's budget: it is
/// within the budget's own rounding (milliseconds).
const WAIT_WORTH_CHARGING: Duration = Duration::from_millis(1);

/// The server span of one request (OpenTelemetry HTTP server conventions).
/// The status is recorded when the answer is known.
fn server_span(method: &http::Method, route: &str, path: &str) -> tracing::Span {
    let span = tracing::info_span!(
        target: "fanout::otel",
        "request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = tracing::field::Empty,
        url.path = %path,
        url.scheme = "http",
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if !span.is_disabled() {
        // `other` is the metrics' catch-all label, not a route.
        if route == "other" {
            span.record("otel.name", method.as_str());
        } else {
            span.record("otel.name", format!("{method} {route}"));
            span.record("http.route", route);
        }
    }
    span
}

/// Makes sure the request carries a valid W3C `traceparent`, starting a new
/// trace when it has none, so that the guest, the upstreams and the host's
/// logs share one trace id. Returns that trace id.
fn with_trace_context<B>(mut request: Request<B>) -> (Request<B>, String) {
    use fanout_guest::trace::TraceContext;
    let incoming = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let trace = match incoming {
        Some(trace) => trace,
        None => {
            let root = TraceContext::new_root(|| fastrand::u64(..));
            // The host is the caller here: its span is the guest's parent.
            let header = root.child_header(fastrand::u64(1..));
            if let Ok(value) = http::HeaderValue::from_str(&header) {
                request.headers_mut().insert("traceparent", value);
            }
            root
        }
    };
    (request, trace.trace_id_hex())
}
