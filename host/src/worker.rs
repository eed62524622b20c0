//! Workers: a store and the guest instance in it, serving requests one
//! after another ([`Limits::instance_reuse`] of them), and the idle ones
//! kept between two requests.
//!
//! What belongs to one request is set anew when it starts
//! ([`Worker::begin`]): its outgoing hooks (attempt log, span), its fuel
//! allowance, its epoch deadline, the memory-refused flag. What belongs to
//! the instance stays: its environment (the guest's configuration), its
//! memory (under the same cap), its pool slot. A worker goes back to the
//! idle ones only when its request ended cleanly and left nothing of the
//! answer or the request in its resource table ([`Worker::reusable`]); any
//! failure (trap, fuel, deadline, memory, a dropped request) retires it.

use crate::guest_output::GuestOutput;
use crate::guest_world::GuestInstance;
use crate::limits::{Limits, MAX_IDLE_RESOURCES, WARM_IDLE};
use crate::outbound::RequestHooks;
use crate::store::RequestState;
use prometheus_client::metrics::gauge::Gauge;
use std::any::Any;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi_http::p2::body::{HostIncomingBody, HostOutgoingBody};
use wasmtime_wasi_http::p2::types::{
    HostIncomingRequest, HostOutgoingResponse, HostResponseOutparam,
};

/// A store, its instance once made, and the pool slot it holds.
pub(crate) struct Worker {
    pub(crate) store: Store<RequestState>,
    /// `None` until the first request instantiates the guest.
    pub(crate) proxy: Option<GuestInstance>,
    pub(crate) stdout: GuestOutput,
    pub(crate) stderr: GuestOutput,
    /// Requests begun in this worker, the current one included.
    served: u32,
    // Freed with the store: the pooling allocator's slot is the store's.
    _slot: OwnedSemaphorePermit,
}

impl Worker {
    pub(crate) fn new(
        store: Store<RequestState>,
        (stdout, stderr): (GuestOutput, GuestOutput),
        slot: OwnedSemaphorePermit,
    ) -> Worker {
        Worker {
            store,
            proxy: None,
            stdout,
            stderr,
            served: 0,
            _slot: slot,
        }
    }

    /// Readies the worker for one request: its hooks, and the per-request
    /// limits counted afresh (fuel topped up to the allowance, the epoch
    /// deadline from now).
    pub(crate) fn begin(&mut self, hooks: RequestHooks, limits: &Limits) -> wasmtime::Result<()> {
        self.served += 1;
        let state = self.store.data_mut();
        state.hooks = hooks;
        state.limiter.memory_denied = false;
        if let Some(fuel) = limits.fuel {
            self.store.set_fuel(fuel)?;
        }
        self.store.set_epoch_deadline(limits.epoch_ticks());
        Ok(())
    }

    /// Whether the worker may serve another request, its last having ended
    /// without failure: it has requests left, its table holds nothing it
    /// must not keep (see [`leftovers_allow_reuse`]), and its memory is
    /// under half the cap, so that a guest that grows a little with every
    /// request is retired before a request finds the cap.
    pub(crate) fn reusable(&mut self, limits: &Limits) -> bool {
        let state = self.store.data_mut();
        self.served < limits.instance_reuse
            && self.proxy.is_some()
            && !state.limiter.memory_denied
            && state.limiter.memory_bytes <= limits.memory_bytes / 2
            && leftovers_allow_reuse(&mut state.table)
    }
}

/// Whether what a request left in the table lets its worker serve another.
/// Never a part of the answer or the request (a body the guest did not
/// finish would stay open while the worker lives, and the request is the
/// last one's data); other leftovers up to [`MAX_IDLE_RESOURCES`]. (The
/// `request-options` wasmtime-wasi-http 48 leaves, one per upstream call,
/// the host deletes itself: see `outgoing_handler.rs`.)
fn leftovers_allow_reuse(table: &mut ResourceTable) -> bool {
    let mut kept = 0;
    for entry in table.iter_mut() {
        let entry: &dyn Any = entry;
        if entry.is::<HostOutgoingBody>()
            || entry.is::<HostOutgoingResponse>()
            || entry.is::<HostResponseOutparam>()
            || entry.is::<HostIncomingRequest>()
            || entry.is::<HostIncomingBody>()
            || entry.is::<wasmtime_wasi_http::p3::Request>()
            || entry.is::<wasmtime_wasi_http::p3::Response>()
        {
            return false;
        }
        kept += 1;
        if kept > MAX_IDLE_RESOURCES {
            return false;
        }
    }
    true
}

/// Idle workers, the most recently used first: its memory is the likeliest
/// to be in cache. Those idle longer than [`WARM_IDLE`] are retired.
pub(crate) struct IdleWorkers {
    idle: Mutex<VecDeque<(Worker, Instant)>>,
    gauge: Gauge,
}

impl IdleWorkers {
    pub(crate) fn new(gauge: Gauge) -> IdleWorkers {
        IdleWorkers {
            idle: Mutex::default(),
            gauge,
        }
    }

    /// The most recently used idle worker, if any.
    pub(crate) fn take(&self) -> Option<Worker> {
        let now = Instant::now();
        let (worker, stale) = {
            let mut idle = self.lock();
            let stale = expire(&mut idle, now);
            let worker = idle.pop_back().map(|(worker, _)| worker);
            self.gauge.set(idle.len() as i64);
            (worker, stale)
        };
        // Dropping a store resets its pool slot: not under the lock.
        drop(stale);
        worker
    }

    /// Keeps `worker` for a later request.
    pub(crate) fn give_back(&self, worker: Worker) {
        let now = Instant::now();
        let stale = {
            let mut idle = self.lock();
            idle.push_back((worker, now));
            let stale = expire(&mut idle, now);
            self.gauge.set(idle.len() as i64);
            stale
        };
        drop(stale);
    }

    /// Idle workers now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Worker, Instant)>> {
        // A panic under this lock leaves a valid list.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Takes out the workers idle for longer than [`WARM_IDLE`] (the oldest
/// are at the front), for the caller to drop outside the lock.
fn expire(idle: &mut VecDeque<(Worker, Instant)>, now: Instant) -> Vec<Worker> {
    let mut stale = Vec::new();
    while let Some((_, since)) = idle.front() {
        if now.duration_since(*since) <= WARM_IDLE {
            break;
        }
        stale.extend(idle.pop_front().map(|(worker, _)| worker));
    }
    stale
}
