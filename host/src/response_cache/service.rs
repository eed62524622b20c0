//! The layer and its service: the lookup of the module docs, in order.

use super::flight::{Flights, Leader, Outcome, Role};
use super::policy::{self, Decision};
use super::store::{Slot, Store, Stored};
use super::{CacheStatus, ResponseCacheConfig};
use crate::guard::GuardedService;
use crate::metrics::{CacheLabels, Metrics};
use crate::response::full_body;
use crate::upstream::{Call, TransportError, UpstreamBody};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};
use wasmtime_wasi_http::RequestOptions;

/// How long a key whose answers are never reusable skips coalescing (as
/// Varnish's hit-for-pass): long enough that its callers stop waiting on
/// one another, short enough that an upstream which changes its mind is
/// soon cached again.
const PASS_MEMORY: Duration = Duration::from_secs(10);

/// The largest answer shared with waiting requests when only coalescing
/// is on (with a cache, its `max_entry_kib`).
const MAX_SHARED_BYTES: usize = 1 << 20;

/// A background refresh (stale-while-revalidate) that takes longer is
/// given up; the stale answer is served until its window closes.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

/// Puts coalescing, and a cache when configured, in front of a service.
pub(crate) struct ResponseCacheLayer {
    shared: Arc<Shared>,
}

impl ResponseCacheLayer {
    /// For upstream `name`: coalescing, and storing if `config` is set.
    pub(crate) fn new(
        name: &str,
        config: Option<ResponseCacheConfig>,
        metrics: Arc<Metrics>,
    ) -> ResponseCacheLayer {
        let store = Store::new(config.as_ref(), &metrics, name);
        ResponseCacheLayer {
            shared: Arc::new(Shared {
                upstream: name.to_string(),
                config,
                store,
                flights: Arc::default(),
                metrics,
            }),
        }
    }

    /// The store's entries and counted bytes.
    #[cfg(test)]
    pub(crate) fn usage(&self) -> (usize, u64) {
        self.shared.store.usage()
    }
}

impl tower::Layer<GuardedService> for ResponseCacheLayer {
    type Service = ResponseCacheService;

