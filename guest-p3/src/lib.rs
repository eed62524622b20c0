//! fanout's guest as a `wasi:http@0.3` component: the same policy as
//! `guest/` (its [`serve`] module does everything but the I/O), exported as
//! `wasi:http/handler@0.3.0` and calling upstreams through
//! `wasi:http/client@0.3.0`. A host that supports WASIp3 may run many
//! requests at once in one instance; the `wasi:http@0.2` build stays the
//! default for portability (Spin, jco and `wasmtime serve` without flags).
//!
//! Natively the crate is empty: the policy is tested in `guest/`.

#![cfg(target_arch = "wasm32")]

use fanout_guest::errors::{self, UpstreamFailure};
use fanout_guest::fanout::{Attempt, Env};
use fanout_guest::serve::{self, Incoming, RandomBuffer, duration_ns};
use futures_util::future::{Either, select};
use serde_json::Value;
use std::pin::pin;
use std::time::{Duration, Instant};
use wasip3::clocks::monotonic_clock;
use wasip3::http::client;
use wasip3::http::types::{ErrorCode, Fields, Method, Request, RequestOptions, Response, Scheme};
use wasip3::{wit_future, wit_stream};

/// How much one read of an upstream's body asks for.
const READ_CHUNK: usize = 64 << 10;

struct Handler;

wasip3::http::service::export!(Handler);

impl wasip3::exports::http::handler::Guest for Handler {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        // The budget starts when the request arrives, before anything else.
        let origin = Instant::now();
        let incoming = incoming(&request);
        // The request body is not read: every route is a GET.
        drop(request);
        let env = P3Env {
            origin,
            request: &incoming,
            random: RandomBuffer::default(),
        };
        let (answer, body, server_timing) = serve::handle(&env, serve::config(), &incoming).await;
        let fields = serve::answer_fields(&answer, body.len(), &server_timing);
        let headers = Fields::from_list(&fields).unwrap_or_else(|_| Fields::new());
        let (mut body_tx, body_rx) = wit_stream::new();
        // Dropped unwritten: no trailers.
        let (_, trailers) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(headers, Some(body_rx), trailers);
        if response.set_status_code(answer.status).is_err() {
            let _ = response.set_status_code(500);
        }
        // The body is written once the host reads it, after this returns.
        // A client that went away makes the write fail; there is no one to
        // tell.
        wasip3::spawn(async move {
            let _ = body_tx.write_all(body).await;
        });
        Ok(response)
    }
}

/// The request as [`serve`] reads it.
fn incoming(request: &Request) -> Incoming {
    let method = fanout_guest::method_name!(Method, request.get_method());
    Incoming::new(
        method,
        request.get_path_with_query(),
        request.get_headers().copy_all(),
    )
}

struct P3Env<'a> {
    /// When the request arrived.
    origin: Instant,
    request: &'a Incoming,
    /// From wasi:random/random.
    random: RandomBuffer,
}

impl Env for P3Env<'_> {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    async fn sleep(&self, duration: Duration) {
        monotonic_clock::wait_for(duration_ns(duration)).await;
    }

    fn random(&self) -> u64 {
        self.random.next(|bytes| {
            let fresh = wasip3::random::random::get_random_bytes(bytes.len() as u64);
            bytes.iter_mut().zip(fresh).for_each(|(b, f)| *b = f);
        })
    }

    async fn attempt(&self, attempt: Attempt<'_>) -> Result<Value, UpstreamFailure> {
        let fields = self.request.attempt_fields(&attempt);
        let call = pin!(get(&attempt.url, fields, attempt.timeout));
        let timer = pin!(monotonic_clock::wait_for(duration_ns(attempt.timeout)));
        // On timeout the call is dropped, which cancels the host's request.
        match select(call, timer).await {
            Either::Left((result, _)) => result,
            Either::Right(((), _)) => Err(UpstreamFailure::Timeout),
        }
    }
}

/// One GET over `wasi:http/client`: the answer's body if its status is a
/// success.
async fn get(
    url: &str,
    fields: Vec<(String, Vec<u8>)>,
    first_byte_timeout: Duration,
) -> Result<Value, UpstreamFailure> {
    let request = outgoing_get(url, fields, first_byte_timeout)?;
    let response = client::send(request).await.map_err(failure_of)?;
    let status = response.get_status_code();
    if !(200..300).contains(&status) {
        let retry_after = response.get_headers().get("retry-after").into_iter().next();
        return Err(serve::refused(status, retry_after.as_deref()));
    }
    // Nothing to report back about the body: dropped unwritten, it says
    // the guest handled it.
    let (_, handled) = wit_future::new(|| Ok(()));
    let (mut contents, trailers) = Response::consume_body(response, handled);
    let mut bytes = Vec::new();
    loop {
        // Never room for more than one byte past the limit.
        let room = (errors::MAX_UPSTREAM_BODY + 1 - bytes.len()).min(READ_CHUNK);
        bytes.reserve_exact(room);
        let (result, read) = contents.read(bytes).await;
        bytes = read;
        if bytes.len() > errors::MAX_UPSTREAM_BODY {
            return Err(serve::body_too_large());
        }
        match result {
            wasip3::wit_bindgen::StreamResult::Complete(_) => {}
            wasip3::wit_bindgen::StreamResult::Dropped
            | wasip3::wit_bindgen::StreamResult::Cancelled => break,
        }
    }
    drop(contents);
    // The stream ends the same way whether the body was whole or cut off:
    // the trailers' future tells which.
    trailers.await.map_err(failure_of)?;
    errors::parse_upstream_body(&bytes)
}

/// The request: a GET with `fields` and no body, its first byte awaited no
/// longer than `first_byte_timeout`.
fn outgoing_get(
    url: &str,
    fields: Vec<(String, Vec<u8>)>,
    first_byte_timeout: Duration,
) -> Result<Request, UpstreamFailure> {
    let invalid = |why: String| UpstreamFailure::Transport(format!("invalid request: {why}"));
    let headers =
        Fields::from_list(&fields).map_err(|e| invalid(format!("header refused: {e:?}")))?;
    let options = RequestOptions::new();
    // A host that cannot time the first byte says so with `Err`; the guest's
    // own timeout around the call still bounds it, so carry on without.
    let _ = options.set_first_byte_timeout(Some(duration_ns(first_byte_timeout)));
    let (_, trailers) = wit_future::new(|| Ok(None));
    let (request, _sent) = Request::new(headers, None, trailers, Some(options));
    fanout_guest::set_get_target!(request, url, Method, Scheme)?;
    Ok(request)
}

fn failure_of(code: ErrorCode) -> UpstreamFailure {
    fanout_guest::upstream_failure!(ErrorCode, code)
}
