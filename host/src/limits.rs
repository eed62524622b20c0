//! Resource limits: what one request may consume, and how many may run.
//!
//! The defaults are named constants so that they can be read, measured and
//! argued about in one place.

use std::time::Duration;

/// Fuel for one request. A product fan-out (wstd's runtime + serde_json)
/// burns about 155k units on a reused instance, 210k on a fresh one, which
/// reads its configuration first (the guest built at opt-level 3; checked
/// by the `fuel_per_request_leaves_headroom` test), each upstream call
/// about 36k more. The largest requests the guest allows fit, with room: a
/// batch of 100 products (300 calls) burns 12.8M units, 18M when reviews
/// fails every attempt (`the_largest_batch_*` tests); an item that makes
/// the most calls a route may (1,000: an order and 999 lines, each called)
/// 36M, and the same 999 lines priced in batches of 100 18.6M
/// (`the_largest_list_and_batch_fit_the_default_fuel`). A runaway loop
/// still burns it in a few tens of milliseconds of CPU.
pub const DEFAULT_FUEL: u64 = 60_000_000;

/// Linear memory one instance may grow to. The guest needs about 1.2 MiB.
pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;

/// Wall-clock limit for one request, instantiation to the last body byte.
/// It sits above the guest's largest budget (200 ms by default, up to 1 s
/// when a client asks for more) so that the guest can answer its own 504
/// with a useful body; the host limit is the backstop.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// Instances that may run at once when the memory cannot be read; also the
/// size of the instance pool. See [`default_max_instances`].
pub const DEFAULT_MAX_INSTANCES: u32 = 256;

/// The most instances [`default_max_instances`] gives. Each pool slot
/// reserves address space for its memories (about 8.5 GB of it per
/// instance: 2,048 reserve 17 TB of the 128 TB a process has), so a few
/// hosts in one process still fit.
pub const MAX_DEFAULT_INSTANCES: u32 = 2048;

/// Memory counted per instance when the pool is sized from memory: an
/// instance in flight costs 150–390 KiB of RSS (BENCHMARKS.md "Micro", by run),
/// rounded up for guests that grow their heap.
pub const MEMORY_PER_INSTANCE: u64 = 1 << 20;

/// The pool's size by default: a quarter of the memory this process may
/// use (its cgroup's limit, as in a Kubernetes pod, or the machine's
/// memory) at [`MEMORY_PER_INSTANCE`] each, between
/// [`DEFAULT_MAX_INSTANCES`] and [`MAX_DEFAULT_INSTANCES`]. A pool is
/// cheap: a slot costs address space, not memory, until a request runs in
/// it; and with adaptive admission the pool is a ceiling, not a target.
/// 256 fixed slots were too few for a 500-client closed loop to be
/// admitted, by a fixed limit or by a line.
pub fn default_max_instances() -> u32 {
    memory_available().map_or(DEFAULT_MAX_INSTANCES, max_instances_for)
}

/// The pool [`default_max_instances`] gives for `memory` bytes.
pub fn max_instances_for(memory: u64) -> u32 {
    let n = memory / 4 / MEMORY_PER_INSTANCE;
    n.clamp(DEFAULT_MAX_INSTANCES.into(), MAX_DEFAULT_INSTANCES.into()) as u32
}

/// The memory this process may use: its cgroup's limit (v2, then v1) if it
/// has one, else the machine's. Read by hand: it is three small files, and
/// crates that read them (sysinfo) bring far more than this needs.
fn memory_available() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        // "max" (v2) or a huge number (v1) mean no limit.
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|limit| *limit < 1 << 60);
    let machine = read("/proc/meminfo").and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    match (cgroup, machine) {
        (Some(cgroup), Some(machine)) => Some(cgroup.min(machine)),
        (cgroup, machine) => cgroup.or(machine),
    }
}

/// Requests one instance serves, one after another, before it is retired,
/// by default. An instance is retired sooner when it traps, runs out of
/// fuel, passes a deadline, is refused memory, leaves resources behind in
/// its table or has grown past half its memory cap; each request still
/// gets its own fuel allowance, epoch and wall-clock deadlines. Reuse skips
/// the store's set-up, instantiation, the guest's start-up (reading its
/// configuration) and the pool slot's reset: see BENCHMARKS.md
/// "Instance reuse" for what that is worth and why this number.
pub const DEFAULT_INSTANCE_REUSE: u32 = 128;

/// The most requests [`Limits::instance_reuse`] may ask of one instance.
/// An instance's heap only grows; retiring it now and then returns what a
/// guest leaks or fragments.
pub const MAX_INSTANCE_REUSE: u32 = 100_000;

/// How long an instance may sit idle between two requests before it is
/// retired rather than reused: after a burst, the memory of the instances
/// the burst needed goes back to the pool.
pub const WARM_IDLE: Duration = Duration::from_secs(30);

