//! Errors, each mapped in one place:
//!
//! - [`Error`]: what stops a `Fanout` from being built,
//!   before anything listens;
//! - [`Failure`]: why a request did not get the guest's own answer, and the
//!   client answer for each ([`Failure::to_response`]);
//! - the `wasi:http` error code the guest sees for an upstream call that
//!   failed below HTTP: from the pooled client's errors
//!   ([`client_error_code`]) and from the guardrails' refusals
//!   ([`guarded_error_code`]), by the errors' types, never their text.

use crate::admission::RETRY_AFTER;
use crate::guard::Blocked;
use crate::response::{ResponseBody, error_response};
use crate::upstream::TransportError;
use http::{HeaderValue, Response, StatusCode, header};
use std::error::Error as StdError;
use std::time::Duration;

/// An error building or starting a `Fanout`. All of these
/// are raised before the server listens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[allow(
    missing_docs,
    reason = "each variant's #[error] message says what it is"
)]
pub enum Error {
    #[error("invalid limit `{key}`: {reason}")]
    InvalidLimit { key: &'static str, reason: String },
    #[error("invalid configuration `{key}`: {reason}")]
    Config { key: String, reason: String },
    #[error("invalid guest configuration `{key}`: {reason}")]
    GuestConfig { key: String, reason: String },
    #[error("invalid upstream `{name}`: {reason}")]
    InvalidUpstream { name: String, reason: String },
    #[error("fixture {path}: {reason}")]
    Fixture {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot read component {path}: {source}")]
    ReadComponent {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the component is not usable: {0}")]
    Component(String),
    #[error("wasmtime: {0}")]
    Wasmtime(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn wasmtime(e: wasmtime::Error) -> Error {
        Error::Wasmtime(format!("{e:#}"))
    }
}

/// Why a request did not get the guest's own answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    missing_docs,
    reason = "the fields are the limits or waits the message names"
)]
pub enum Failure {
    /// Every instance of the pool is busy.
    PoolFull { max_instances: u32 },
    /// The adaptive admission limit is reached: more requests now would
    /// only queue for CPU past their deadline.
    Overloaded { limit: usize },
    /// Every instance is busy and the wait for one would be longer than the
    /// queue allows.
    QueueFull {
        expected_wait: Duration,
        max_wait: Duration,
    },
    /// The request waited in line for an instance as long as allowed.
    QueueTimeout { waited: Duration },
    /// The guest used all the fuel of one request.
    FuelExhausted { fuel: u64 },
    /// The guest tried to grow its memory past the limit.
    MemoryLimit { bytes: usize },
    /// The guest held more host resources at once than allowed.
    ResourceLimit { max: usize },
    /// The request ran past its deadline, either computing (epoch) or
    /// waiting (wall clock).
    Deadline { deadline: Duration },
    /// The guest trapped (a panic, an unreachable, a stack overflow...).
    Trap(String),
    /// The guest returned without answering, or answered with an error code.
    NoResponse(String),
    /// The request cannot be given to the guest as it is (a `Host` that
    /// is not a valid authority, say).
    BadRequest(String),
    /// The host could not set the request up.
    Internal(String),
}

impl Failure {
    /// Turned away by admission (a 503 with `Retry-After`) rather than
    /// failed while running.
    pub fn is_shed(&self) -> bool {
        matches!(
            self,
            Failure::PoolFull { .. }
                | Failure::Overloaded { .. }
                | Failure::QueueFull { .. }
                | Failure::QueueTimeout { .. }
        )
    }

    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::PoolFull { .. }
            | Failure::Overloaded { .. }
            | Failure::QueueFull { .. }
            | Failure::QueueTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
            Failure::BadRequest(_) => StatusCode::BAD_REQUEST,
            Failure::FuelExhausted { .. }
            | Failure::MemoryLimit { .. }
            | Failure::ResourceLimit { .. }
            | Failure::Trap(_)
            | Failure::NoResponse(_)
            | Failure::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `code` of the JSON error body (and the `cause` of logs).
    pub fn code(&self) -> &'static str {
        match self {
            Failure::PoolFull { .. } => "pool_full",
            Failure::Overloaded { .. } => "overloaded",
            Failure::QueueFull { .. } => "queue_full",
            Failure::QueueTimeout { .. } => "queue_timeout",
            Failure::FuelExhausted { .. } => "guest_fuel_exhausted",
            Failure::MemoryLimit { .. } => "guest_memory_limit",
            Failure::ResourceLimit { .. } => "guest_resource_limit",
            Failure::Deadline { .. } => "deadline_exceeded",
            Failure::Trap(_) => "guest_trap",
            Failure::NoResponse(_) => "guest_no_response",
            Failure::BadRequest(_) => "bad_request",
            Failure::Internal(_) => "internal_error",
        }
    }

    /// A sentence for people, in the body and the log.
    pub fn message(&self) -> String {
        match self {
            Failure::PoolFull { max_instances } => {
                format!("all {max_instances} instances are busy; retry shortly")
            }
            Failure::Overloaded { limit } => format!(
                "the host is at its admission limit ({limit} requests in flight); retry shortly"
            ),
            Failure::QueueFull {
                expected_wait,
                max_wait,
            } => format!(
                "every instance is busy and the wait would be about {} ms (at most {} ms allowed); retry shortly",
                expected_wait.as_millis(),
                max_wait.as_millis()
            ),
            Failure::QueueTimeout { waited } => format!(
                "every instance stayed busy for the {} ms this request may wait; retry shortly",
                waited.as_millis()
            ),
            Failure::FuelExhausted { fuel } => {
                format!("the guest used all of its {fuel} units of fuel")
            }
            Failure::MemoryLimit { bytes } => format!(
                "the guest tried to grow its memory past the {} MiB limit",
                bytes >> 20
            ),
            Failure::ResourceLimit { max } => format!(
                "the guest held more than {max} host resources (headers, requests, bodies) at once"
            ),
            Failure::Deadline { deadline } => format!(
                "the request did not finish within its {} ms deadline",
                deadline.as_millis()
            ),
            Failure::Trap(trap) => format!("the guest trapped: {trap}"),
            Failure::NoResponse(why) => format!("the guest gave no response: {why}"),
            Failure::BadRequest(why) => format!("bad request: {why}"),
            Failure::Internal(why) => format!("internal error: {why}"),
        }
    }

    /// What the client is told. A trap's text, a missing answer's reason
    /// and an internal error's detail describe the host and the guest, not
    /// the request: the client gets the cause and the trace id to quote,
    /// and the log line with that trace id has the details.
    pub fn public_message(&self, trace_id: &str) -> String {
        match self {
            Failure::Trap(_) | Failure::NoResponse(_) | Failure::Internal(_) => format!(
                "the request failed inside the host ({}); quote trace id {trace_id}",
                self.code()
            ),
            _ => self.message(),
        }
    }

    /// The JSON error answer, with `Retry-After` on a shed.
    pub fn to_response(&self, trace_id: &str) -> Response<ResponseBody> {
        let mut response =
            error_response(self.status(), self.code(), &self.public_message(trace_id));
        if self.is_shed() {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(RETRY_AFTER.as_secs()),
            );
            response.extensions_mut().insert(Shed);
        }
        response
    }
}

