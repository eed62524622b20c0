//! The one JSON error shape for the request heads hyper refuses itself.
//!
//! hyper answers a head it cannot take (400 malformed, 414 URI too long,
//! 431 too large) before any handler runs, with an empty body, and closes
//! the connection. hyper 1 has no hook for those answers, so the
//! connection's I/O is wrapped ([`JsonRefusals`]): a head that hyper
//! writes while no handler's answer is on its way out can only be one of
//! them, and goes out with the JSON body every other error has (DESIGN
//! §6).
//!
//! Whether a handler's answer is on its way out is the connection's
//! [`Turn`]: `Answering` from the handler's call until hyper drops the
//! answer's body ([`Answered`]), then `Draining` until the next flush has
//! sent what hyper still held of it, then `Idle`. hyper reads the next
//! head only once the last answer is flushed, so a head refused after an
//! answer finds the turn `Idle`. Should one find it `Draining` (the last
//! flush came before the body was dropped), it goes out as hyper wrote
//! it: anything not recognised is passed on unchanged, never rewritten.
//!
//! An HTTP/2 client (an h2c proxy with prior knowledge) hyper does not
//! answer at all; it gets HTTP/2's GOAWAY with `HTTP_1_1_REQUIRED`.
//!
//! The turn also tells a connection closed by the header timeout with a
//! head unfinished (a slow client) from one idle after its answers, which
//! hyper closes the same way ([`Turn::head_unfinished`]).

use crate::limits::ConnectionLimits;
use crate::response::error_json;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const IDLE: u8 = 0;
const ANSWERING: u8 = 1;
const DRAINING: u8 = 2;

/// A head hyper writes is this long at most; past it, what was held goes
/// out unchanged.
const MAX_REFUSAL_HEAD: usize = 512;

/// How an HTTP/2 client's connection preface begins. No HTTP/1.1 request
/// does: HTTP/2 chose the `PRI` method for that (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Why an HTTP/2 client is turned away: its GOAWAY's debug data.
const H2_REFUSAL: &[u8] = b"this port speaks HTTP/1.1";

/// What an HTTP/2 client gets instead of silence (hyper closes at once):
/// the server's preface (an empty SETTINGS frame), then GOAWAY with
/// `HTTP_1_1_REQUIRED` and [`H2_REFUSAL`], which an h2c proxy's log shows.
fn h2_goaway() -> Bytes {
    let mut frames = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0]; // SETTINGS, empty, stream 0
    let length = (8 + H2_REFUSAL.len()) as u32;
    frames.extend_from_slice(&length.to_be_bytes()[1..]);
    frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]); // GOAWAY, stream 0
    frames.extend_from_slice(&0u32.to_be_bytes()); // last stream: none
    frames.extend_from_slice(&0xdu32.to_be_bytes()); // HTTP_1_1_REQUIRED
    frames.extend_from_slice(H2_REFUSAL);
    frames.into()
}

/// Whether a handler's answer is on its way out on one connection, and
/// whether a head is waited for.
#[derive(Debug)]
pub(crate) struct Turn {
    state: AtomicU8,
    /// A head is due and unfinished: none came yet on the connection, or
    /// bytes came while idle and no handler has been called since.
    head_pending: AtomicBool,
}

impl Default for Turn {
    fn default() -> Turn {
        Turn {
            state: AtomicU8::new(IDLE),
            head_pending: AtomicBool::new(true),
        }
    }
}

impl Turn {
    /// A handler was called: its answer comes next.
    pub(crate) fn answering(&self) {
        self.state.store(ANSWERING, Ordering::Relaxed);
        self.head_pending.store(false, Ordering::Relaxed);
    }

    /// Whether a connection closed for the header timeout left a head
    /// unfinished: one begun, or none ever sent. Not a keep-alive
    /// connection idle after its answers (nor, uncounted, a pipelined
    /// head read while an answer was still going out).
    pub(crate) fn head_unfinished(&self) -> bool {
        self.head_pending.load(Ordering::Relaxed)
    }

    fn is(&self, state: u8) -> bool {
        self.state.load(Ordering::Relaxed) == state
    }
}

/// A handler's answer body, which marks the end of its turn when hyper
/// drops it (read to its end, or given up).
pub(crate) struct Answered<B> {
    body: B,
    turn: Arc<Turn>,
}

impl<B> Answered<B> {
    pub(crate) fn new(body: B, turn: Arc<Turn>) -> Answered<B> {
        Answered { body, turn }
    }
}

