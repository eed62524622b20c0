//! What an upstream is: one async call from request to answer.
//!
//! The guest calls `{base}/path`; the host routes the request
//! ([`outbound`](crate::outbound)), passes it through that upstream's
//! [guardrails](crate::guard), and hands it to the upstream's [`Upstream`]
//! implementation: one of the [`adapters`](crate::adapters) or your own.
//! This module is the vocabulary all of them share, and imports none of them.

use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use wasmtime_wasi_http::{RequestOptions, WasiBody};

/// The `wasi:http` error an upstream call fails with: what the guest sees
/// as its `error-code`, and may retry on.
pub use wasmtime_wasi_http::Error as TransportError;

/// Whether `error` says the call ran out of time (to connect, for the
/// answer's head, or between reads) rather than that it failed.
pub fn is_timeout(error: &TransportError) -> bool {
    matches!(
        error,
        TransportError::HttpResponseTimeout
            | TransportError::ConnectionTimeout
            | TransportError::ConnectionReadTimeout
    )
}

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
    /// Sends `request` and resolves to the upstream's answer.
    fn call(&self, request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture;
}

/// One outgoing request of the guest on its way to an upstream, as the
/// guardrails and the [`OutboundHooks`](crate::outbound::OutboundHooks) see it.
pub struct Call {
    /// The request, with the guest's hint headers already stripped.
    pub request: Request<UpstreamBody>,
    /// The guest's `wasi:http` request options (timeouts).
    pub options: RequestOptions,
    /// 1 for a first attempt, 2 and up for the guest's retries.
    pub attempt: u32,
}
