//! The thin layer that touches WASI: the `incoming-handler` export, the
//! clock, randomness, and one upstream attempt over `wasi:http`.

// `wstd::http_server` also emits a `fn main` for bin crates; in this cdylib
// it is never called.
#![allow(dead_code)]

use crate::api::{self, Answer, ApiError, Target, UpstreamFailure};
use crate::config::Config;
use crate::fanout::{self, Attempt, Budget, Env};
use crate::trace::TraceContext;
use serde_json::Value;
use std::time::{Duration, Instant};
use wstd::http::{Body, Client, ErrorCode, HeaderValue, Request, Response, StatusCode};
use wstd::prelude::*;

/// Prefix of the hints the guest leaves for the host on outgoing requests.
/// The fanout host reads and strips them; any other host just forwards them.
pub const HINT_PREFIX: &str = "x-fanout-hint-";

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, wstd::http::Error> {
    Ok(handle(request).await)
}

async fn handle(request: Request<Body>) -> Response<Body> {
    let origin = Instant::now();
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    let trace = header("traceparent")
        .and_then(TraceContext::parse)
        .unwrap_or_else(|| TraceContext::new_root(random_u64));
    let env = WasiEnv {
        // The budget starts when the request arrives, before anything else.
        origin,
        tracestate: header("tracestate").map(str::to_string),
    };
    let mut timings = Vec::new();
    let answer = match answer(&env, &request, &trace, &mut timings).await {
        Ok(answer) => answer,
        Err(error) => Answer::error(&error),
    };
    let server_timing = fanout::server_timing(&timings, origin.elapsed());
    respond(answer, &server_timing)
}

async fn answer(
    env: &WasiEnv,
    request: &Request<Body>,
    trace: &TraceContext,
    timings: &mut Vec<(String, Duration)>,
) -> Result<Answer, ApiError> {
    let config = Config::from_env().map_err(|e| {
        ApiError::new(
            500,
            "config_invalid",
            format!("guest configuration is invalid: {e}"),
        )
    })?;
    let target = api::route(
        &config,
        request.method().as_str(),
        request.uri().path(),
        request.uri().query(),
    )?;
    let header = request
        .headers()
        .get(api::TIMEOUT_HEADER)
        .map(|v| v.to_str().unwrap_or("not ascii"));
    let budget = Budget::starting_at(Duration::ZERO, api::budget(&config, header)?);
    Ok(match target {
        Target::Item { route, id } => {
            let ids = [id];
            let mut done = fanout::fan_out(env, &config, route, &ids, budget, trace).await;
            *timings = done.timings;
            Answer::item(done.items.remove(0))
        }
        Target::Batch { route, ids } => {
            let done = fanout::fan_out(env, &config, route, &ids, budget, trace).await;
            *timings = done.timings;
            Answer::batch(done.items)
        }
    })
}

fn respond(answer: Answer, server_timing: &str) -> Response<Body> {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&answer.body).unwrap_or_default();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(value) = HeaderValue::from_str(server_timing) {
        headers.insert("server-timing", value);
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert("allow", HeaderValue::from_static("GET"));
    }
    if !answer.degraded.is_empty()
        && let Ok(value) = HeaderValue::from_str(&answer.degraded.join(", "))
    {
        headers.insert(api::DEGRADED_HEADER, value);
    }
    response
}

struct WasiEnv {
    origin: Instant,
    /// Forwarded unchanged on every attempt, as W3C trace context asks.
    tracestate: Option<String>,
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
        let mut request = Request::get(&attempt.url)
            .header("accept", "application/json")
            .header("traceparent", &attempt.traceparent)
            .header(format!("{HINT_PREFIX}upstream"), attempt.upstream)
            .header(format!("{HINT_PREFIX}attempt"), attempt.number.to_string())
            .body(Body::empty())
            .map_err(|e| UpstreamFailure::Transport(format!("invalid request: {e}")))?;
        if let Some(state) = self
            .tracestate
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            request.headers_mut().insert("tracestate", state);
        }
        let mut client = Client::new();
        // Tell the host too, so a host-side transport gives up at the same time.
        client.set_first_byte_timeout(attempt.timeout);
        let call = async {
            let response = client.send(request).await.map_err(transport_failure)?;
            let status = response.status();
            let mut body = response.into_body();
            let bytes = body.contents().await.map_err(transport_failure)?;
            if !status.is_success() {
                return Err(UpstreamFailure::Status(status.as_u16()));
            }
            api::parse_upstream_body(bytes)
        };
        // On timeout the call is dropped, which makes the host abort the
        // in-flight request.
        match call
            .timeout(wstd::time::Duration::from(attempt.timeout))
            .await
        {
            Ok(result) => result,
            Err(_elapsed) => Err(UpstreamFailure::Timeout),
        }
    }
}

fn transport_failure(e: wstd::http::Error) -> UpstreamFailure {
    match e.downcast_ref::<ErrorCode>() {
        // The host's own timeout, triggered by the first-byte option above.
        Some(ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout) => {
            UpstreamFailure::Timeout
        }
        Some(ErrorCode::HttpRequestDenied) => UpstreamFailure::Denied,
        Some(ErrorCode::ConnectionLimitReached) => {
            UpstreamFailure::Shed("its concurrency limit or retry budget is used up".into())
        }
        Some(ErrorCode::DestinationUnavailable) => {
            UpstreamFailure::Shed("its circuit breaker is open".into())
        }
        Some(code) => UpstreamFailure::Transport(format!("{code:?}")),
        None => UpstreamFailure::Transport(format!("{e:#}")),
    }
}
