//! A guest's stdout or stderr: kept in memory and handed to the log after
//! each request. Unlike wasmtime-wasi's `MemoryOutputPipe`, whose contents
//! can only be copied, it is emptied when read ([`GuestOutput::take`]), so
//! a reused instance's output is its last request's, and the bound holds
//! per request rather than over the instance's life.

use bytes::{Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// One output stream of a store: clones write to the same buffer.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    capacity: usize,
    buffer: Arc<Mutex<BytesMut>>,
}

impl GuestOutput {
    /// A stream that holds at most `capacity` bytes between two
    /// [`take`](GuestOutput::take)s; a write beyond fails in the guest.
    pub(crate) fn new(capacity: usize) -> GuestOutput {
        GuestOutput {
            capacity,
            buffer: Arc::default(),
        }
    }

    /// What was written since the last call, leaving the stream empty.
    pub(crate) fn take(&self) -> Bytes {
        self.lock().split().freeze()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        // The lock is never held across a panic that matters: the buffer
        // is valid whatever a panicking writer left.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    // Always ready: a full buffer fails the write rather than waiting.
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut buffer = self.lock();
        if bytes.len() > self.capacity - buffer.len() {
            return Err(StreamError::Trap(wasmtime::format_err!(
                "the guest wrote more than {} bytes of output in one request",
                self.capacity
            )));
        }
        buffer.extend_from_slice(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let used = self.lock().len();
        match self.capacity - used {
            0 => Err(StreamError::Closed),
            room => Ok(room),
        }
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut buffer = self.lock();
        let n = bytes.len().min(self.capacity - buffer.len());
        buffer.extend_from_slice(&bytes[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_empties_the_stream_and_the_bound_is_per_take() {
        let output = GuestOutput::new(8);
        let mut stream = output.p2_stream();
        stream.write(Bytes::from_static(b"12345678")).unwrap();
        assert!(matches!(stream.check_write(), Err(StreamError::Closed)));
        assert!(stream.write(Bytes::from_static(b"9")).is_err());
        assert_eq!(output.take(), Bytes::from_static(b"12345678"));
        assert_eq!(stream.check_write().unwrap(), 8);
        stream.write(Bytes::from_static(b"next")).unwrap();
        assert_eq!(output.take(), Bytes::from_static(b"next"));
        assert!(output.take().is_empty());
    }
}
