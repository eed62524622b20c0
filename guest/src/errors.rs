//! What goes wrong, as the client sees it: the one error shape
//! ([`ApiError`]), why one upstream call produced nothing usable
//! ([`UpstreamFailure`]) and how an upstream's answer is accepted.

use serde_json::{Map, Value, json};
use std::time::Duration;

/// A JSON error answer: `{"error": {"code", "message", "upstream"?}}`.
///
/// Clients and tests rely on `code` (stable, snake_case); `message` is for
/// people and may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The stable, snake_case code.
    pub code: &'static str,
    /// A sentence for people.
    pub message: String,
    /// The upstream at fault, if one is.
    pub upstream: Option<String>,
}

impl ApiError {
    /// An error with no upstream named.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            upstream: None,
        }
    }

    /// Names the upstream at fault.
    pub fn for_upstream(mut self, upstream: &str) -> ApiError {
        self.upstream = Some(upstream.to_string());
        self
    }

    /// The body: `{"error": {"code", "message", "upstream"?}}`.
    pub fn to_json(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        if let Some(upstream) = &self.upstream {
            error.insert("upstream".into(), json!(upstream));
        }
        json!({ "error": error })
    }
}

/// Why one upstream call produced no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The request's budget ran out before the upstream answered.
    Timeout,
    /// The upstream answered with a non-2xx status.
    Status(u16),
    /// The upstream answered 429 or 503 with a `Retry-After`: no retry
    /// sooner than `retry_after`, none at all if that does not fit in the
    /// budget.
    Throttled {
        /// 429 or 503.
        status: u16,
        /// What the upstream asked for.
        retry_after: Duration,
    },
    /// The call failed below HTTP (refused, reset, unreachable...).
    Transport(String),
    /// The TLS handshake failed: `why` says how. A refused certificate or
    /// an alert from the server is not retried: another attempt meets the
    /// same certificate.
    Tls {
        /// What went wrong, for the message.
        why: String,
        /// Whether another attempt may succeed (a protocol hiccup).
        retryable: bool,
    },
    /// The host refused the request: the upstream is not configured
    /// (`HttpRequestDenied`).
    Denied,
    /// The host shed the request without sending it: the upstream's
    /// concurrency limit or retry budget is used up, or its circuit is open
    /// (`ConnectionLimitReached`, `DestinationUnavailable`).
    Shed(String),
    /// The upstream answered 2xx with a body that is not a JSON object.
    InvalidBody(String),
    /// The call could not be made: a value its URL reads from another
    /// upstream's answer is missing or unusable, that upstream failed, or
    /// the request reached its limit of calls.
    NotCalled(String),
}

impl UpstreamFailure {
    /// The answer a client sees when a required upstream fails this way.
    pub fn to_api_error(&self, upstream: &str) -> ApiError {
        let error = match self {
            UpstreamFailure::Timeout => ApiError::new(
                504,
                "upstream_timeout",
                format!("{upstream} did not answer within the request's deadline"),
            ),
            UpstreamFailure::Status(404) => ApiError::new(
                404,
                "item_not_found",
                format!("{upstream} does not know this id"),
            ),
            UpstreamFailure::Status(status) | UpstreamFailure::Throttled { status, .. } => {
                ApiError::new(
                    502,
                    "upstream_error",
                    format!("{upstream} answered HTTP {status}"),
                )
            }
            UpstreamFailure::Transport(why) => ApiError::new(
                502,
                "upstream_unavailable",
                format!("{upstream} could not be reached: {why}"),
            ),
            UpstreamFailure::Tls { why, .. } => ApiError::new(
                502,
                "upstream_unavailable",
                format!("{upstream} could not be reached: TLS: {why}"),
            ),
            UpstreamFailure::InvalidBody(why) => ApiError::new(
                502,
                "upstream_invalid_response",
                format!("{upstream} answered with an unusable body: {why}"),
            ),
            UpstreamFailure::Denied => ApiError::new(
                502,
                "upstream_denied",
                format!("the host does not allow calls to {upstream}'s address"),
            ),
            UpstreamFailure::Shed(why) => ApiError::new(
                503,
                "upstream_shed",
                format!("the host shed the call to {upstream}: {why}"),
            ),
            UpstreamFailure::NotCalled(why) => ApiError::new(
                502,
                "upstream_not_called",
                format!("{upstream} was not called: {why}"),
            ),
        };
        error.for_upstream(upstream)
    }

