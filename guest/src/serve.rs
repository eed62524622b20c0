//! What the handler does with a request, whichever `wasi:http` carries it:
//! the `wasi:http@0.2` export (`component`, in this crate) and the
//! `wasi:http@0.3` one (`guest-p3/`) differ only in how they read a request,
//! make a call and write an answer. Both hand this module a request's
//! method, path and header fields, and get back the answer, its header
//! fields and, for each upstream call, the fields to send: so the two
//! builds answer byte for byte alike.

use crate::api::{self, Target};
use crate::config::{Config, ConfigError};
use crate::errors::{ApiError, MAX_UPSTREAM_BODY, UpstreamFailure, parse_retry_after};
use crate::fanout::{self, Attempt, Budget, Env};
use crate::merge::Answer;
use crate::protocol::{DEGRADED_HEADER, HINT_ATTEMPT, HINT_UPSTREAM, TIMEOUT_HEADER};
use crate::trace::TraceContext;
pub use http::Uri;
use std::sync::OnceLock;
use std::time::Duration;

/// A header value that is not visible ASCII, as the timeout header's error
/// message shows it.
const NOT_ASCII: &str = "not ascii";

/// What the handler needs of a request.
#[derive(Debug, Clone)]
pub struct Incoming {
    method: String,
    path_with_query: String,
    traceparent: Option<String>,
    tracestate: Option<String>,
    timeout: Option<String>,
    /// Every header, for `forward_headers`: visible-ASCII values only.
    headers: Vec<(String, String)>,
}

impl Incoming {
    /// A request with `method`, `path_with_query` (`/` when absent) and
    /// header `fields` in the order the client sent them.
    pub fn new(
        method: String,
        path_with_query: Option<String>,
        fields: Vec<(String, Vec<u8>)>,
    ) -> Incoming {
        // Only text `http`'s `HeaderValue::to_str` accepts (visible ASCII):
        // anything else is not a trace context, and would be refused when
        // forwarded (tracestate).
        let text = |value: &[u8]| {
            let visible = value
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
            visible
                .then(|| String::from_utf8(value.to_vec()).ok())
                .flatten()
        };
        // The first of a repeated header counts, as `http`'s `HeaderMap::get`
        // has it.
        let first = |name: &str| {
            fields
                .iter()
                .find(|(field, _)| field.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_slice())
        };
        Incoming {
            method,
            path_with_query: path_with_query.unwrap_or_else(|| "/".into()),
            traceparent: first("traceparent").and_then(text),
            tracestate: first("tracestate")
                .and_then(text)
                .and_then(crate::trace::bounded_tracestate),
            // Present but not text is still an error the client should see.
            timeout: first(TIMEOUT_HEADER).map(|v| text(v).unwrap_or(NOT_ASCII.into())),
            headers: fields
                .iter()
                .filter_map(|(name, value)| Some((name.clone(), text(value)?)))
                .collect(),
        }
    }

    fn path_and_query(&self) -> (&str, Option<&str>) {
        match self.path_with_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (&self.path_with_query, None),
        }
    }

    /// The header fields of one attempt: the trace context, the hints the
    /// host reads, the attempt's budget when the upstream takes one, and the
    /// client's headers its configuration forwards.
    pub fn attempt_fields(&self, attempt: &Attempt<'_>) -> Vec<(String, Vec<u8>)> {
        let field = |name: &str, value: &str| (name.to_string(), value.as_bytes().to_vec());
        let mut fields = vec![
            field("accept", "application/json"),
            field("traceparent", &attempt.traceparent),
            field(HINT_UPSTREAM, attempt.upstream),
            field(HINT_ATTEMPT, &attempt.number.to_string()),
        ];
        if let Some(state) = self.tracestate.as_deref() {
            fields.push(field("tracestate", state));
        }
        // What this attempt has left, so that an upstream that is itself an
        // aggregator (fanout reads this header) spends no more.
        if let Some(name) = attempt.budget_header {
            let budget_ms = attempt.timeout.as_millis().max(1).to_string();
            fields.push(field(name, &budget_ms));
        }
        // Only what the configuration lists for this upstream, every value
        // of a repeated header, in the client's order.
        for (name, value) in &self.headers {
            if attempt
                .forward
                .iter()
                .any(|listed| name.eq_ignore_ascii_case(listed))
            {
                fields.push(field(name, value));
            }
        }
        fields
    }
}

