//! The built-in upstream adapters: implementations of
//! [`Upstream`](crate::upstream::Upstream).
//!
//! | adapter | what it is for |
//! |---|---|
//! | [`HttpUpstream`] | real HTTP/1.1 or HTTP/2, plain or TLS, on a pooled keep-alive client |
//! | [`FixtureUpstream`] | JSON answers from files keyed by path: demos, contract tests |
//! | [`from_fn`] | an in-process async closure: no network hop for an embedding app |
//! | [`SimulatedUpstream`] | a latency distribution plus error and hang rates: demos, benchmarks, fault injection |
//!
//! Any of them may be wrapped in `WithHeaders` (credentials the host adds;
//! [`FanoutBuilder::upstream_header`](crate::FanoutBuilder::upstream_header)).

mod fixture;
mod func;
mod http;
mod simulated;
mod with_headers;

pub use fixture::FixtureUpstream;
pub use func::from_fn;
pub use http::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, Http2, HttpOptions, HttpUpstream,
    POOL_MAX_IDLE_PER_HOST, TlsOptions, TlsSettingError,
};
pub use simulated::{Latency, SimulatedUpstream};
pub(crate) use with_headers::{WithHeaders, resolve as resolve_header};

use crate::response::full_body;
use crate::upstream::{TransportError, UpstreamBody};
use ::http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;

/// A JSON answer, for in-process upstreams.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<UpstreamBody> {
    let mut response = Response::new(full_body(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Reads the whole request body before answering, as a server on the other
/// end of a socket would: the guest is still writing it, and dropping it
/// early would fail the guest's write. Up to
/// [`MAX_IN_PROCESS_BODY`](crate::limits::MAX_IN_PROCESS_BODY): it is held
/// in host memory, outside the guest's cap.
pub(crate) async fn read_body(
    request: Request<UpstreamBody>,
) -> Result<Request<UpstreamBody>, TransportError> {
    let (parts, body) = request.into_parts();
    let bytes = read_limited(body).await?;
    Ok(Request::from_parts(parts, full_body(bytes)))
}

/// `body` whole, or `HttpRequestBodySize` past
/// [`MAX_IN_PROCESS_BODY`](crate::limits::MAX_IN_PROCESS_BODY).
pub(crate) async fn read_limited(body: UpstreamBody) -> Result<bytes::Bytes, TransportError> {
    use crate::limits::MAX_IN_PROCESS_BODY;
    let limited = http_body_util::Limited::new(body, MAX_IN_PROCESS_BODY);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => match e.downcast::<TransportError>() {
            Ok(transport) => Err(*transport),
            // Only `LengthLimitError` is left.
            Err(_) => Err(TransportError::HttpRequestBodySize(Some(
                MAX_IN_PROCESS_BODY as u64 + 1,
            ))),
        },
    }
}
