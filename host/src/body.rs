//! The bodies that cross the host: the guest's answer, cut off when the
//! guest fails before finishing it, or read whole before it changes
//! runtime; and the client's request body, as the guest sees it.

use crate::error::Failure;
use crate::metrics::{CauseLabel, Metrics};
use crate::response::{ResponseBody, full_body};
use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use std::sync::{Arc, OnceLock};
use tokio::task::AbortHandle;

/// What a guest that failed after sending its answer's head left behind:
/// the failure (set by the guest's task), and where to report it.
#[derive(Clone)]
pub(crate) struct GuestCut {
    pub(crate) failure: Arc<OnceLock<Failure>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) trace_id: String,
}

impl GuestCut {
    pub(crate) fn guard(self, body: ResponseBody) -> ResponseBody {
        CutOff { body, cut: self }.boxed_unsync()
    }
}

/// A guest's answer body that ends in an error when the guest failed
/// before finishing it.
///
/// wasmtime-wasi-http ends the body cleanly when the store is dropped with
/// the body unfinished (a trap, fuel, the deadline), so that the client
/// would take a truncated answer for a complete one. Here that end becomes
/// `HttpResponseIncomplete`: hyper then leaves out the last chunk (or closes
/// the connection short of the announced length) and the client sees the
/// cut.
struct CutOff {
    body: ResponseBody,
    cut: GuestCut,
}

impl Body for CutOff {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => match this.cut.failure.get() {
                Some(failure) => {
                    let cause = failure.code();
                    this.cut
                        .metrics
                        .failures
                        .get_or_create(&CauseLabel { cause })
                        .inc();
                    tracing::warn!(
                        trace_id = %this.cut.trace_id, cause,
                        "the guest failed after its answer's head was sent, \
                         the body is cut off: {}", failure.message()
                    );
                    Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
                }
                None => Poll::Ready(None),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // The end is only known once the inner body has said so and the
        // guest's outcome has been looked at.
        false
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Stops a guest's task when its answer is dropped unfinished: the client
/// went away (before the head, or mid-body). Aborting the task drops the
/// store, and with it every upstream call in flight (each one's connection
/// is closed) and every retry the guest would have started.
pub(crate) struct GuestTask(Option<AbortHandle>);

impl GuestTask {
    pub(crate) fn new(task: AbortHandle) -> GuestTask {
        GuestTask(Some(task))
    }

    /// The answer is complete: the guest may finish what it does after it.
    fn release(&mut self) {
        self.0 = None;
    }

    /// `response`, stopping the guest if its body is dropped before its
    /// end.
    pub(crate) fn until_end_of(self, response: Response<ResponseBody>) -> Response<ResponseBody> {
        let length = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let mut task = self;
        response.map(|body| {
            let left = length.or(body.size_hint().exact());
            if left == Some(0) {
                // Nothing to wait for (hyper may not even poll it).
                task.release();
            }
            UntilEnd { body, task, left }.boxed_unsync()
        })
    }
}

impl Drop for GuestTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// A body that stops the guest's task when dropped before its end.
struct UntilEnd {
    body: ResponseBody,
    task: GuestTask,
    /// Bytes still to come of a body of known length: hyper drops such a
    /// body once it has them all, without polling it to its end.
    left: Option<u64>,
}

impl Body for UntilEnd {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None | Some(Err(_))) => this.task.release(),
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let (Some(left), Some(data)) = (&mut this.left, frame.data_ref()) {
                    *left = left.saturating_sub(data.len() as u64);
                    if *left == 0 {
                        this.task.release();
                    }
                }
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Reads up to `cap` bytes of `response`'s body before handing it on, so
/// that a small body crosses to the connection's runtime in one piece.
///
/// The head is not out yet: a guest that fails before its body ends gets
/// the failure's own answer (a 504 at the deadline, say) rather than a
/// broken body. A body that is larger or has trailers is replayed as far as
/// it was read and streams the rest, [guarded](GuestCut::guard) as on one
/// runtime.
pub(crate) async fn buffer_body(
    response: Response<ResponseBody>,
    cap: usize,
    cut: GuestCut,
) -> Result<Response<ResponseBody>, Failure> {
    let (parts, mut body) = response.into_parts();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0;
    let rest = loop {
        match body.frame().await {
            None => break None,
            Some(Ok(frame)) if frame.is_data() && size < cap => {
                let data = frame.into_data().unwrap_or_default();
                size += data.len();
                chunks.push(data);
            }
            Some(Ok(frame)) => break Some(frame),
            Some(Err(e)) => {
                return Err(cut.failure.get().cloned().unwrap_or_else(|| {
                    Failure::NoResponse(format!("the guest aborted its answer's body: {e}"))
                }));
            }
        }
    };
    let body = match rest {
        None => {
            if let Some(failure) = cut.failure.get() {
                return Err(failure.clone());
            }
            let whole = match chunks.len() {
                1 => chunks.pop().unwrap_or_default(),
                _ => Bytes::from(chunks.concat()),
            };
            full_body(whole)
        }
        Some(next) => {
            use futures_util::StreamExt;
            let read = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))))
                .chain(futures_util::stream::once(async move { Ok(next) }))
                .chain(http_body_util::BodyStream::new(cut.guard(body)));
            http_body_util::StreamBody::new(read).boxed_unsync()
        }
    };
    Ok(Response::from_parts(parts, body))
}

/// An error reading the client's request body, as the guest will see it.
pub(crate) fn incoming_body_error(e: impl Into<tower::BoxError>) -> wasmtime_wasi_http::Error {
    match e.into().downcast::<hyper::Error>() {
        Ok(hyper) => wasmtime_wasi_http::Error::from(*hyper),
        Err(other) => wasmtime_wasi_http::Error::InternalError(Some(other.to_string())),
    }
}