/// The configuration, read from the environment by the instance's first
/// request and kept for the others: the environment is the instance's, and
/// does not change while it lives. Reading it was a fifth of a request's
/// fuel. It is the only state a request leaves behind.
pub fn config() -> &'static Result<Config, ConfigError> {
    static CONFIG: OnceLock<Result<Config, ConfigError>> = OnceLock::new();
    CONFIG.get_or_init(Config::from_env)
}

/// Answers `request` with `config` (the instance's, read once): the answer,
/// its body and its `Server-Timing`. The budget runs from `env`'s origin,
/// which is when the request arrived.
pub async fn handle<E: Env>(
    env: &E,
    config: &Result<Config, ConfigError>,
    request: &Incoming,
) -> (Answer, Vec<u8>, String) {
    let trace = request
        .traceparent
        .as_deref()
        .and_then(TraceContext::parse)
        .unwrap_or_else(|| TraceContext::new_root(|| env.random()));
    let mut timings = Vec::new();
    let (answer, body) = match answer(env, config, request, &trace, &mut timings).await {
        Ok((answer, max_body)) => answer.into_bytes(max_body),
        Err(error) => Answer::error(&error).into_bytes(usize::MAX),
    };
    let server_timing = fanout::server_timing(&timings, env.now());
    (answer, body, server_timing)
}

async fn answer<E: Env>(
    env: &E,
    config: &Result<Config, ConfigError>,
    request: &Incoming,
    trace: &TraceContext,
    timings: &mut Vec<(String, Duration)>,
) -> Result<(Answer, usize), ApiError> {
    let config = config.as_ref().map_err(|e| {
        ApiError::new(
            500,
            "config_invalid",
            format!("guest configuration is invalid: {e}"),
        )
    })?;
    let (path, query) = request.path_and_query();
    let target = api::route(config, &request.method, path, query)?;
    let budget = Budget::starting_at(
        Duration::ZERO,
        api::budget(config, request.timeout.as_deref())?,
    );
    Ok(match target {
        Target::Item { route, params } => {
            let items = [params];
            let mut done = fanout::fan_out(env, config, route, &items, budget, trace).await;
            *timings = done.timings;
            (Answer::item(done.items.remove(0)), route.max_body)
        }
        Target::Batch { route, items } => {
            let done = fanout::fan_out(env, config, route, &items, budget, trace).await;
            *timings = done.timings;
            (Answer::batch(done.items), route.max_body)
        }
    })
}

/// The header fields of `answer`, whose body is `body_len` bytes.
pub fn answer_fields(
    answer: &Answer,
    body_len: usize,
    server_timing: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = vec![
        ("content-type".into(), b"application/json".to_vec()),
        ("content-length".into(), body_len.to_string().into_bytes()),
        ("server-timing".into(), server_timing.as_bytes().to_vec()),
    ];
    if answer.status == 405 {
        fields.push(("allow".into(), b"GET".to_vec()));
    }
    // The guest's one 503: the host shed a call (an open circuit, the retry
    // budget). Say when to come back, as the host's own sheds do; the host
    // then paces a client that does not listen, as it paces its own.
    if answer.status == 503 {
        fields.push(("retry-after".into(), b"1".to_vec()));
    }
    if !answer.degraded.is_empty() {
        fields.push((
            DEGRADED_HEADER.into(),
            answer.degraded.join(", ").into_bytes(),
        ));
    }
    // Upstream names come from the configuration: a value a host would
    // refuse is left out rather than failing the whole list.
    fields.retain(|(_, value)| is_field_value(value));
    fields
}

