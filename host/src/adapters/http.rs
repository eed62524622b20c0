//! Real HTTP/1.1 to upstreams on a pooled, keep-alive client.

use crate::error::{DnsFailure, client_error_code};
use crate::upstream::{TransportError, Upstream, UpstreamBody, UpstreamFuture};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiAddrs, GaiResolver, Name};
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime_wasi_http::RequestOptions;

/// How long a new TCP connection to an upstream may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled connection is kept for reuse, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream authority.
pub const POOL_MAX_IDLE_PER_HOST: usize = 512;

/// Settings of an [`HttpUpstream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    /// Longest time to open a TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for the response head; `None`: only the guest's own
    /// first-byte timeout applies.
    pub response_timeout: Option<Duration>,
    /// How long an idle pooled connection is kept.
    pub idle_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Real HTTP/1.1 on a pooled, keep-alive client (hyper-util's).
///
/// Cloning is cheap and clones share the connection pool, which is keyed by
/// authority: one client can serve every upstream.
#[derive(Clone)]
pub struct HttpUpstream {
    client: Client<HttpConnector<Resolver>, UpstreamBody>,
    response_timeout: Option<Duration>,
}

impl Default for HttpUpstream {
    fn default() -> Self {
        HttpUpstream::new(HttpOptions::default())
    }
}

impl HttpUpstream {
    /// A client with its own connection pool.
    pub fn new(options: HttpOptions) -> HttpUpstream {
        let mut connector = HttpConnector::new_with_resolver(Resolver(GaiResolver::new()));
        connector.set_connect_timeout(Some(options.connect_timeout));
        // Small JSON requests and answers: Nagle's delay would dominate.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(options.idle_timeout)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        HttpUpstream {
            client,
            response_timeout: options.response_timeout,
        }
    }
}

impl Upstream for HttpUpstream {
    fn call(&self, request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture {
        let response = self.client.request(request);
        // The pooled client has one connect timeout for all requests; the
        // response head waits for the tightest of the guest's options and
        // this upstream's own response timeout.
        let guest = match (options.connect_timeout, options.first_byte_timeout) {
            (Some(c), Some(f)) => Some(c + f),
            (c, f) => c.or(f),
        };
        let head_timeout = match (guest, self.response_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Box::pin(async move {
            let response = match head_timeout {
                Some(limit) => tokio::time::timeout(limit, response)
                    .await
                    .map_err(|_| TransportError::HttpResponseTimeout)?,
                None => response.await,
            };
            let response = response.map_err(|e| client_error_code(&e))?;
            Ok(response.map(|body| body.map_err(TransportError::from).boxed_unsync()))
        })
    }
}

/// The system resolver, its errors marked as [`DnsFailure`]s so that a
/// failed lookup maps to `DnsError` by type.
#[derive(Clone)]
struct Resolver(GaiResolver);

impl tower::Service<Name> for Resolver {
    type Response = GaiAddrs;
    type Error = DnsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<GaiAddrs, DnsFailure>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DnsFailure>> {
        self.0.poll_ready(cx).map_err(DnsFailure)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = self.0.call(name);
        Box::pin(async move { lookup.await.map_err(DnsFailure) })
    }
}
