//! A watchdog for tests whose failure mode is a thread that never returns.
//!
//! A guest that spins with no epoch deadline blocks the thread running it
//! for good, and with it the test's runtime: a `tokio::time::timeout` on
//! that runtime never fires, and the test hangs instead of failing. The
//! watchdog runs on a thread of its own and ends the test process with a
//! message when its time is up; dropped in time, it does nothing. The
//! process, not the test, because a thread stuck in guest code cannot be
//! stopped any other way (and the runtime's shutdown would wait on it).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Ends the test process unless dropped within its limit.
#[must_use = "the watchdog is called off when dropped"]
pub struct Watchdog {
    called_off: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A watchdog for `what`: if it is still alive after `limit`, the process
/// prints `what` and exits with code 101, as a failed test binary does.
pub fn watchdog(what: &'static str, limit: Duration) -> Watchdog {
    let (called_off, wait) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            eprintln!("watchdog: {what} still running after {limit:?}: ending the test process");
            std::process::exit(101);
        }
    });
    Watchdog {
        called_off: Some(called_off),
        thread: Some(thread),
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Hanging up wakes the thread, which leaves; joining it means that
        // once the drop returns, the watchdog can no longer fire.
        drop(self.called_off.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Set in the child process that [`a_watchdog_left_running_ends_the_process`] starts.
    const CHILD: &str = "FANOUT_WATCHDOG_CHILD";

    #[test]
    fn a_watchdog_called_off_in_time_never_fires() {
        let dog = watchdog("nothing", Duration::from_secs(60));
        // Returns only once the watchdog's thread has left.
        drop(dog);
    }

    #[test]
    fn a_watchdog_left_running_ends_the_process() {
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "--ignored", "--nocapture"])
            .arg("watchdog::tests::a_test_that_never_returns")
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(101), "{stderr}");
        assert!(
            stderr.contains("watchdog: a stuck thread still running after 20ms"),
            "{stderr}"
        );
    }

    /// Run only as the child of the test above.
    #[test]
    #[ignore = "run by a_watchdog_left_running_ends_the_process"]
    fn a_test_that_never_returns() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let _dog = watchdog("a stuck thread", Duration::from_millis(20));
        loop {
            std::thread::park();
        }
    }
}