/// What `http`'s `HeaderValue::from_bytes` accepts: no control bytes but
/// tab. (The `http` crate itself is not a dependency of the policy.)
fn is_field_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f))
}

/// Why an upstream's non-2xx answer failed the attempt: a 429 or 503 with
/// a `Retry-After` is throttling, anything else its status.
pub fn refused(status: u16, retry_after: Option<&[u8]>) -> UpstreamFailure {
    match (status, retry_after) {
        (429 | 503, Some(value)) => UpstreamFailure::Throttled {
            status,
            // Present but not seconds (a date): not within this request.
            retry_after: std::str::from_utf8(value)
                .ok()
                .and_then(parse_retry_after)
                .unwrap_or(Duration::from_secs(3600)),
        },
        _ => UpstreamFailure::Status(status),
    }
}

/// Why a call failed, from a `wasi:http` `error-code` named `$ErrorCode`
/// in the caller's scope: `wasi:http@0.2` and `@0.3` each have their own
/// type, with the same cases (a macro, since no trait spans the two).
#[macro_export]
macro_rules! upstream_failure {
    ($ErrorCode:ident, $code:expr) => {
        match $code {
            // The host's own timeout, triggered by the first-byte option.
            $ErrorCode::ConnectionReadTimeout | $ErrorCode::HttpResponseTimeout => {
                $crate::errors::UpstreamFailure::Timeout
            }
            $ErrorCode::HttpRequestDenied => $crate::errors::UpstreamFailure::Denied,
            $ErrorCode::ConnectionLimitReached => $crate::errors::UpstreamFailure::Shed(
                "its concurrency limit or retry budget is used up".into(),
            ),
            $ErrorCode::DestinationUnavailable => {
                $crate::errors::UpstreamFailure::Shed("its circuit breaker is open".into())
            }
            $ErrorCode::TlsCertificateError => $crate::errors::UpstreamFailure::Tls {
                why: "the server's certificate was refused (unknown CA, wrong name or expired)"
                    .into(),
                retryable: false,
            },
            $ErrorCode::TlsAlertReceived(alert) => $crate::errors::UpstreamFailure::Tls {
                why: format!(
                    "the server refused the handshake (alert {})",
                    alert
                        .alert_message
                        .as_deref()
                        .unwrap_or("without a message")
                ),
                retryable: false,
            },
            $ErrorCode::TlsProtocolError => $crate::errors::UpstreamFailure::Tls {
                why: "the handshake failed".into(),
                retryable: true,
            },
            code => $crate::errors::UpstreamFailure::Transport(format!("{code:?}")),
        }
    };
}

/// Sets a GET's method, scheme, authority and path from `url` on
/// `$request`, an outgoing request of either `wasi:http` version (`Method`
/// and `Scheme` named by `$Method` and `$Scheme` in the caller's scope), or
/// says why it cannot be: a URL that does not parse, or a part the host
/// refused. A macro for the same reason as [`upstream_failure!`].
#[macro_export]
macro_rules! set_get_target {
    ($request:expr, $url:expr, $Method:ident, $Scheme:ident) => {{
        let url: &str = $url;
        let request = &$request;
        let invalid = |why: String| {
            $crate::errors::UpstreamFailure::Transport(format!("invalid request: {why}"))
        };
        match url.parse::<$crate::serve::Uri>() {
            Err(e) => Err(invalid(format!("{url}: {e}"))),
            Ok(uri) => {
                let scheme = match uri.scheme_str() {
                    Some("http") => $Scheme::Http,
                    Some("https") | None => $Scheme::Https,
                    Some(other) => $Scheme::Other(other.to_string()),
                };
                let refused = |what: &str| invalid(format!("the host refused the {what} of {url}"));
                request
                    .set_method(&$Method::Get)
                    .map_err(|()| refused("method"))
                    .and_then(|()| {
                        request
                            .set_scheme(Some(&scheme))
                            .map_err(|()| refused("scheme"))
                    })
                    .and_then(|()| {
                        request
                            .set_authority(uri.authority().map(|a| a.as_str()))
                            .map_err(|()| refused("authority"))
                    })
                    .and_then(|()| {
                        request
                            .set_path_with_query(uri.path_and_query().map(|p| p.as_str()))
                            .map_err(|()| refused("path"))
                    })
            }
        }
    }};
}

