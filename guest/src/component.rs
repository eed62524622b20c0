//! The thin layer that touches WASI: the `incoming-handler` export, the
//! clock, randomness, and one upstream attempt over `wasi:http`.

use crate::api::{self, Target};
use crate::config::{Config, ConfigError};
use crate::errors::{self, ApiError, MAX_UPSTREAM_BODY, UpstreamFailure, parse_retry_after};
use crate::fanout::{self, Attempt, Budget, Env};
use crate::merge::Answer;
use crate::protocol::{DEGRADED_HEADER, HINT_ATTEMPT, HINT_UPSTREAM, TIMEOUT_HEADER};
use crate::trace::TraceContext;
use serde_json::Value;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, RequestOptions, ResponseOutparam, Scheme, http_error_code,
};
use wasip2::io::streams::StreamError;
use wstd::http::{HeaderValue, Uri};
use wstd::io::AsyncOutputStream;
use wstd::prelude::*;
use wstd::runtime::AsyncPollable;

/// How much one `read` asks the host for.
const READ_CHUNK: u64 = 64 << 10;

/// The `wasi:http/incoming-handler` export.
///
/// Written against the WASI bindings rather than `#[wstd::http_server]`,
/// which converts every request into an `http::Request` (all headers parsed
/// into a `HeaderMap`, the URI rebuilt) and every answer back: the guest
/// reads three headers and the path, and answers a few small headers and
/// one JSON body.
struct Handler;

impl wasip2::exports::http::incoming_handler::Guest for Handler {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        // The budget starts when the request arrives, before anything else.
        let origin = Instant::now();
        wstd::runtime::block_on(async move {
            let incoming = Incoming::read(&request);
            drop(request);
            let (answer, body, server_timing) = handle(origin, &incoming).await;
            respond(response_out, answer, body, &server_timing).await;
        })
    }
}

wasip2::http::proxy::export!(Handler with_types_in wasip2);

/// A header value that is not visible ASCII, as the timeout header's error
/// message shows it.
const NOT_ASCII: &str = "not ascii";

/// What the guest needs of a request.
struct Incoming {
    method: String,
    path_with_query: String,
    traceparent: Option<String>,
    tracestate: Option<String>,
    timeout: Option<String>,
    /// Every header, for `forward_headers`: visible-ASCII values only.
    headers: Vec<(String, String)>,
}

impl Incoming {
    fn read(request: &IncomingRequest) -> Incoming {
        let headers = request.headers();
        // The first of a repeated header counts, as `http`'s `HeaderMap::get`
        // has it.
        let header = |name: &str| headers.get(name).into_iter().next();
        // Only text `http`'s `HeaderValue::to_str` accepts (visible ASCII):
        // anything else is not a trace context, and would be refused when
        // forwarded (tracestate).
        let text = |value: Vec<u8>| {
            let visible = value
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
            visible.then(|| String::from_utf8(value).ok()).flatten()
        };
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Connect => "CONNECT".to_string(),
            Method::Options => "OPTIONS".to_string(),
            Method::Trace => "TRACE".to_string(),
            Method::Patch => "PATCH".to_string(),
            Method::Other(other) => other,
        };
        Incoming {
            method,
            path_with_query: request.path_with_query().unwrap_or_else(|| "/".into()),
            traceparent: header("traceparent").and_then(text),
            tracestate: header("tracestate")
                .and_then(text)
                .and_then(crate::trace::bounded_tracestate),
            // Present but not text is still an error the client should see.
            timeout: header(TIMEOUT_HEADER).map(|v| text(v).unwrap_or(NOT_ASCII.into())),
            headers: headers
                .entries()
                .into_iter()
                .filter_map(|(name, value)| Some((name, text(value)?)))
                .collect(),
        }
    }

    fn path_and_query(&self) -> (&str, Option<&str>) {
        match self.path_with_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (&self.path_with_query, None),
        }
    }
}

async fn handle(origin: Instant, request: &Incoming) -> (Answer, Vec<u8>, String) {
    let trace = request
        .traceparent
        .as_deref()
        .and_then(TraceContext::parse)
        .unwrap_or_else(|| TraceContext::new_root(random_u64));
    let env = WasiEnv {
        origin,
        tracestate: request.tracestate.clone(),
        headers: request.headers.clone(),
    };
    let mut timings = Vec::new();
    let (answer, body) = match answer(&env, request, &trace, &mut timings).await {
        Ok((answer, max_body)) => answer.into_bytes(max_body),
        Err(error) => Answer::error(&error).into_bytes(usize::MAX),
    };
    let server_timing = fanout::server_timing(&timings, origin.elapsed());
    (answer, body, server_timing)
}

/// The configuration, read from the environment by the instance's first
/// request and kept for the others: the environment is the instance's, and
/// does not change while it lives. Reading it was a fifth of a request's
/// fuel. It is the only state a request leaves behind.
fn config() -> &'static Result<Config, ConfigError> {
    static CONFIG: OnceLock<Result<Config, ConfigError>> = OnceLock::new();
    CONFIG.get_or_init(Config::from_env)
}