impl<B> Drop for Answered<B> {
    fn drop(&mut self) {
        // Only from `Answering`: a later handler's turn is not ended by an
        // earlier body.
        let _ = self.turn.state.compare_exchange(
            ANSWERING,
            DRAINING,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl<B: Body + Unpin> Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's I/O, which gives hyper's own refusals the JSON body.
pub(crate) struct JsonRefusals<T> {
    io: T,
    turn: Arc<Turn>,
    limits: ConnectionLimits,
    /// What hyper wrote while idle, until its head is whole.
    held: Vec<u8>,
    /// What goes out before anything else (what is left of it).
    out: Bytes,
    /// A refusal was seen (rewritten or not): hyper closes after it, and
    /// nothing more is looked at.
    done: bool,
    /// Whether anything was read yet: only the first read may be an
    /// HTTP/2 preface.
    read_any: bool,
}

impl<T> JsonRefusals<T> {
    pub(crate) fn new(io: T, turn: Arc<Turn>, limits: ConnectionLimits) -> JsonRefusals<T> {
        JsonRefusals {
            io,
            turn,
            limits,
            held: Vec::new(),
            out: Bytes::new(),
            done: false,
            read_any: false,
        }
    }

    /// Whether hyper's next write may be a refusal.
    fn watching(&self) -> bool {
        !self.done && (!self.held.is_empty() || self.turn.is(IDLE))
    }

    /// Takes `bytes` of a refusal hyper writes; once its head is whole,
    /// readies what goes out instead.
    fn hold(&mut self, bytes: &[u8]) {
        self.held.extend_from_slice(bytes);
        let whole = self.held.windows(4).any(|w| w == b"\r\n\r\n");
        if whole || self.held.len() > MAX_REFUSAL_HEAD {
            let held = std::mem::take(&mut self.held);
            self.out = match whole.then(|| with_json_body(&held, &self.limits)) {
                Some(Some(rewritten)) => rewritten.into(),
                _ => held.into(),
            };
            self.done = true;
        }
    }

    /// Moves what was held to what goes out unchanged (a flush or a
    /// shutdown before the head was whole).
    fn release_held(&mut self) {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            self.out = held.into();
            self.done = true;
        }
    }
}

impl<T: AsyncWrite + Unpin> JsonRefusals<T> {
    /// Sends what must go out first.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let _ = self.out.split_to(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// hyper's refusal head `head` with the JSON error body, or `None` when it
/// is not one hyper writes (then it goes out as it is).
fn with_json_body(head: &[u8], limits: &ConnectionLimits) -> Option<Vec<u8>> {
    // A head and nothing after it, as hyper writes a refusal.
    if !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let status = head.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let (code, message) = match status {
        b"400" => (
            "malformed_request",
            "the request head is not valid HTTP/1.1".to_string(),
        ),
        b"414" => (
            "uri_too_long",
            "the request URI is longer than 65,534 bytes".to_string(),
        ),
        b"431" => (
            "request_head_too_large",
            format!(
                "the request head has more than {} header fields or {} KiB",
                limits.max_headers,
                limits.max_header_bytes >> 10
            ),
        ),
        _ => return None,
    };
    const EMPTY: &[u8] = b"content-length: 0\r\n";
    let at = head.windows(EMPTY.len()).position(|w| w == EMPTY)?;
    let body = error_json(code, &message);
    let mut rewritten = Vec::with_capacity(head.len() + body.len() + 48);
    rewritten.extend_from_slice(&head[..at]);
    rewritten.extend_from_slice(b"content-type: application/json\r\n");
    rewritten.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    rewritten.extend_from_slice(&head[at + EMPTY.len()..]);
    rewritten.extend_from_slice(body.as_bytes());
    Some(rewritten)
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for JsonRefusals<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let from = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let read = &buf.filled()[from..];
        if read.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if self.turn.is(IDLE) {
            self.turn.head_pending.store(true, Ordering::Relaxed);
        }
        if !self.read_any {
            self.read_any = true;
            if read.starts_with(H2_PREFACE) {
                // hyper refuses it and drops the connection without a
                // write: the GOAWAY goes now, into a socket that has sent
                // nothing yet, or not at all.
                self.out = h2_goaway();
                self.done = true;
                let _ = self.poll_out(cx);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonRefusals<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_out(cx))?;
        if self.watching() {
            self.hold(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_out(cx))?;
        if self.watching() {
            let bytes = bufs
                .iter()
                .flat_map(|buf| buf.iter().copied())
                .collect::<Vec<u8>>();
            self.hold(&bytes);
            return Poll::Ready(Ok(bytes.len()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.release_held();
        ready!(self.poll_out(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        // What hyper held of the last answer is out: the next head it
        // writes unasked is a refusal.
        let _ =
            self.turn
                .state
                .compare_exchange(DRAINING, IDLE, Ordering::Relaxed, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.release_held();
        ready!(self.poll_out(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