/// Period of the epoch ticker. Epoch deadlines are counted in these ticks, so
/// a guest spinning on the CPU is stopped at most one tick after its deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Core instances a Rust std component creates per instantiation (the main
/// module plus wasm-component-ld's shims). The pool must hold this many per
/// concurrent request or instantiation fails with "maximum concurrent limit
/// reached"; two extra leave room for a differently-linked guest.
pub const CORE_INSTANCES_PER_REQUEST: u32 = 6;

/// Linear memories and tables per component instance, with the same margin.
pub const MEMORIES_PER_REQUEST: u32 = 2;
/// Tables one request's instances may use.
pub const TABLES_PER_REQUEST: u32 = 4;
/// Fiber stacks one request of a `wasi:http@0.3` guest may hold at once (a
/// 0.2 guest runs on one). Its tasks hold more than one at a time: with one
/// per request, two concurrent requests on a pool of two failed with
/// "maximum concurrent limit of 2 for fibers reached". Not more than it
/// needs: each stack is two memory mappings, and a process has ~65k.
pub const STACKS_PER_P3_REQUEST: u32 = 2;

/// How long a request may wait for a free instance when all are busy, by
/// default. A request whose expected wait (from the queue ahead of it and
/// the measured time an instance is held) is longer gets a 503 at once.
/// Waiting, rather than a 503 at once, keeps a closed-loop client from
/// answering each 503 with a new request at once, a flood that costs more
/// CPU than it sheds; the bound keeps the wait inside the budget.
pub const DEFAULT_QUEUE_WAIT: Duration = Duration::from_millis(100);

/// Bytes of each linear memory kept mapped between two requests on one pool
/// slot and reset with `memset` instead of `madvise`: only the pages the
/// guest dirtied where the kernel has `PAGEMAP_SCAN` (Linux 6.7, see
/// `runtime::engine`), else every accessible page up to this bound. Pages
/// released with madvise fault back in on the next request, and each
/// release costs a TLB shootdown across cores. With a 1 MiB window, the
/// built-in guest's data and heap (then above its 1 MiB stack) were
/// released every request: 2467 rps at 0.66 ms CPU per request at
/// saturation, against 3165 rps at 0.50 ms with 4 MiB. The guest's stack
/// is smaller now (`build-support/guest_memory.rs`); the window stays large
/// for components that grow their memory.
pub const MEMORY_KEEP_RESIDENT: usize = 4 << 20;

/// Bytes of an answer's body read on the guests' runtime before the answer
/// is handed to the connection's (with `FanoutBuilder::guest_threads`):
/// a body this small crosses in one piece, a larger one streams on. An
/// aggregated answer is a few KiB; the cap bounds the memory an answer
/// holds while it waits to be written.
pub const HANDOFF_BUFFER: usize = 256 << 10;

/// Bytes of guest stdout and stderr kept per request; what goes beyond is
/// refused (the guest's write fails) rather than buffered without bound.
pub const GUEST_OUTPUT_CAPACITY: usize = 64 << 10;

/// How long a client may take to send a request's head, counted from when
/// the connection is ready for it: just accepted, or idle after an answer
/// (hyper starts the timer then), so it is also the keep-alive idle
/// timeout. A client that sends half a head, or nothing, is closed then.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Header fields a request may carry; beyond, `431`. hyper's default.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// Bytes of a request head (request line and headers) the server buffers;
/// a larger head gets `431`. A path the guest would refuse anyway is far
/// shorter.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 << 10;

/// Client connections open at once; beyond, the server stops accepting
/// (the kernel's backlog holds the next ones) until one closes. Above the
/// bench's 5,000 closed-loop clients, below the 20,000 file descriptors a
/// process gets here.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Host resources (header fields, requests, bodies, futures...) one
/// request's guest may hold at once. The host keeps them in its own memory,
/// outside the guest's memory cap; the largest batch holds a few hundred.
/// Beyond, the guest's call fails and the request ends with
/// `guest_resource_limit`.
pub const MAX_GUEST_RESOURCES: usize = 4096;

/// Resources a worker may hold between two requests and still be reused
/// (see `Limits::instance_reuse`): a quarter of [`MAX_GUEST_RESOURCES`], so
/// that what earlier requests left never crowds out a request's own.
pub const MAX_IDLE_RESOURCES: usize = 256;

/// Bytes of a request body the guest may send to an in-process upstream
/// (which holds it whole in host memory); beyond, the call fails with
/// `HttpRequestBodySize`. Real HTTP upstreams stream bodies.
pub const MAX_IN_PROCESS_BODY: usize = 1 << 20;

/// What a client connection may hold of the server: the part of
/// [`Limits`] the accept loop applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub(crate) header_timeout: Duration,
    pub(crate) max_headers: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Limits::default().connections()
    }
}