async fn answer(
    env: &WasiEnv,
    request: &Incoming,
    trace: &TraceContext,
    timings: &mut Vec<(String, Duration)>,
) -> Result<(Answer, usize), ApiError> {
    let config = config().as_ref().map_err(|e| {
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

/// Sends the answer: its head through `response_out`, then its body.
async fn respond(
    response_out: ResponseOutparam,
    answer: Answer,
    body: Vec<u8>,
    server_timing: &str,
) {
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        ("content-type".into(), b"application/json".to_vec()),
        ("content-length".into(), body.len().to_string().into_bytes()),
        ("server-timing".into(), server_timing.as_bytes().to_vec()),
    ];
    if answer.status == 405 {
        headers.push(("allow".into(), b"GET".to_vec()));
    }
    // The guest's one 503: the host shed a call (an open circuit, the retry
    // budget). Say when to come back, as the host's own sheds do; the host
    // then paces a client that does not listen, as it paces its own.
    if answer.status == 503 {
        headers.push(("retry-after".into(), b"1".to_vec()));
    }
    if !answer.degraded.is_empty() {
        headers.push((
            DEGRADED_HEADER.into(),
            answer.degraded.join(", ").into_bytes(),
        ));
    }
    // Upstream names come from the configuration: a value the host would
    // refuse is left out rather than failing the whole list.
    headers.retain(|(_, value)| HeaderValue::from_bytes(value).is_ok());
    let fields = Fields::from_list(&headers).unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(fields);
    if response.set_status_code(answer.status).is_err() {
        let _ = response.set_status_code(500);
    }
    let Ok(outgoing_body) = response.body() else {
        ResponseOutparam::set(response_out, Err(ErrorCode::InternalError(None)));
        return;
    };
    ResponseOutparam::set(response_out, Ok(response));
    let Ok(stream) = outgoing_body.write() else {
        return;
    };
    let stream = AsyncOutputStream::new(stream);
    // A client that went away makes these fail; there is no one to tell.
    if stream.write_all(&body).await.is_ok() && stream.flush().await.is_ok() {
        drop(stream);
        let _ = OutgoingBody::finish(outgoing_body, None);
    }
}

struct WasiEnv {
    origin: Instant,
    /// Forwarded unchanged on every attempt, as W3C trace context asks.
    tracestate: Option<String>,
    /// The client's headers, of which each upstream's `forward_headers`
    /// are copied onto its calls.
    headers: Vec<(String, String)>,
}

/// 64 bits from wasi:random/random, part of the proxy world.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    wstd::rand::get_random_bytes(&mut bytes);
    u64::from_le_bytes(bytes)
}

impl Env for WasiEnv {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    async fn sleep(&self, duration: Duration) {
        wstd::task::sleep(duration.into()).await;
    }

    fn random(&self) -> u64 {
        random_u64()
    }

    async fn attempt(&self, attempt: Attempt<'_>) -> Result<Value, UpstreamFailure> {
        let attempt_number = attempt.number.to_string();
        let budget_ms = attempt.timeout.as_millis().max(1).to_string();
        let mut headers: Vec<(&str, &str)> = vec![
            ("accept", "application/json"),
            ("traceparent", &attempt.traceparent),
            (HINT_UPSTREAM, attempt.upstream),
            (HINT_ATTEMPT, &attempt_number),
        ];
        if let Some(state) = self.tracestate.as_deref() {
            headers.push(("tracestate", state));
        }
        // What this attempt has left, so that an upstream that is itself an
        // aggregator (fanout reads this header) spends no more.
        if let Some(name) = attempt.budget_header {
            headers.push((name, &budget_ms));
        }
        // Only what the configuration lists for this upstream, every value
        // of a repeated header, in the client's order.
        for (name, value) in &self.headers {
            if attempt
                .forward
                .iter()
                .any(|listed| name.eq_ignore_ascii_case(listed))
            {
                headers.push((name, value));
            }
        }
        // On timeout the call is dropped, which makes the host abort the
        // in-flight request.
        match get(&attempt.url, &headers, attempt.timeout)
            .timeout(wstd::time::Duration::from(attempt.timeout))
            .await
        {
            Ok(result) => result,
            Err(_elapsed) => Err(UpstreamFailure::Timeout),
        }
    }
}

/// One GET over `wasi:http/outgoing-handler`: the answer's body if its status
/// is a success.
///
/// Written against the WASI bindings rather than `wstd::http::Client`
/// because the client writes a request's (empty) body after handing the
/// request to the host, and fails the whole call if the host has already
/// dropped that body: hyper drops a GET's body as soon as it has written the
/// head, so under load a call whose answer was on its way failed with
/// "connection reset". Here the body is finished before the request leaves.
async fn get(
    url: &str,
    headers: &[(&str, &str)],
    first_byte_timeout: Duration,
) -> Result<Value, UpstreamFailure> {
    let request = outgoing_get(url, headers)?;
    let options = RequestOptions::new();
    // A host that cannot time the first byte says so with `Err`; the guest's
    // own timeout around this call still bounds it, so carry on without.
    let _ = options.set_first_byte_timeout(Some(duration_ns(first_byte_timeout)));
    let future = outgoing_handler::handle(request, Some(options)).map_err(failure_of)?;
    AsyncPollable::new(future.subscribe()).wait_for().await;
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(failure_of(code)),
        // Neither happens after the pollable is ready and before `get` is
        // called twice; say so rather than panic if a host gets it wrong.
        Some(Err(())) | None => {
            return Err(UpstreamFailure::Transport(
                "the host gave no response after signalling one".into(),
            ));
        }
    };
    let status = response.status();
    if !(200..300).contains(&status) {
        let retry_after = response.headers().get("retry-after").into_iter().next();
        return Err(match (status, retry_after) {
            (429 | 503, Some(value)) => UpstreamFailure::Throttled {
                status,
                // Present but not seconds (a date): not within this request.
                retry_after: std::str::from_utf8(&value)
                    .ok()
                    .and_then(parse_retry_after)
                    .unwrap_or(Duration::from_secs(3600)),
            },
            _ => UpstreamFailure::Status(status),
        });
    }
    let body = response
        .consume()
        .map_err(|()| UpstreamFailure::Transport("the response body was taken".into()))?;
    let bytes = read_body(&body).await?;
    drop(body);
    errors::parse_upstream_body(&bytes)
}

