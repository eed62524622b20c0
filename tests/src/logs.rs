//! Log capture per test thread, as JSON lines.

use std::sync::{Arc, Mutex};

/// Captures the log events of the calling thread as JSON lines, from now
/// until the thread ends. `#[tokio::test]` runs all the tasks of a test on
/// the test's own thread, so this sees that test's host events only.
///
/// One global subscriber routes events to per-thread buffers. (A per-thread
/// `set_default` subscriber misses events whose callsite interest another
/// test thread cached first.)
pub fn capture_logs() -> Logs {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| ThreadLogs(CAPTURE.with(|c| c.borrow().clone())))
            .try_init();
    });
    let logs = Logs::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(logs.clone()));
    logs
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// Log lines captured by [`capture_logs`].
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Every captured event, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|line| serde_json::from_str(line).expect("log lines are JSON"))
            .collect()
    }
}

/// The writer for one event: the calling thread's buffer, if it captures.
struct ThreadLogs(Option<Logs>);

impl std::io::Write for ThreadLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(logs) = &self.0 {
            logs.0.lock().unwrap().extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