/// The name of `$method`, a request method of either `wasi:http` version
/// (`Method` named by `$Method` in the caller's scope), as [`Incoming`]
/// takes it. A macro for the same reason as [`upstream_failure!`].
#[macro_export]
macro_rules! method_name {
    ($Method:ident, $method:expr) => {
        match $method {
            $Method::Get => "GET".to_string(),
            $Method::Head => "HEAD".to_string(),
            $Method::Post => "POST".to_string(),
            $Method::Put => "PUT".to_string(),
            $Method::Delete => "DELETE".to_string(),
            $Method::Connect => "CONNECT".to_string(),
            $Method::Options => "OPTIONS".to_string(),
            $Method::Trace => "TRACE".to_string(),
            $Method::Patch => "PATCH".to_string(),
            $Method::Other(other) => other,
        }
    };
}

/// Adds `chunk` to an upstream's body read so far, refusing a body larger
/// than [`MAX_UPSTREAM_BODY`].
pub fn append_chunk(bytes: &mut Vec<u8>, chunk: &[u8]) -> Result<(), UpstreamFailure> {
    if bytes.len() + chunk.len() > MAX_UPSTREAM_BODY {
        return Err(body_too_large());
    }
    bytes.extend_from_slice(chunk);
    Ok(())
}

/// An upstream's body went past [`MAX_UPSTREAM_BODY`].
pub fn body_too_large() -> UpstreamFailure {
    UpstreamFailure::InvalidBody(format!(
        "the body is larger than {} KiB",
        MAX_UPSTREAM_BODY >> 10
    ))
}

/// Nanoseconds, as `wasi:clocks` counts them, saturating.
pub fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Random bits for one request, fetched from the host 64 bytes at a time.
///
/// A request takes about five 64-bit values (a trace id, then a span id
/// and maybe a jitter per call) and each fetch is a host call; one fetch
/// serves them all. One buffer per request, so nothing of one request's
/// bits is left for the next in a reused instance.
#[derive(Debug, Default)]
pub struct RandomBuffer {
    words: std::cell::Cell<[u64; 8]>,
    left: std::cell::Cell<usize>,
}