/// The request, headers checked by the host's rules, its empty body finished.
fn outgoing_get(url: &str, headers: &[(&str, &str)]) -> Result<OutgoingRequest, UpstreamFailure> {
    let invalid = |why: String| UpstreamFailure::Transport(format!("invalid request: {why}"));
    let uri: Uri = url.parse().map_err(|e| invalid(format!("{url}: {e}")))?;
    let entries: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect();
    let fields =
        Fields::from_list(&entries).map_err(|e| invalid(format!("header refused: {e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") | None => Scheme::Https,
        Some(other) => Scheme::Other(other.to_string()),
    };
    let refused = |what: &str| invalid(format!("the host refused the {what} of {url}"));
    request
        .set_method(&Method::Get)
        .map_err(|()| refused("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| refused("scheme"))?;
    request
        .set_authority(uri.authority().map(|a| a.as_str()))
        .map_err(|()| refused("authority"))?;
    request
        .set_path_with_query(uri.path_and_query().map(|p| p.as_str()))
        .map_err(|()| refused("path"))?;
    let body = request
        .body()
        .map_err(|()| invalid("the body was taken".into()))?;
    OutgoingBody::finish(body, None).map_err(failure_of)?;
    Ok(request)
}

/// Reads a response body to its end, up to [`MAX_UPSTREAM_BODY`].
async fn read_body(body: &IncomingBody) -> Result<Vec<u8>, UpstreamFailure> {
    let stream = body
        .stream()
        .map_err(|()| UpstreamFailure::Transport("the response body stream was taken".into()))?;
    let ready = AsyncPollable::new(stream.subscribe());
    let mut bytes = Vec::new();
    loop {
        match stream.read(READ_CHUNK) {
            // Nothing yet: wait, rather than spin.
            Ok(chunk) if chunk.is_empty() => ready.wait_for().await,
            Ok(chunk) => {
                if bytes.len() + chunk.len() > MAX_UPSTREAM_BODY {
                    return Err(UpstreamFailure::InvalidBody(format!(
                        "the body is larger than {} KiB",
                        MAX_UPSTREAM_BODY >> 10
                    )));
                }
                bytes.extend_from_slice(&chunk);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(error)) => {
                return Err(match http_error_code(&error) {
                    Some(code) => failure_of(code),
                    None => UpstreamFailure::Transport(error.to_debug_string()),
                });
            }
        }
    }
    // The pollable is the stream's child and must go first.
    drop(ready);
    drop(stream);
    Ok(bytes)
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn failure_of(code: ErrorCode) -> UpstreamFailure {
    match code {
        // The host's own timeout, triggered by the first-byte option above.
        ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            UpstreamFailure::Timeout
        }
        ErrorCode::HttpRequestDenied => UpstreamFailure::Denied,
        ErrorCode::ConnectionLimitReached => {
            UpstreamFailure::Shed("its concurrency limit or retry budget is used up".into())
        }
        ErrorCode::DestinationUnavailable => {
            UpstreamFailure::Shed("its circuit breaker is open".into())
        }
        ErrorCode::TlsCertificateError => UpstreamFailure::Tls {
            why: "the server's certificate was refused (unknown CA, wrong name or expired)".into(),
            retryable: false,
        },
        ErrorCode::TlsAlertReceived(alert) => UpstreamFailure::Tls {
            why: format!(
                "the server refused the handshake (alert {})",
                alert
                    .alert_message
                    .as_deref()
                    .unwrap_or("without a message")
            ),
            retryable: false,
        },
        ErrorCode::TlsProtocolError => UpstreamFailure::Tls {
            why: "the handshake failed".into(),
            retryable: true,
        },
        code => UpstreamFailure::Transport(format!("{code:?}")),
    }
}
