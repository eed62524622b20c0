//! Counters since start-up, read through `Fanout::stats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters since start-up.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) fuel_consumed: AtomicU64,
    instantiations: AtomicU64,
    instantiate_nanos: AtomicU64,
    pub(crate) memory_growths: AtomicU64,
}

/// A snapshot of [`Fanout::stats`](crate::Fanout::stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests that got an instance.
    pub requests: u64,
    /// Requests answered by the host instead of the guest (traps, limits).
    pub failures: u64,
    /// Fuel consumed by all finished requests.
    pub fuel_consumed: u64,
    /// Instantiations.
    pub instantiations: u64,
    /// The time the instantiations took in total.
    pub instantiate_time: Duration,
    /// Times a guest grew a linear memory past the size it was
    /// instantiated with. Each growth is an `mprotect` in the instance
    /// pool, and the next instance in that slot shrinks it back with
    /// another: a guest whose initial memory holds its requests grows none
    /// (`build-support/guest_memory.rs`).
    pub memory_growths: u64,
    /// Instances running right now.
    pub instances_in_use: u32,
    /// The adaptive admission limit now (`None` with fixed admission).
    pub admission_limit: Option<usize>,
}

impl Stats {
    pub(crate) fn record_instantiation(&self, took: Duration) {
        self.instantiations.fetch_add(1, Ordering::Relaxed);
        self.instantiate_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A snapshot of the counters; the gauges are the caller's to fill in.
    pub(crate) fn snapshot(
        &self,
        instances_in_use: u32,
        admission_limit: Option<usize>,
    ) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            fuel_consumed: self.fuel_consumed.load(Ordering::Relaxed),
            instantiations: self.instantiations.load(Ordering::Relaxed),
            instantiate_time: Duration::from_nanos(self.instantiate_nanos.load(Ordering::Relaxed)),
            memory_growths: self.memory_growths.load(Ordering::Relaxed),
            instances_in_use,
            admission_limit,
        }
    }
}
