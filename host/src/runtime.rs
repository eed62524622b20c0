//! The wasmtime side: engine configuration and the epoch ticker.

use crate::guest_world::WasiHttpVersion;
use crate::limits::{
    CORE_INSTANCES_PER_REQUEST, EPOCH_TICK, Limits, MEMORIES_PER_REQUEST, MEMORY_KEEP_RESIDENT,
    STACKS_PER_P3_REQUEST, TABLES_PER_REQUEST,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Fuel between two yields to the async executor. A guest that computes for a
/// long time still lets other requests on the same worker thread make
/// progress, and lets the wall-clock timeout observe it.
///
/// A yield sends the guest to the back of its worker's run queue, so this is
/// also the time slice a new request (one to admit, or to shed with a 503)
/// waits behind at each guest ahead of it. At c=500 the shed 503s' p99 was
/// 15-16 ms with 100k (close to half of a product request's fuel), and
/// 6-6.5 ms with 20k, with saturation rps unchanged (3 alternating rounds).
/// 10k gained nothing more beyond noise.
const FUEL_YIELD_INTERVAL: u64 = 20_000;

/// Builds the engine: epoch interruption on, fuel metering when the limits
/// ask for fuel, instances from a pool sized for `limits.max_instances`
/// concurrent requests.
pub(crate) fn engine(limits: &Limits, world: WasiHttpVersion) -> wasmtime::Result<Engine> {
    let n = limits.max_instances;
    let stacks = match world {
        WasiHttpVersion::P2 => n,
        WasiHttpVersion::P3 => n * STACKS_PER_P3_REQUEST,
    };
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n * CORE_INSTANCES_PER_REQUEST)
        .total_memories(n * MEMORIES_PER_REQUEST)
        .total_tables(n * TABLES_PER_REQUEST)
        .total_stacks(stacks)
        .max_memory_size(limits.memory_bytes)
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
        .table_keep_resident(64 << 10);

    let mut config = Config::new();
    config
        .consume_fuel(limits.fuel.is_some())
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_init_cow(true);
    match world {
        WasiHttpVersion::P3 => config.wasm_component_model_async(true),
        // Off for a 0.2 guest, which does not use it: with it on, every
        // call from the guest to the host creates and deletes a host task
        // and scope (~2 % of a request's CPU at saturation, `perf`).
        WasiHttpVersion::P2 => config.concurrency_support(false),
    };
    Engine::new(&config)
}

pub(crate) fn fuel_yield_interval() -> Option<u64> {
    Some(FUEL_YIELD_INTERVAL)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on its own thread, so
/// that epoch deadlines measure wall-clock time. The thread is stopped and
/// joined when this value is dropped.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: Engine) -> std::io::Result<EpochTicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("fanout-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Acquire) {
                        // park_timeout rather than sleep: drop unparks the thread
                        // so shutdown does not wait for a tick.
                        std::thread::park_timeout(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                }
            })?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}
