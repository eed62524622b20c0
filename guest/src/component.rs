//! The thin layer that touches WASI: the `incoming-handler` export and the
//! concurrent outgoing calls.

// `wstd::http_server` also emits a `fn main` for bin crates; in this cdylib
// it is never called.
#![allow(dead_code)]

use crate::api::{self, ApiError, Outcome, Route, UpstreamFailure};
use crate::config::{Config, Upstream};
use futures_util::future::join_all;
use std::time::Instant;
use wstd::http::{Body, Client, ErrorCode, Request, Response, StatusCode};
use wstd::prelude::*;

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, wstd::http::Error> {
    Ok(handle(request).await)
}

async fn handle(request: Request<Body>) -> Response<Body> {
    // The budget starts when the request arrives, before anything else runs.
    let deadline_base = Instant::now();
    let route = match api::route(request.method().as_str(), request.uri().path()) {
        Ok(route) => route,
        Err(e) => return error_response(&e),
    };
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            return error_response(&ApiError::new(
                500,
                "config_invalid",
                format!("guest configuration is invalid: {e}"),
            ));
        }
    };
    let deadline = deadline_base + config.deadline;
    match route {
        Route::Product(id) => match product(&config, &id, deadline).await {
            Ok(value) => json_response(StatusCode::OK, &value),
            Err(e) => error_response(&e),
        },
    }
}

/// Calls every upstream at once and merges the answers: the request costs the
/// slowest upstream, not the sum.
async fn product(
    config: &Config,
    id: &str,
    deadline: Instant,
) -> Result<serde_json::Value, ApiError> {
    let calls = config.upstreams.iter().map(|upstream| async move {
        Outcome {
            upstream: upstream.spec.name,
            field: upstream.spec.field,
            result: call(upstream, id, deadline).await,
        }
    });
    api::merge(id, join_all(calls).await)
}

/// One upstream call, bounded by the request's deadline. When the deadline
/// passes, the pending call is dropped, which makes the host abort the
/// in-flight request.
async fn call(
    upstream: &Upstream,
    id: &str,
    deadline: Instant,
) -> Result<serde_json::Value, UpstreamFailure> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(UpstreamFailure::Timeout);
    }
    let request = Request::get(upstream.url(id))
        .header("accept", "application/json")
        .body(Body::empty())
        .map_err(|e| UpstreamFailure::Transport(format!("invalid request: {e}")))?;
    let mut client = Client::new();
    // Tell the host too, so a host-side transport gives up at the same time.
    client.set_first_byte_timeout(remaining);
    let attempt = async {
        let response = client.send(request).await.map_err(transport_failure)?;
        let status = response.status();
        let mut body = response.into_body();
        let bytes = body.contents().await.map_err(transport_failure)?;
        if !status.is_success() {
            return Err(UpstreamFailure::Status(status.as_u16()));
        }
        api::parse_upstream_body(bytes)
    };
    match attempt.timeout(wstd::time::Duration::from(remaining)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(UpstreamFailure::Timeout),
    }
}

fn transport_failure(e: wstd::http::Error) -> UpstreamFailure {
    match e.downcast_ref::<ErrorCode>() {
        // The host's own timeout, triggered by the first-byte option above.
        Some(ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout) => {
            UpstreamFailure::Timeout
        }
        Some(code) => UpstreamFailure::Transport(format!("{code:?}")),
        None => UpstreamFailure::Transport(format!("{e:#}")),
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn error_response(error: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, &error.to_json());
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert("allow", wstd::http::HeaderValue::from_static("GET"));
    }
    response
}
