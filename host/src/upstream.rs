//! Upstreams: where the guest's outgoing requests go.
//!
//! The guest calls `{base}/path`; the host routes each outgoing request by
//! the authority of its URI to the [`Upstream`] registered for it. An
//! authority that nobody registered is refused with `HttpRequestDenied`, so
//! a guest reaches only what the operator configured.
//!
//! Two upstreams are built in: [`HttpUpstream`], real HTTP on one pooled
//! keep-alive client shared by all upstreams, and any async closure (see
//! [`from_fn`]), which serves an upstream in-process with no network hop.

use crate::error::client_error;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

pub use wasmtime_wasi_http::Error as TransportError;

/// Body of the requests the guest sends and of the answers it reads.
pub type UpstreamBody = WasiBody;

/// What an upstream call resolves to.
pub type UpstreamResult = Result<Response<UpstreamBody>, TransportError>;

/// A boxed, sendable upstream future.
pub type UpstreamFuture = Pin<Box<dyn Future<Output = UpstreamResult> + Send>>;

/// How long a new TCP connection to an upstream may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled connection is kept for reuse.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream authority.
pub const POOL_MAX_IDLE_PER_HOST: usize = 512;

/// One upstream service: an async function from request to response.
///
/// `options` carries the guest's `wasi:http` request options (connect and
/// first-byte timeouts); an implementation should honour them where they
/// make sense.
pub trait Upstream: Send + Sync + 'static {
    fn call(&self, request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture;
}

/// Real HTTP/1.1 on a pooled, keep-alive client.
///
/// Cloning is cheap and clones share the connection pool: one client serves
/// every upstream, keyed by authority.
#[derive(Clone)]
pub struct HttpUpstream {
    client: Client<HttpConnector, UpstreamBody>,
}

impl Default for HttpUpstream {
    fn default() -> Self {
        HttpUpstream::new()
    }
}

impl HttpUpstream {
    pub fn new() -> HttpUpstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(DEFAULT_CONNECT_TIMEOUT));
        // Small JSON requests and answers: Nagle's delay would dominate.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        HttpUpstream { client }
    }
}

impl Upstream for HttpUpstream {
    fn call(&self, request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture {
        let response = self.client.request(request);
        // The pooled client has one connect timeout for all requests; the
        // guest's own options bound the wait for the response head.
        let head_timeout = match (options.connect_timeout, options.first_byte_timeout) {
            (Some(c), Some(f)) => Some(c + f),
            (c, f) => c.or(f),
        };
        Box::pin(async move {
            let response = match head_timeout {
                Some(limit) => tokio::time::timeout(limit, response)
                    .await
                    .map_err(|_| TransportError::HttpResponseTimeout)?,
                None => response.await,
            };
            let response = response.map_err(client_error)?;
            Ok(response.map(|body| body.map_err(TransportError::from).boxed_unsync()))
        })
    }
}

struct FnUpstream<F>(Arc<F>);

impl<F, Fut> Upstream for FnUpstream<F>
where
    F: Fn(Request<UpstreamBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = UpstreamResult> + Send + 'static,
{
    fn call(&self, request: Request<UpstreamBody>, _options: RequestOptions) -> UpstreamFuture {
        let f = self.0.clone();
        Box::pin(async move {
            // Read the whole request body before answering, as a server on
            // the other end of a socket would: the guest is still writing it,
            // and dropping it early would fail the guest's write.
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let body = Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync();
            f(Request::from_parts(parts, body)).await
        })
    }
}

/// An in-process upstream from an async closure: no socket, no serialisation
/// beyond the body bytes.
pub fn from_fn<F, Fut>(f: F) -> Arc<dyn Upstream>
where
    F: Fn(Request<UpstreamBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = UpstreamResult> + Send + 'static,
{
    Arc::new(FnUpstream(Arc::new(f)))
}

/// A JSON answer for in-process upstreams.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<UpstreamBody> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A registered upstream: its logical name, the base URL the guest is told,
/// and who serves it.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) name: String,
    pub(crate) base_url: String,
    pub(crate) upstream: Arc<dyn Upstream>,
    /// Served by the shared HTTP client: several such upstreams may share an
    /// authority (one gateway in front of several services).
    pub(crate) is_http: bool,
}

/// The routing table from authority to upstream.
#[derive(Clone, Default)]
pub(crate) struct Upstreams {
    by_authority: HashMap<String, Route>,
    all: Vec<Route>,
}

impl Upstreams {
    /// Registers `route`, keyed by the authority of its base URL.
    pub(crate) fn insert(&mut self, route: Route) -> Result<(), crate::Error> {
        let invalid = |reason: String| crate::Error::InvalidUpstream {
            name: route.name.clone(),
            reason,
        };
        let uri: http::Uri = route
            .base_url
            .parse()
            .map_err(|e| invalid(format!("base URL `{}`: {e}", route.base_url)))?;
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
                    route.base_url
                )));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| invalid(format!("base URL `{}` has no host", route.base_url)))?
            .as_str()
            .to_ascii_lowercase();
        if let Some(other) = self.by_authority.get(&authority) {
            if !(other.is_http && route.is_http) {
                return Err(invalid(format!(
                    "authority `{authority}` is already used by upstream `{}`; \
                     requests are routed by authority, so in-process upstreams need their own",
                    other.name
                )));
            }
        } else {
            self.by_authority.insert(authority, route.clone());
        }
        self.all.push(route);
        Ok(())
    }

    pub(crate) fn routes(&self) -> impl Iterator<Item = &Route> {
        self.all.iter()
    }

    fn get(&self, authority: &str) -> Option<&Route> {
        self.by_authority.get(&authority.to_ascii_lowercase())
    }
}

/// The `wasi:http` hooks of one request: outgoing requests go to the
/// registered upstreams and nowhere else.
pub(crate) struct Hooks {
    pub(crate) upstreams: Arc<Upstreams>,
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
        let Some(route) = self.upstreams.get(&authority) else {
            tracing::warn!(%authority, uri = %request.uri(), "outgoing request denied: no upstream has this authority");
            // Let the guest finish writing the body first: dropping it now
            // would surface as a write error, hiding the denial.
            let body = request.into_body();
            return Box::new(async move {
                let _ = body.collect().await;
                Err(TransportError::HttpRequestDenied)
            });
        };
        let hints = take_hints(request.headers_mut());
        tracing::debug!(
            upstream = %route.name,
            attempt = hints.attempt,
            uri = %request.uri(),
            "outgoing request"
        );
        let call = route.upstream.call(request, options.unwrap_or_default());
        Box::new(async move {
            let response = call.await?;
            // The pooled client drives its connections itself: there is no
            // per-request I/O future to hand back.
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}

/// Prefix of the headers in which the guest leaves hints for the host (the
/// attempt number, the upstream's logical name). They never leave the host.
pub const HINT_PREFIX: &str = "x-fanout-hint-";

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
        if name.as_str() == "x-fanout-hint-attempt"
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