impl RandomBuffer {
    /// The next 64 bits, calling `fill` for 64 new bytes when none are left.
    pub fn next(&self, fill: impl FnOnce(&mut [u8; 64])) -> u64 {
        let mut words = self.words.get();
        let mut left = self.left.get();
        if left == 0 {
            let mut bytes = [0u8; 64];
            fill(&mut bytes);
            for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
                *word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            }
            left = words.len();
            self.words.set(words);
        }
        self.left.set(left - 1);
        words[words.len() - left]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bits_are_fetched_once_for_eight_values() {
        let buffer = RandomBuffer::default();
        let fetches = std::cell::Cell::new(0u8);
        let fill = |bytes: &mut [u8; 64]| {
            fetches.set(fetches.get() + 1);
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = fetches.get().wrapping_mul(100).wrapping_add(i as u8);
            }
        };
        let values: Vec<u64> = (0..9).map(|_| buffer.next(fill)).collect();
        assert_eq!(fetches.get(), 2, "eight values a fetch");
        // Each value is the next 8 bytes of the fetch, little-endian.
        assert_eq!(
            values[0],
            u64::from_le_bytes([100, 101, 102, 103, 104, 105, 106, 107])
        );
        assert_eq!(
            values[7],
            u64::from_le_bytes([156, 157, 158, 159, 160, 161, 162, 163])
        );
        assert_eq!(
            values[8],
            u64::from_le_bytes([200, 201, 202, 203, 204, 205, 206, 207])
        );
        let distinct: std::collections::HashSet<_> = values.iter().collect();
        assert_eq!(distinct.len(), 9);
    }

    fn fields(list: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn the_first_of_a_repeated_header_counts_and_only_text_is_kept() {
        let request = Incoming::new(
            "GET".into(),
            None,
            fields(&[
                ("X-Request-Timeout-Ms", b"50"),
                ("x-request-timeout-ms", b"70"),
                ("traceparent", b"caf\xc3\xa9"),
                ("x-tenant", b"a"),
                ("x-tenant", b"b"),
            ]),
        );
        assert_eq!(request.timeout.as_deref(), Some("50"));
        assert_eq!(request.traceparent, None);
        assert_eq!(request.path_and_query(), ("/", None));
        let attempt = Attempt {
            upstream: "inventory",
            url: "http://inventory/1".into(),
            number: 2,
            timeout: Duration::from_micros(300),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            budget_header: Some(TIMEOUT_HEADER),
            forward: &["X-TENANT".to_string()],
        };
        let sent = request.attempt_fields(&attempt);
        let values = |name: &str| -> Vec<&[u8]> {
            sent.iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_slice())
                .collect()
        };
        assert_eq!(values(HINT_ATTEMPT), [b"2"]);
        // Under a millisecond is still 1, never 0 ("no time at all").
        assert_eq!(values(TIMEOUT_HEADER), [b"1"]);
        assert_eq!(values("x-tenant"), [b"a", b"b"]);
        assert!(values("traceparent")[0].starts_with(b"00-0af76519"));
    }

    #[test]
    fn a_timeout_header_that_is_not_text_is_still_seen() {
        let request = Incoming::new(
            "GET".into(),
            Some("/products/1?x=1".into()),
            fields(&[(TIMEOUT_HEADER, b"\xff")]),
        );
        assert_eq!(request.timeout.as_deref(), Some(NOT_ASCII));
        assert_eq!(request.path_and_query(), ("/products/1", Some("x=1")));
    }

    #[test]
    fn answer_fields_say_when_to_come_back_and_drop_values_a_host_refuses() {
        let answer = Answer {
            status: 503,
            body: serde_json::Value::Null,
            degraded: vec!["reviews".into(), "bad\nname".into()],
        };
        let sent = answer_fields(&answer, 12, "total;dur=1.0");
        let names: Vec<&str> = sent.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "content-length",
                "server-timing",
                "retry-after"
            ]
        );
        assert_eq!(sent[1].1, b"12");
    }

    #[test]
    fn throttling_needs_a_retry_after() {
        assert!(matches!(
            refused(503, Some(b"2")),
            UpstreamFailure::Throttled { retry_after, .. } if retry_after == Duration::from_secs(2)
        ));
        assert!(matches!(
            refused(429, Some(b"Wed, 21 Oct 2015 07:28:00 GMT")),
            UpstreamFailure::Throttled { retry_after, .. } if retry_after == Duration::from_secs(3600)
        ));
        assert!(matches!(refused(503, None), UpstreamFailure::Status(503)));
        assert!(matches!(
            refused(404, Some(b"1")),
            UpstreamFailure::Status(404)
        ));
    }

    #[test]
    fn an_upstream_body_is_bounded() {
        let mut bytes = vec![0; MAX_UPSTREAM_BODY - 1];
        append_chunk(&mut bytes, b"x").unwrap();
        assert!(matches!(
            append_chunk(&mut bytes, b"y"),
            Err(UpstreamFailure::InvalidBody(_))
        ));
        assert_eq!(bytes.len(), MAX_UPSTREAM_BODY);
    }
}