/// Marks an answer the host shed (on the response's extensions), for the
/// server's pacing of clients that retry at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shed;

/// A name the HTTP adapter could not resolve. Its resolver wraps lookup
/// errors in this type so that [`client_error_code`] can tell a DNS failure
/// from a refused connection without reading error text.
#[derive(Debug, thiserror::Error)]
#[error("dns lookup failed: {0}")]
pub struct DnsFailure(#[source] pub std::io::Error);

/// The most specific `wasi:http` error code for a pooled-client error:
/// what the guest sees, and may retry on.
pub fn client_error_code(e: &hyper_util::client::legacy::Error) -> TransportError {
    if e.is_connect() {
        if find::<DnsFailure>(e).is_some() {
            return TransportError::DnsError {
                rcode: Some("lookup failed".into()),
                info_code: None,
            };
        }
        if let Some(tls) = find::<rustls::Error>(e) {
            return tls_error_code(tls);
        }
        return match find::<std::io::Error>(e).map(std::io::Error::kind) {
            Some(std::io::ErrorKind::TimedOut) => TransportError::ConnectionTimeout,
            // Not DestinationUnavailable: that code means "circuit open".
            Some(std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable) => {
                TransportError::DestinationIpUnroutable
            }
            _ => TransportError::ConnectionRefused,
        };
    }
    // With TLS 1.3 the server judges a client certificate after the
    // client's handshake is done: its refusal arrives on the first read.
    if let Some(tls) = find::<rustls::Error>(e) {
        return tls_error_code(tls);
    }
    match find::<hyper::Error>(e) {
        Some(hyper) => hyper_error_code(hyper),
        None => TransportError::InternalError(Some(e.to_string())),
    }
}

/// The `wasi:http` code of a failed handshake: the certificate (the
/// guest does not retry), an alert from the server, or the protocol.
pub fn tls_error_code(e: &rustls::Error) -> TransportError {
    match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            TransportError::TlsCertificateError
        }
        rustls::Error::AlertReceived(alert) => TransportError::TlsAlertReceived {
            alert_id: Some(u8::from(*alert)),
            alert_message: Some(format!("{alert:?}")),
        },
        _ => TransportError::TlsProtocolError,
    }
}

