//! Distributed tracing: a server span per request and a client span per
//! upstream attempt, exported over OTLP.
//!
//! The host describes its work as `tracing` spans with the OpenTelemetry
//! HTTP semantic conventions as field names, under the target
//! [`SPAN_TARGET`]. [`Otlp`] turns them into OpenTelemetry spans (through
//! `tracing-opentelemetry`) and exports them over OTLP/HTTP with protobuf.
//! Without it the spans are disabled and cost next to nothing.
//!
//! The trace context follows W3C `traceparent`:
//! - the server span's parent is the caller's `traceparent`, if any;
//! - the guest is handed a `traceparent` naming the server span, so the
//!   guest's own propagation (which also works under `wasmtime serve`) stays
//!   in the same trace;
//! - every outgoing request leaves with a `traceparent` naming its client
//!   span, so an upstream's spans hang under the attempt that called it.
//!
//! ## Turning it on
//!
//! The `fanout` binary exports when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. An embedder adds the layer to
//! its own subscriber:
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! # fn main() -> anyhow::Result<()> {
//! // Some(..) when OTEL_EXPORTER_OTLP_ENDPOINT is set.
//! let otlp = fanout_host::telemetry::Otlp::from_env()?;
//! tracing_subscriber::registry()
//!     .with(otlp.as_ref().map(|otlp| otlp.layer()))
//!     .with(tracing_subscriber::fmt::layer().with_filter(
//!         // The spans are for the exporter, not for the log lines.
//!         tracing_subscriber::EnvFilter::new("info,fanout::otel=off"),
//!     ))
//!     .init();
//! // ... serve; dropping `otlp` flushes the spans still buffered.
//! # Ok(()) }
//! # use tracing_subscriber::Layer;
//! ```

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The `tracing` target of the host's request and upstream spans.
pub const SPAN_TARGET: &str = "fanout::otel";

/// The `tracing` target of the access log: one event per request, but
/// for sheds past [`SHED_LINES_PER_SECOND`].
pub const ACCESS_LOG_TARGET: &str = "fanout::access";

/// Access lines of sheds written a second at most, by default (see
/// `FanoutBuilder::shed_lines_per_second`); each written one carries
/// `sheds_not_logged`, the sheds left out since the one before.
/// `fanout_shed_total` counts them all.
pub const SHED_LINES_PER_SECOND: u32 = 10;

/// The `tracing` target of what a guest writes to stdout and stderr.
pub const GUEST_OUTPUT_TARGET: &str = "fanout::guest";

/// The instrumentation scope the spans are exported under.
const SCOPE: &str = "fanout-host";

/// How long a shutdown waits for the last spans to be exported.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the OTLP exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct OtlpError(String);

/// An OTLP span exporter and its tracer provider. Spans are batched and
/// exported from the SDK's own thread; dropping this flushes what is still
/// buffered (bounded by [`SHUTDOWN_TIMEOUT`]) and stops that thread.
pub struct Otlp {
    provider: SdkTracerProvider,
}

impl Otlp {
    /// An exporter configured by the standard environment variables, when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// is set; `None` otherwise. `OTEL_SERVICE_NAME` names the service
    /// (`fanout` by default), `OTEL_EXPORTER_OTLP_HEADERS` adds headers.
    pub fn from_env() -> Result<Option<Otlp>, OtlpError> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| OtlpError(e.to_string()))?;
        Ok(Some(Otlp::with_exporter(exporter)))
    }

    /// An exporter to the OTLP/HTTP collector at `endpoint` (its base URL,
    /// such as `http://127.0.0.1:4318`: spans go to `{endpoint}/v1/traces`).
    pub fn to_endpoint(endpoint: &str) -> Result<Otlp, OtlpError> {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .map_err(|e| OtlpError(e.to_string()))?;
        Ok(Otlp::with_exporter(exporter))
    }

    fn with_exporter(exporter: opentelemetry_otlp::SpanExporter) -> Otlp {
        // Resource::builder() reads OTEL_SERVICE_NAME and
        // OTEL_RESOURCE_ATTRIBUTES; the default name is ours, not the SDK's
        // `unknown_service`.
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("fanout");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Otlp { provider }
    }

    /// The `tracing` layer that exports the host's spans through this
    /// exporter. It sees only [`SPAN_TARGET`]: log events stay log lines.
    pub fn layer<S>(&self) -> Box<dyn Layer<S> + Send + Sync + 'static>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let tracer = self.provider.tracer(SCOPE);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(SPAN_TARGET, tracing::Level::INFO),
            )
            .boxed()
    }

    /// Exports every span that has ended so far, waiting for the collector.
    /// Blocks the calling thread: call it from a blocking context.
    pub fn force_flush(&self) -> Result<(), OtlpError> {
        self.provider
            .force_flush()
            .map_err(|e| OtlpError(e.to_string()))
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "OTLP exporter did not shut down cleanly");
        }
    }
}

/// Makes the caller's `traceparent` in `headers` the parent of `span`. A
/// disabled span (no exporter) is left alone.
pub(crate) fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // Fails only without the layer, when there is nothing to link.
    let _ = span.set_parent(parent);
}

/// The `traceparent` that names `span`, when an exporter records it.
pub(crate) fn traceparent_of(span: &tracing::Span) -> Option<http::HeaderValue> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let span_ref = cx.span();
    let sc = span_ref.span_context();
    if !sc.is_valid() {
        return None;
    }
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
    .parse()
    .ok()
}

/// The server span of one request (OpenTelemetry HTTP server conventions).
/// The status is recorded when the answer is known.
/// Longest client-chosen string (a path, a header) copied into a log line
/// or a span attribute; longer ones are cut there and marked with `…`.
pub const MAX_LOGGED_LEN: usize = 256;

/// `text` cut to [`MAX_LOGGED_LEN`] bytes on a character boundary.
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_LOGGED_LEN {
        return text.into();
    }
    let mut end = MAX_LOGGED_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

pub(crate) fn server_span(method: &http::Method, route: &str, path: &str) -> tracing::Span {
    let span = tracing::info_span!(
        target: SPAN_TARGET,
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
pub(crate) fn with_trace_context<B>(mut request: http::Request<B>) -> (http::Request<B>, String) {
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
