//! The guests' own tokio runtime, when
//! `FanoutBuilder::guest_threads` asks for one.

use crate::error::Error;

/// A tokio runtime of its own for the guests
/// ([`FanoutBuilder::guest_threads`]).
///
/// Under overload the CPU is full of guest work; on their own threads the
/// connections get the CPU from the kernel's scheduler instead of waiting
/// behind it (see [`threads`](crate::threads)). Dropped without waiting:
/// the guests still running are cut off with it.
pub(crate) struct GuestRuntime(Option<tokio::runtime::Runtime>);

impl GuestRuntime {
    /// `workers` threads, each `nice` steps below the priority of the
    /// thread that starts it (see [`FanoutBuilder::guest_nice`]).
    pub(crate) fn new(workers: usize, nice: u8) -> Result<GuestRuntime, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("fanout-guest")
            .on_thread_start(move || lower_this_thread(nice))
            .enable_all()
            .build()?;
        Ok(GuestRuntime(Some(runtime)))
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Raises the calling thread's nice value by `steps` (at most to 19, the
/// lowest priority). Raising it needs no privilege. A thread starts with
/// the nice of the thread that made it, so the guests sit `steps` below
/// whatever the operator started the process at.
#[cfg(target_os = "linux")]
fn lower_this_thread(steps: u8) {
    if steps == 0 {
        return;
    }
    // SAFETY: plain syscalls on this thread's own id. On Linux, unlike
    // POSIX, PRIO_PROCESS with a thread id sets that thread alone.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        // getpriority may rightly return -1: errno tells an error apart.
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now == -1 && *libc::__errno_location() != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read a guest thread's priority");
            return;
        }
        let nice = (now + i32::from(steps)).min(19);
        if libc::setpriority(libc::PRIO_PROCESS, tid, nice) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), nice, "cannot lower a guest thread's priority");
        }
    }
}

/// Elsewhere `setpriority` on a thread id is not per thread (it would
/// lower the whole process), so the guests keep the process's priority.
#[cfg(not(target_os = "linux"))]
fn lower_this_thread(_steps: u8) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        // SAFETY: as above.
        unsafe {
            libc::getpriority(
                libc::PRIO_PROCESS,
                libc::syscall(libc::SYS_gettid) as libc::id_t,
            )
        }
    }

    #[test]
    fn guest_threads_run_below_the_thread_that_started_them() {
        let ours = nice_of_this_thread();
        for (steps, expected) in [(0, ours), (10, (ours + 10).min(19)), (30, 19)] {
            let runtime = GuestRuntime::new(1, steps).unwrap();
            let theirs = runtime
                .handle()
                .block_on(async { tokio::spawn(async { nice_of_this_thread() }).await })
                .unwrap();
            assert_eq!(theirs, expected, "{steps} steps down from nice {ours}");
        }
        assert_eq!(
            nice_of_this_thread(),
            ours,
            "the caller's own thread is left as it was"
        );
    }
}
