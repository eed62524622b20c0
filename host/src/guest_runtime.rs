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
    pub(crate) fn new(workers: usize) -> Result<GuestRuntime, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("fanout-guest")
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
