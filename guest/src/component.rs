//! The thin layer that touches WASI: the `incoming-handler` export, the
//! clock, randomness, and one upstream attempt over `wasi:http`.

use crate::errors::{self, UpstreamFailure};
use crate::fanout::{Attempt, Env};
use crate::merge::Answer;
use crate::serve::{self, Incoming, RandomBuffer, duration_ns};
use serde_json::Value;
use std::time::{Duration, Instant};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, RequestOptions, ResponseOutparam, Scheme, http_error_code,
};
use wasip2::io::streams::StreamError;
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
            let incoming = incoming(&request);
            drop(request);
            let env = WasiEnv {
                origin,
                request: &incoming,
                random: RandomBuffer::default(),
            };
            let (answer, body, server_timing) =
                serve::handle(&env, serve::config(), &incoming).await;
            respond(response_out, answer, body, &server_timing).await;
        })
    }
}

wasip2::http::proxy::export!(Handler with_types_in wasip2);

/// The request as [`serve`](crate::serve) reads it.
fn incoming(request: &IncomingRequest) -> Incoming {
    let method = crate::method_name!(Method, request.method());
    Incoming::new(
        method,
        request.path_with_query(),
        request.headers().entries(),
    )
}

/// Sends the answer: its head through `response_out`, then its body.
async fn respond(
    response_out: ResponseOutparam,
    answer: Answer,
    body: Vec<u8>,
    server_timing: &str,
) {
    let headers = serve::answer_fields(&answer, body.len(), server_timing);
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

struct WasiEnv<'a> {
    /// When the request arrived.
    origin: Instant,
    request: &'a Incoming,
    /// From wasi:random/random, part of the proxy world.
    random: RandomBuffer,
}

impl Env for WasiEnv<'_> {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    async fn sleep(&self, duration: Duration) {
        wstd::task::sleep(duration.into()).await;
    }

    fn random(&self) -> u64 {
        self.random
            .next(|bytes| wstd::rand::get_random_bytes(bytes))
    }

    async fn attempt(&self, attempt: Attempt<'_>) -> Result<Value, UpstreamFailure> {
        let fields = self.request.attempt_fields(&attempt);
        // On timeout the call is dropped, which makes the host abort the
        // in-flight request.
        match get(&attempt.url, fields, attempt.timeout)
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
    fields: Vec<(String, Vec<u8>)>,
    first_byte_timeout: Duration,
) -> Result<Value, UpstreamFailure> {
    let request = outgoing_get(url, fields)?;
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
        return Err(serve::refused(status, retry_after.as_deref()));
    }
    let body = response
        .consume()
        .map_err(|()| UpstreamFailure::Transport("the response body was taken".into()))?;
    let bytes = read_body(&body).await?;
    drop(body);
    errors::parse_upstream_body(&bytes)
}

/// The request, headers checked by the host's rules, its empty body finished.
fn outgoing_get(
    url: &str,
    fields: Vec<(String, Vec<u8>)>,
) -> Result<OutgoingRequest, UpstreamFailure> {
    let invalid = |why: String| UpstreamFailure::Transport(format!("invalid request: {why}"));
    let fields =
        Fields::from_list(&fields).map_err(|e| invalid(format!("header refused: {e:?}")))?;
    let request = OutgoingRequest::new(fields);
    crate::set_get_target!(request, url, Method, Scheme)?;
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
    // Subscribed to on the first empty read only: a small body is often
    // all there once the head is, and each subscription is two host calls.
    let mut ready: Option<AsyncPollable> = None;
    let mut bytes = Vec::new();
    loop {
        match stream.read(READ_CHUNK) {
            // Nothing yet: wait, rather than spin.
            Ok(chunk) if chunk.is_empty() => {
                ready
                    .get_or_insert_with(|| AsyncPollable::new(stream.subscribe()))
                    .wait_for()
                    .await
            }
            Ok(chunk) => serve::append_chunk(&mut bytes, &chunk)?,
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

fn failure_of(code: ErrorCode) -> UpstreamFailure {
    crate::upstream_failure!(ErrorCode, code)
}
