//! What a worker's wasmtime store holds: its WASI and `wasi:http`
//! contexts, its resource table, its outgoing-request hooks and its memory
//! limiter.

use crate::outbound::RequestHooks;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// A worker's store data; the hooks are its current request's.
pub(crate) struct RequestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) hooks: RequestHooks,
    pub(crate) limiter: MemoryLimiter,
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// [`StoreLimits`] plus a record of whether it refused to grow a memory, so
/// that the trap that follows (usually an abort in the guest's allocator) is
/// reported as what it is.
pub(crate) struct MemoryLimiter {
    pub(crate) limits: StoreLimits,
    pub(crate) memory_denied: bool,
    /// The largest size a memory was allowed to grow to, in bytes: a
    /// reused worker is retired once it is large (see `Worker::reusable`).
    pub(crate) memory_bytes: usize,
    /// Growths past a memory's initial size not yet counted in the stats.
    pub(crate) growths: u64,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.memory_denied |= !allowed;
        if allowed {
            self.memory_bytes = self.memory_bytes.max(desired);
            // `current` is 0 at a memory's creation (and, rarely, at the
            // first growth of one created empty).
            self.growths += u64::from(current > 0);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}