fn hyper_error_code(e: &hyper::Error) -> TransportError {
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        TransportError::ConnectionTerminated
    } else if e.is_timeout() {
        TransportError::HttpResponseTimeout
    } else if e.is_parse_too_large() {
        TransportError::HttpResponseHeaderSectionSize(None)
    } else if e.is_parse() || e.is_parse_status() {
        TransportError::HttpProtocolError
    } else {
        TransportError::InternalError(Some(e.to_string()))
    }
}

/// The `wasi:http` error code for whatever an upstream's guarded stack
/// failed with: the adapter's own error, a shed (`ConnectionLimitReached`),
/// an exhausted retry budget (likewise) or an open circuit
/// (`DestinationUnavailable`), codes the guest can tell apart.
pub fn guarded_error_code(error: tower::BoxError) -> TransportError {
    let error = match error.downcast::<TransportError>() {
        Ok(transport) => return *transport,
        Err(other) => other,
    };
    if error.is::<tower::load_shed::error::Overloaded>() {
        return TransportError::ConnectionLimitReached;
    }
    match error.downcast_ref::<Blocked>() {
        Some(Blocked::CircuitOpen) => TransportError::DestinationUnavailable,
        Some(Blocked::RetryBudget) => TransportError::ConnectionLimitReached,
        None => TransportError::InternalError(Some(error.to_string())),
    }
}