    fn layer(&self, inner: GuardedService) -> ResponseCacheService {
        ResponseCacheService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub(crate) struct ResponseCacheService {
    inner: GuardedService,
    shared: Arc<Shared>,
}

/// The future of [`ResponseCacheService`].
pub(crate) type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send>>;

impl Service<Call> for ResponseCacheService {
    type Response = Response<UpstreamBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The inner service is driven with `oneshot`, and only on a miss.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> ResponseFuture {
        Box::pin(self.shared.clone().call(self.inner.clone(), call))
    }
}

struct Shared {
    upstream: String,
    config: Option<ResponseCacheConfig>,
    store: Store,
    flights: Arc<Flights>,
    metrics: Arc<Metrics>,
}

type Answer = Result<Response<UpstreamBody>, BoxError>;

impl Shared {
    async fn call(self: Arc<Self>, inner: GuardedService, call: Call) -> Answer {
        if !self.may_share(&call.request) {
            return self.pass(inner, call).await;
        }
        let url = call.request.uri().to_string();
        loop {
            let key = self.key(&url, call.request.headers());
            let now = Instant::now();
            match self.store.get(&key) {
                Some(Slot::Answer(stored)) if stored.matches(call.request.headers()) => {
                    if stored.is_fresh(now) {
                        return Ok(self.answer(&stored, CacheStatus::Hit, call));
                    }
                    if stored.may_serve_stale(now) {
                        self.refresh(&inner, &key, &call.request);
                        return Ok(self.answer(&stored, CacheStatus::Stale, call));
                    }
                    self.store.remove_answer(&key, &stored);
                }
                Some(Slot::Pass { until }) if now < until => return self.pass(inner, call).await,
                _ => {}
            }
            let waiter = match self.flights.join(&key) {
                Role::Lead(leader) => {
                    self.count(CacheStatus::Miss);
                    return self.lead(inner, call, &url, leader).await;
                }
                Role::Wait(waiter) => waiter,
            };
            let outcome = match call.options.first_byte_timeout {
                Some(limit) => tokio::time::timeout(limit, waiter.outcome())
                    .await
                    .map_err(|_| TransportError::ConnectionReadTimeout)?,
                None => waiter.outcome().await,
            };
            match outcome {
                Some(Outcome::Shared(stored)) if stored.matches(call.request.headers()) => {
                    return Ok(self.answer(&stored, CacheStatus::Coalesced, call));
                }
                Some(Outcome::NotShared) => return self.pass(inner, call).await,
                // Another variant (the URL's `Vary` names are known now), or
                // a leader that went away: look again.
                Some(Outcome::Shared(_)) | None => continue,
            }
        }
    }

    /// Whether this request's answer may be shared at all.
    fn may_share(&self, request: &Request<UpstreamBody>) -> bool {
        let shared = self.config.as_ref().is_some_and(|c| c.shared);
        request.method() == Method::GET
            && !policy::request_bypasses(request.headers())
            && (shared || !policy::carries_credentials(request.headers()))
            // A GET with content has no defined meaning: do not guess.
            && request.body().size_hint().upper().is_none_or(|n| n == 0)
    }

    /// The key of `url` for a request with `headers`: the URL and the
    /// values of the fields its answers vary on, as last seen.
    fn key(&self, url: &str, headers: &HeaderMap) -> String {
        match self.store.get(&vary_key(url)) {
            Some(Slot::VaryNames(names)) => key_of(url, &names, headers),
            _ => url.to_string(),
        }
    }

    async fn pass(&self, inner: GuardedService, call: Call) -> Answer {
        self.count(CacheStatus::Pass);
        let mut response = inner.oneshot(call).await?;
        response.extensions_mut().insert(CacheStatus::Pass);
        Ok(response)
    }

    /// Makes the call for everyone waiting on its key; stores and shares
    /// the answer as far as the policy lets.
    async fn lead(&self, inner: GuardedService, call: Call, url: &str, leader: Leader) -> Answer {
        let request_headers = call.request.headers().clone();
        // An error drops the leader: the waiters each come back for the lead.
        let response = inner.oneshot(call).await?;
        let received = Instant::now();
        let (mut parts, body) = response.into_parts();
        parts.extensions.insert(CacheStatus::Miss);
        let (fresh_for, stale_for) =
            match policy::decide(self.config.as_ref(), parts.status, &parts.headers) {
                Decision::Reuse {
                    fresh_for,
                    stale_for,
                } => (fresh_for, stale_for),
                Decision::NotThisTime => {
                    leader.finish(Outcome::NotShared);
                    return Ok(Response::from_parts(parts, body));
                }
                Decision::Never(why) => {
                    tracing::debug!(upstream = %self.upstream, %url, why, "answer never shared");
                    let key = self.key(url, &request_headers);
                    self.store.insert(
                        key,
                        Slot::Pass {
                            until: received + PASS_MEMORY,
                        },
                    );
                    leader.finish(Outcome::NotShared);
                    return Ok(Response::from_parts(parts, body));
                }
            };
        let limit = self
            .config
            .as_ref()
            .map_or(MAX_SHARED_BYTES, |c| c.max_entry_bytes);
        let body = match buffer(body, limit).await {
            Buffered::Whole(bytes) => bytes,
            Buffered::TooLarge(body) => {
                leader.finish(Outcome::NotShared);
                return Ok(Response::from_parts(parts, body));
            }
            Buffered::Failed(e) => return Err(e.into()),
        };
        // `decide` refused `Vary: *`, so there are names.
        let names = policy::vary_names(&parts.headers).unwrap_or_default();
        self.remember_vary_names(url, &names);
        let mut headers = parts.headers;
        for hop in HOP_BY_HOP {
            headers.remove(hop);
        }
        let stored = Stored {
            status: parts.status,
            age_then: policy::age(&headers),
            headers,
            body,
            received,
            fresh_for,
            stale_for,
            vary: names
                .iter()
                .map(|n| (n.clone(), request_headers.get(n).cloned()))
                .collect(),
            held: None,
        };
        let stored = if self.config.is_some() && !(fresh_for + stale_for).is_zero() {
            let key = key_of(url, &names, &request_headers);
            self.store.insert_answer(key, stored)
        } else {
            Arc::new(stored)
        };
        leader.finish(Outcome::Shared(stored.clone()));
        let mut response = stored_response(&stored, received);
        *response.extensions_mut() = parts.extensions;
        Ok(response)
    }

    /// Remembers the `Vary` names of `url`'s answers when they changed.
    fn remember_vary_names(&self, url: &str, names: &[HeaderName]) {
        let key = vary_key(url);
        let known = match self.store.get(&key) {
            Some(Slot::VaryNames(known)) => known,
            _ => Arc::from([]),
        };
        if *known != *names {
            self.store.insert(key, Slot::VaryNames(names.into()));
        }
    }

    /// Refreshes a stale answer in the background, unless a call for its
    /// key is already in flight.
    fn refresh(
        self: &Arc<Self>,
        inner: &GuardedService,
        key: &str,
        request: &Request<UpstreamBody>,
    ) {
        let Some(leader) = self.flights.lead_if_idle(key) else {
            return;
        };
        let mut fresh = Request::new(full_body(Bytes::new()));
        *fresh.uri_mut() = request.uri().clone();
        *fresh.headers_mut() = request.headers().clone();
        let call = Call {
            request: fresh,
            options: RequestOptions::default(),
            attempt: 1,
        };
        let (shared, inner, url) = (self.clone(), inner.clone(), request.uri().to_string());
        tokio::spawn(async move {
            let refreshed =
                tokio::time::timeout(REFRESH_TIMEOUT, shared.lead(inner, call, &url, leader)).await;
            if !matches!(refreshed, Ok(Ok(_))) {
                tracing::debug!(upstream = %shared.upstream, %url, "stale answer not refreshed");
            }
        });
    }

    /// The answer from `stored` for this `call`, whose request body (empty:
    /// a GET) is read to its end in the background as a server would.
    fn answer(&self, stored: &Stored, status: CacheStatus, call: Call) -> Response<UpstreamBody> {
        self.count(status);
        let body = call.request.into_body();
        // A body already at its end needs no task to read it.
        if !body.is_end_stream() {
            tokio::spawn(crate::adapters::read_limited(body));
        }
        let mut response = stored_response(stored, Instant::now());
        response.extensions_mut().insert(status);
        response
    }

    fn count(&self, status: CacheStatus) {
        self.metrics
            .response_cache_lookups
            .get_or_create(&CacheLabels {
                upstream: self.upstream.clone(),
                result: status.as_str(),
            })
            .inc();
    }
}

/// Fields that describe one connection, not the answer.
const HOP_BY_HOP: [HeaderName; 4] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
];

fn vary_key(url: &str) -> String {
    format!("vary\n{url}")
}

/// `url`, then each varied field's value on a line of its own. Values are
/// compared again, byte for byte, before an answer is used ([`Stored::matches`]).
fn key_of(url: &str, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = url.to_string();
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        key.push(':');
        if let Some(value) = headers.get(name) {
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}

/// A response with `stored`'s status, fields and body, and its `Age` at `now`.
fn stored_response(stored: &Stored, now: Instant) -> Response<UpstreamBody> {
    let mut response = Response::new(full_body(stored.body.clone()));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers.clone();
    let age = stored.age(now).as_secs();
    if age > 0 || stored.headers.contains_key(header::AGE) {
        response
            .headers_mut()
            .insert(header::AGE, HeaderValue::from(age));
    }
    response
}

enum Buffered {
    Whole(Bytes),
    /// Past the limit: what was read, then the rest, for the caller alone.
    TooLarge(UpstreamBody),
    Failed(TransportError),
}

/// Reads `body` whole if it fits in `limit` bytes.
async fn buffer(mut body: UpstreamBody, limit: usize) -> Buffered {
    if body.size_hint().lower() as usize > limit {
        return Buffered::TooLarge(body);
    }
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return Buffered::Failed(e),
        };
        // Trailers are not kept: a JSON API's answers have none.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        read.extend_from_slice(&data);
        if read.len() > limit {
            let head = futures_util::stream::once(async move {
                Ok::<_, TransportError>(http_body::Frame::data(read.freeze()))
            });
            let rest = http_body_util::BodyStream::new(body);
            return Buffered::TooLarge(
                http_body_util::StreamBody::new(head.chain(rest)).boxed_unsync(),
            );
        }
    }
    Buffered::Whole(read.freeze())
}
