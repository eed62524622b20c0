//! The wasmtime side: engine configuration and the epoch ticker.

use crate::guest_world::WasiHttpVersion;
use crate::limits::{
    CORE_INSTANCES_PER_REQUEST, EPOCH_TICK, Limits, MEMORIES_PER_REQUEST, MEMORY_KEEP_RESIDENT,
    STACKS_PER_P3_REQUEST, TABLES_PER_REQUEST,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How the guest's compiled code is named for a profiler outside the
/// process, as `wasmtime serve --profile` does. Without one, `perf` shows
/// the guest as anonymous JIT addresses.
///
/// wasmtime's jitdump and VTune agents need its `profiling` feature, which
/// pulls in C code (ittapi) that the static musl image would also have to
/// build; a perf map needs nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestProfiler {
    /// `/tmp/perf-<pid>.map`, which `perf report` reads by itself.
    PerfMap,
}

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
/// concurrent requests; the guest's code named for `profiler`, if any.
pub(crate) fn engine(
    limits: &Limits,
    world: WasiHttpVersion,
    profiler: Option<GuestProfiler>,
) -> wasmtime::Result<Engine> {
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
        .table_keep_resident(64 << 10)
        // Off by default in wasmtime 48. With it, a slot's reset touches
        // only the pages its instance dirtied, not all the accessible
        // memory: a whole request on a fresh instance of the built-in guest
        // (`--instance-reuse 1`, then with 1 MiB of initial memory) took
        // 354-406 µs against 418-501 µs without (three alternating rounds).
        .pagemap_scan(wasmtime::Enabled::Auto);

    let mut config = Config::new();
    config
        .consume_fuel(limits.fuel.is_some())
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_init_cow(true);
    if let Some(profiler) = profiler {
        config.profiler(match profiler {
            GuestProfiler::PerfMap => wasmtime::ProfilingStrategy::PerfMap,
        });
    }
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
/// that epoch deadlines measure wall-clock time, while a guest runs: a
/// guest runs only under a [`Ticking`] guard ([`EpochTicker::running`]),
/// and with none the thread sleeps. Ticking with nothing to interrupt cost
/// an idle host 0.9 % of a core (200 wake-ups a second), in every replica.
/// The thread is stopped and joined when this value is dropped.
pub(crate) struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: Option<JoinHandle<()>>,
}

struct TickerShared {
    stop: AtomicBool,
    /// Guests running now (guards alive).
    running: AtomicUsize,
    /// Ticks so far, for tests.
    ticks: AtomicU64,
}

/// While alive, the epoch advances: hold one wherever wasm may run.
pub(crate) struct Ticking {
    shared: Arc<TickerShared>,
}

impl Drop for Ticking {
    fn drop(&mut self) {
        // The last one out: the thread parks after its next tick.
        self.shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EpochTicker {
    pub(crate) fn start(engine: Engine) -> std::io::Result<EpochTicker> {
        let shared = Arc::new(TickerShared {
            stop: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            ticks: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("fanout-epoch".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    while !shared.stop.load(Ordering::Acquire) {
                        if shared.running.load(Ordering::Acquire) == 0 {
                            // `running` unparks it; an unpark that comes
                            // between the load and the park is not lost
                            // (park returns at once on a pending one).
                            std::thread::park();
                            continue;
                        }
                        // park_timeout rather than sleep: drop unparks the
                        // thread so shutdown does not wait for a tick.
                        std::thread::park_timeout(EPOCH_TICK);
                        engine.increment_epoch();
                        shared.ticks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })?;
        Ok(EpochTicker {
            shared,
            thread: Some(thread),
        })
    }

    /// Keeps the epoch advancing until the guard is dropped.
    pub(crate) fn running(&self) -> Ticking {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(thread) = &self.thread
        {
            thread.thread().unpark();
        }
        Ticking {
            shared: self.shared.clone(),
        }
    }

    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Waits until `ticker` has ticked more than `n` times (5 s at most).
    fn ticks_past(ticker: &EpochTicker, n: u64) -> u64 {
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            let ticks = ticker.ticks();
            if ticks > n {
                return ticks;
            }
            assert!(Instant::now() < give_up, "stuck at {ticks} ticks");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The absence of ticks can only be seen by waiting: four ticks' time.
    fn wait_a_few_ticks() {
        std::thread::sleep(EPOCH_TICK * 4);
    }

    #[test]
    fn the_epoch_advances_only_while_a_guest_runs() {
        let ticker = EpochTicker::start(Engine::default()).unwrap();
        wait_a_few_ticks();
        assert_eq!(ticker.ticks(), 0, "idle: no tick");

        let first = ticker.running();
        let second = ticker.running();
        let ticked = ticks_past(&ticker, 1);
        drop(first);
        // One guard is left: it still ticks.
        ticks_past(&ticker, ticked);
        drop(second);
        // The tick under way when the last guard went may still land.
        let stopped = ticker.ticks() + 1;
        wait_a_few_ticks();
        let settled = ticker.ticks();
        assert!(
            settled <= stopped,
            "{settled} ticks after stopping at {stopped}"
        );
        wait_a_few_ticks();
        assert_eq!(ticker.ticks(), settled, "parked");

        let _again = ticker.running();
        ticks_past(&ticker, settled);
    }
}