/// The name of an error code, for a span's `error.type`: the `wasi:http`
/// variant's name, low in cardinality as the semantic conventions ask.
pub fn error_code_name(e: &TransportError) -> &'static str {
    use TransportError as E;
    match e {
        E::Hyper(_) => "Hyper",
        E::Connect(_) => "Connect",
        E::Tls(_) => "Tls",
        E::HttpRequestBodySize(_) => "HttpRequestBodySize",
        E::DnsTimeout => "DnsTimeout",
        E::DnsError { .. } => "DnsError",
        E::DestinationNotFound => "DestinationNotFound",
        E::DestinationUnavailable => "DestinationUnavailable",
        E::DestinationIpProhibited => "DestinationIpProhibited",
        E::DestinationIpUnroutable => "DestinationIpUnroutable",
        E::ConnectionRefused => "ConnectionRefused",
        E::ConnectionTerminated => "ConnectionTerminated",
        E::ConnectionTimeout => "ConnectionTimeout",
        E::ConnectionReadTimeout => "ConnectionReadTimeout",
        E::ConnectionWriteTimeout => "ConnectionWriteTimeout",
        E::ConnectionLimitReached => "ConnectionLimitReached",
        E::TlsProtocolError => "TlsProtocolError",
        E::TlsCertificateError => "TlsCertificateError",
        E::TlsAlertReceived { .. } => "TlsAlertReceived",
        E::HttpRequestDenied => "HttpRequestDenied",
        E::HttpRequestLengthRequired => "HttpRequestLengthRequired",
        E::HttpRequestMethodInvalid => "HttpRequestMethodInvalid",
        E::HttpRequestUriInvalid => "HttpRequestUriInvalid",
        E::HttpRequestUriTooLong => "HttpRequestUriTooLong",
        E::HttpRequestHeaderSectionSize(_) => "HttpRequestHeaderSectionSize",
        E::HttpRequestHeaderSize { .. } => "HttpRequestHeaderSize",
        E::HttpRequestTrailerSectionSize(_) => "HttpRequestTrailerSectionSize",
        E::HttpRequestTrailerSize { .. } => "HttpRequestTrailerSize",
        E::HttpResponseIncomplete => "HttpResponseIncomplete",
        E::HttpResponseHeaderSectionSize(_) => "HttpResponseHeaderSectionSize",
        E::HttpResponseHeaderSize { .. } => "HttpResponseHeaderSize",
        E::HttpResponseBodySize(_) => "HttpResponseBodySize",
        E::HttpResponseTrailerSectionSize(_) => "HttpResponseTrailerSectionSize",
        E::HttpResponseTrailerSize { .. } => "HttpResponseTrailerSize",
        E::HttpResponseTransferCoding(_) => "HttpResponseTransferCoding",
        E::HttpResponseContentCoding(_) => "HttpResponseContentCoding",
        E::HttpResponseTimeout => "HttpResponseTimeout",
        E::HttpUpgradeFailed => "HttpUpgradeFailed",
        E::HttpProtocolError => "HttpProtocolError",
        E::LoopDetected => "LoopDetected",
        E::ConfigurationError => "ConfigurationError",
        E::InternalError(_) => "InternalError",
        _ => "Other",
    }
}

/// The first error of type `T` in `e`'s chain of sources, `e` included.
pub(crate) fn find<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        // An `io::Error`'s `source` skips the error it wraps (tokio-rustls
        // wraps its rustls error so, and hyper-rustls that in another):
        // open it instead.
        current = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guardrail_refusals_get_codes_the_guest_can_tell_apart() {
        let code = |e: tower::BoxError| error_code_name(&guarded_error_code(e));
        assert_eq!(code(Blocked::CircuitOpen.into()), "DestinationUnavailable");
        assert_eq!(code(Blocked::RetryBudget.into()), "ConnectionLimitReached");
        assert_eq!(
            code(tower::load_shed::error::Overloaded::new().into()),
            "ConnectionLimitReached"
        );
        assert_eq!(
            code(TransportError::ConnectionRefused.into()),
            "ConnectionRefused"
        );
        assert_eq!(code("something else".into()), "InternalError");
    }

    #[test]
    fn causes_are_found_by_type_through_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("connecting")]
        struct Outer(#[source] DnsFailure);
        let outer = Outer(DnsFailure(std::io::Error::other("no such host")));
        assert!(find::<DnsFailure>(&outer).is_some());
        assert_eq!(
            find::<std::io::Error>(&outer).map(|io| io.to_string()),
            Some("no such host".into())
        );
        assert!(find::<hyper::Error>(&outer).is_none());
    }
}