    /// Whether another attempt may succeed: connection-level failures,
    /// 502/503/504, a 429 that says when (`Retry-After`) and attempt
    /// timeouts. Never a 4xx (the request itself is
    /// wrong), a 500, an unusable body, or a request the host denied or shed
    /// (retrying into a guardrail only adds load where there is too much).
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamFailure::Timeout
            | UpstreamFailure::Transport(_)
            | UpstreamFailure::Throttled { .. } => true,
            UpstreamFailure::Status(status) => matches!(status, 502..=504),
            UpstreamFailure::Tls { retryable, .. } => *retryable,
            UpstreamFailure::InvalidBody(_)
            | UpstreamFailure::Denied
            | UpstreamFailure::Shed(_)
            | UpstreamFailure::NotCalled(_) => false,
        }
    }
}

/// A `Retry-After` in delta-seconds; `None` for anything else, the
/// HTTP-date form included (a caller treats that as "not within this
/// request": a date is seconds away at least, past any budget here).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .map(|s| Duration::from_secs(s.into()))
}

/// The largest upstream answer the guest reads. An upstream's answer is one
/// JSON object merged into one field; a bigger one is refused as invalid (that
/// upstream fails, and the answer degrades if it is optional) rather than left
/// to exhaust the instance's fuel (the whole request fails). Reading, parsing
/// and writing an answer back out costs about 27 fuel a byte: the host's
/// default 10M fuel holds one answer this size with room to spare, and a
/// request whose answers add up to much more needs more fuel.
pub const MAX_UPSTREAM_BODY: usize = 256 << 10;

/// Parses an upstream's 2xx body: a JSON object, or a list (which only a
/// batch-capable upstream may answer: the fan-out checks).
pub fn parse_upstream_body(body: &[u8]) -> Result<Value, UpstreamFailure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ (Value::Object(_) | Value::Array(_))) => Ok(value),
        Ok(_) => Err(UpstreamFailure::InvalidBody("not a JSON object".into())),
        Err(e) => Err(UpstreamFailure::InvalidBody(format!("invalid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape_is_stable() {
        let err = UpstreamFailure::Timeout.to_api_error("pricing");
        let body = err.to_json();
        assert_eq!(body["error"]["code"], "upstream_timeout");
        assert_eq!(body["error"]["upstream"], "pricing");
        assert!(body["error"]["message"].is_string());
        let plain = ApiError::new(404, "not_found", "x").to_json();
        assert!(plain["error"].get("upstream").is_none());
    }

    #[test]
    fn upstream_bodies_must_be_objects_or_lists() {
        assert!(parse_upstream_body(br#"{"a":1}"#).is_ok());
        assert!(parse_upstream_body(br#"[{"id":1}]"#).is_ok());
        for bad in [&b"42"[..], b"\"text\"", b"null", b"not json", b""] {
            assert!(matches!(
                parse_upstream_body(bad),
                Err(UpstreamFailure::InvalidBody(_))
            ));
        }
    }

    #[test]
    fn what_is_retried() {
        assert!(UpstreamFailure::Timeout.is_retryable());
        for status in [502, 503, 504] {
            assert!(UpstreamFailure::Status(status).is_retryable(), "{status}");
        }
        for status in [400, 401, 403, 404, 409, 429, 500, 501] {
            assert!(!UpstreamFailure::Status(status).is_retryable(), "{status}");
        }
        assert!(UpstreamFailure::Transport("ErrorCode::ConnectionRefused".into()).is_retryable());
        let certificate = UpstreamFailure::Tls {
            why: "the server's certificate was refused".into(),
            retryable: false,
        };
        assert!(!certificate.is_retryable());
        let error = certificate.to_api_error("pricing");
        assert_eq!((error.status, error.code), (502, "upstream_unavailable"));
        assert!(error.message.contains("TLS"), "{}", error.message);
        let throttled = UpstreamFailure::Throttled {
            status: 429,
            retry_after: Duration::from_millis(20),
        };
        assert!(throttled.is_retryable());
        assert_eq!(
            parse_retry_after("2"),
            Some(Duration::from_secs(2)),
            "delta-seconds"
        );
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        // An HTTP date, or garbage: not understood, so not honoured.
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert!(!UpstreamFailure::Denied.is_retryable());
        assert!(!UpstreamFailure::Shed("circuit open".into()).is_retryable());
        assert!(!UpstreamFailure::InvalidBody("x".into()).is_retryable());
    }
}
