//! Errors: typed start-up errors, the request-level failures a client sees,
//! and the mapping of transport errors to the most specific `wasi:http`
//! error code.

use crate::ResponseBody;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use wasmtime_wasi_http::Error as TransportError;

/// An error building or starting a [`Fanout`](crate::Fanout). All of these
/// are raised before the server listens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The request ran past its deadline, either computing (epoch) or
    /// waiting (wall clock).
    Deadline { deadline: Duration },
    /// The guest trapped (a panic, an unreachable, a stack overflow...).
    Trap(String),
    /// The guest returned without answering, or answered with an error code.
    NoResponse(String),
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

    pub fn status(&self) -> StatusCode {
        match self {
            Failure::PoolFull { .. }
            | Failure::Overloaded { .. }
            | Failure::QueueFull { .. }
            | Failure::QueueTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
            Failure::FuelExhausted { .. }
            | Failure::MemoryLimit { .. }
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
            Failure::Deadline { .. } => "deadline_exceeded",
            Failure::Trap(_) => "guest_trap",
            Failure::NoResponse(_) => "guest_no_response",
            Failure::Internal(_) => "internal_error",
        }
    }

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
            Failure::Deadline { deadline } => format!(
                "the request did not finish within its {} ms deadline",
                deadline.as_millis()
            ),
            Failure::Trap(trap) => format!("the guest trapped: {trap}"),
            Failure::NoResponse(why) => format!("the guest gave no response: {why}"),
            Failure::Internal(why) => format!("internal error: {why}"),
        }
    }

    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut response = error_response(self.status(), self.code(), &self.message());
        if self.is_shed() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The one error shape: `{"error": {"code", "message"}}` with `status`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let body = Full::new(Bytes::from(body.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Maps a pooled-client error to the most specific `wasi:http` error code,
/// which is what the guest sees (and may retry on).
pub fn client_error(e: hyper_util::client::legacy::Error) -> TransportError {
    use std::error::Error as _;
    if e.is_connect() {
        let io = e.source().and_then(|s| find_io_error(s));
        return match io.map(|io| io.kind()) {
            Some(std::io::ErrorKind::ConnectionRefused) => TransportError::ConnectionRefused,
            Some(std::io::ErrorKind::TimedOut) => TransportError::ConnectionTimeout,
            // Not DestinationUnavailable: that code means "circuit open".
            Some(std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable) => {
                TransportError::DestinationIpUnroutable
            }
            _ if format!("{e:?}").contains("dns error") => TransportError::DnsError {
                rcode: Some("lookup failed".into()),
                info_code: None,
            },
            _ if format!("{e:?}").contains("timed out") => TransportError::ConnectionTimeout,
            _ => TransportError::ConnectionRefused,
        };
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(hyper) = s.downcast_ref::<hyper::Error>() {
            return hyper_error(hyper);
        }
        source = s.source();
    }
    TransportError::InternalError(Some(format!("{e:#}")))
}

fn hyper_error(e: &hyper::Error) -> TransportError {
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

fn find_io_error<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    loop {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        e = e.source()?;
    }
}