/// Per-request limits, shared by every instance of a `Fanout`, and the
/// limits of the client connections that bring the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Fuel per request. `None` compiles the component without fuel
    /// metering: a little cheaper (measured in BENCHMARKS.md), but a
    /// computing guest then yields its worker thread only when its epoch
    /// deadline ends it.
    pub fuel: Option<u64>,
    /// Largest linear memory, in bytes.
    pub memory_bytes: usize,
    /// Wall-clock and epoch deadline per request.
    pub deadline: Duration,
    /// Instances that may run at once.
    pub max_instances: u32,
    /// Requests an instance serves, one after another, before it is
    /// retired; 1 for a fresh instance per request. See
    /// [`DEFAULT_INSTANCE_REUSE`].
    pub instance_reuse: u32,
    /// How long a request may wait for an instance when all are busy
    /// (zero: a 503 at once). See [`DEFAULT_QUEUE_WAIT`].
    pub queue_wait: Duration,
    /// See [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// See [`DEFAULT_MAX_HEADERS`].
    pub max_headers: usize,
    /// See [`DEFAULT_MAX_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: Some(DEFAULT_FUEL),
            memory_bytes: DEFAULT_MEMORY_BYTES,
            deadline: DEFAULT_DEADLINE,
            max_instances: default_max_instances(),
            instance_reuse: DEFAULT_INSTANCE_REUSE,
            queue_wait: DEFAULT_QUEUE_WAIT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_headers: DEFAULT_MAX_HEADERS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// `mib` MiB in bytes, or `None` where that does not fit in a `usize`.
pub fn mib_to_bytes(mib: u64) -> Option<usize> {
    usize::try_from(mib).ok()?.checked_mul(1 << 20)
}

impl Limits {
    /// Checks the limits before anything is built, so that a bad value is a
    /// start-up error naming the setting, never a failing request.
    pub fn validate(&self) -> Result<(), crate::error::Error> {
        let invalid =
            |key: &'static str, reason: String| crate::error::Error::InvalidLimit { key, reason };
        if self.fuel == Some(0) {
            return Err(invalid("fuel", "must be at least 1".into()));
        }
        if self.memory_bytes < (1 << 16) {
            return Err(invalid(
                "memory",
                format!(
                    "{} bytes is less than one wasm page (64 KiB)",
                    self.memory_bytes
                ),
            ));
        }
        if self.memory_bytes > (4 << 30) {
            return Err(invalid(
                "memory",
                format!(
                    "{} bytes exceeds the 4 GiB of a 32-bit memory",
                    self.memory_bytes
                ),
            ));
        }
        if self.deadline < EPOCH_TICK || self.deadline > Duration::from_secs(300) {
            return Err(invalid(
                "deadline",
                format!("{:?} is outside {:?}..=300s", self.deadline, EPOCH_TICK),
            ));
        }
        if self.max_instances == 0 || self.max_instances > 10_000 {
            return Err(invalid(
                "max_instances",
                format!("{} is outside 1..=10000", self.max_instances),
            ));
        }
        if !(1..=MAX_INSTANCE_REUSE).contains(&self.instance_reuse) {
            return Err(invalid(
                "instance_reuse",
                format!(
                    "{} is outside 1..={MAX_INSTANCE_REUSE} (1: a fresh instance per request)",
                    self.instance_reuse
                ),
            ));
        }
        if self.queue_wait >= self.deadline {
            return Err(invalid(
                "queue_wait",
                format!(
                    "{:?} leaves no time of the {:?} deadline to serve the request",
                    self.queue_wait, self.deadline
                ),
            ));
        }
        if self.header_timeout.is_zero() || self.header_timeout > Duration::from_secs(3600) {
            return Err(invalid(
                "header_timeout",
                format!("{:?} is outside 1ms..=3600s", self.header_timeout),
            ));
        }
        if !(1..=10_000).contains(&self.max_headers) {
            return Err(invalid(
                "max_headers",
                format!("{} is outside 1..=10000", self.max_headers),
            ));
        }
        // hyper's read buffer cannot be smaller.
        if !(8 << 10..=1 << 20).contains(&self.max_header_bytes) {
            return Err(invalid(
                "max_header_bytes",
                format!("{} is outside 8 KiB..=1 MiB", self.max_header_bytes),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1".into()));
        }
        Ok(())
    }

    /// The limits of the client connections.
    pub(crate) fn connections(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: self.header_timeout,
            max_headers: self.max_headers,
            max_header_bytes: self.max_header_bytes,
            max_connections: self.max_connections,
        }
    }

    /// The epoch deadline in ticks, rounded up.
    pub(crate) fn epoch_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_nanos();
        self.deadline.as_nanos().div_ceil(tick) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_sized_from_memory_within_bounds() {
        const GIB: u64 = 1 << 30;
        // A quarter of the memory at 1 MiB an instance.
        assert_eq!(max_instances_for(4 * GIB), 1024);
        // A small pod still gets the old fixed pool; a big machine a
        // pool whose address space leaves room for other hosts.
        assert_eq!(max_instances_for(256 << 20), DEFAULT_MAX_INSTANCES);
        assert_eq!(max_instances_for(512 * GIB), MAX_DEFAULT_INSTANCES);
        let here = default_max_instances();
        assert!((DEFAULT_MAX_INSTANCES..=MAX_DEFAULT_INSTANCES).contains(&here));
        assert!(Limits::default().validate().is_ok());
    }
}
