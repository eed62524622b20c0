//! Log lines to stdout from a thread of their own, so that a stalled
//! reader of stdout never stalls a request.
//!
//! A container's stdout is a pipe, read by its runtime or a log shipper.
//! Written in place (tracing-subscriber's default writer), each line is a
//! `write` on the thread that answers requests, and once the reader falls
//! behind by the pipe's 64 KiB the write blocks: the access line of the
//! next request stops its thread, then every thread, and the host answers
//! nothing until the reader catches up. Here the line goes into a bounded
//! queue ([`DEFAULT_BUFFERED_LINES`]) that a thread named `fanout-log`
//! writes out, a batch of whole lines at a time; a line that finds the
//! queue full is dropped and counted (`fanout_log_lines_dropped_total` on
//! `/metrics`), as a request must not wait for its log line.
//!
//! tracing-appender's non-blocking writer does the queueing; this module
//! adds the batching and the count on `/metrics`.
//!
//! ```no_run
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! let (writer, _flush_at_exit) = fanout_host::stdout_log::writer(
//!     fanout_host::stdout_log::DEFAULT_BUFFERED_LINES,
//! );
//! tracing_subscriber::fmt().json().with_writer(writer).finish().init();
//! // ... serve; dropping the guard writes out the lines still queued.
//! ```

use std::io::{self, Write};
use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder};

// Re-exported: an embedder holds them without naming tracing-appender.
pub use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

/// Lines queued for stdout at most, by default: about 3 MiB of access
/// lines, a second or two of them at saturation on two cores. (The
/// crate's own default, 128,000 lines, is some 50 MiB when the reader
/// stalls.)
pub const DEFAULT_BUFFERED_LINES: usize = 8_192;

/// Bytes of whole lines gathered before they are written even though more
/// are queued.
const BATCH_BYTES: usize = 64 << 10;

/// The process's stdout log, once made: its count of dropped lines.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// A writer for a `tracing-subscriber` fmt layer that queues up to
/// `buffered_lines` lines (at least one) for stdout, and the guard that
/// writes out what is still queued when dropped (for a second at most:
/// hold it until the end of `main`). The first one made in a process is
/// the one `/metrics` counts the dropped lines of.
pub fn writer(buffered_lines: usize) -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(buffered_lines.max(1))
        .thread_name("fanout-log")
        .finish(LineBatches::new(io::stdout()));
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Lines dropped so far because the queue was full; `None` without a
/// stdout log made by [`writer`].
pub fn dropped_lines() -> Option<usize> {
    DROPPED.get().map(ErrorCounter::dropped_lines)
}

/// Gathers the lines it is given and writes them on `flush`, which the
/// queue's thread calls whenever the queue runs empty: one `write` for
/// many lines under load, at once when there is one. Each line comes
/// whole in one `write` call (the fmt layer formats it first), so what
/// reaches `out` always ends at a line's end, and nothing else printed to
/// stdout lands in the middle of one.
struct LineBatches<W: Write> {
    out: W,
    batch: Vec<u8>,
}

impl<W: Write> LineBatches<W> {
    fn new(out: W) -> LineBatches<W> {
        LineBatches {
            out,
            batch: Vec::with_capacity(BATCH_BYTES),
        }
    }
}

impl<W: Write> Write for LineBatches<W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.batch.extend_from_slice(line);
        if self.batch.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let written = self
            .out
            .write_all(&self.batch)
            .and_then(|()| self.out.flush());
        // Cleared even when the write failed: the batch must not grow
        // without bound while stdout is closed.
        self.batch.clear();
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each `write` it gets, as a pipe's reader would see them.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_wait_for_the_flush_and_go_out_in_one_write() {
        let mut batches = LineBatches::new(Writes::default());
        batches.write_all(b"{\"a\":1}\n").unwrap();
        batches.write_all(b"{\"b\":2}\n").unwrap();
        assert!(batches.out.0.is_empty(), "nothing before the flush");
        batches.flush().unwrap();
        assert_eq!(batches.out.0, vec![b"{\"a\":1}\n{\"b\":2}\n".to_vec()]);
        batches.flush().unwrap();
        assert_eq!(batches.out.0.len(), 1, "an empty flush writes nothing");
    }

    #[test]
    fn a_full_batch_is_written_without_waiting_for_the_flush() {
        let mut batches = LineBatches::new(Writes::default());
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        for _ in 0..BATCH_BYTES / line.len() {
            batches.write_all(&line).unwrap();
        }
        assert_eq!(batches.out.0.len(), 1, "written once full");
        let written = &batches.out.0[0];
        assert_eq!(written.len(), BATCH_BYTES);
        assert!(written.ends_with(b"\n"), "whole lines only");
        assert!(batches.batch.is_empty());
        // The next line waits for the flush again.
        batches.write_all(&line).unwrap();
        assert_eq!(batches.out.0.len(), 1);
    }

    /// A reader that has gone away: every write fails.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_drops_its_batch_rather_than_growing_it() {
        let mut batches = LineBatches::new(Closed);
        for _ in 0..3 {
            batches.write_all(b"line\n").unwrap();
            let failed = batches.flush().unwrap_err();
            assert_eq!(failed.kind(), io::ErrorKind::BrokenPipe);
            assert!(batches.batch.is_empty());
        }
    }
}
