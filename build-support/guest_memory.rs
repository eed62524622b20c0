//! The guests' linear memory layout, set at link time. Shared by
//! `guest/build.rs` and `guest-p3/build.rs` (included with `#[path]`), so
//! that both builds of the policy are laid out in one place.
//!
//! **Stack.** Rust gives a wasm program a 1 MiB stack at the bottom of its
//! linear memory. Each request in flight has an instance of its own, and
//! that region ends up resident for every one: peak RSS per in-flight
//! request was 1417 KiB with the default, 507 KiB with 256 KiB and 294 KiB
//! with 64 KiB (`fanout-bench micro`). Ordinary requests run in 16 KiB; the
//! deepest JSON serde_json reads (128 levels) needs between 32 and 64 KiB
//! (`deeply_nested_upstream_json_fits_the_guest_stack`). 128 KiB keeps
//! twice that. An overflow traps (the stack sits below the data): a 500,
//! never corrupted memory.
//!
//! **Initial memory.** The linker's default is just the stack and the data
//! (192 KiB), so every request grew the memory: a product by one page, a
//! 20-id batch to 320 KiB, a 100-id one (the most a route takes) to 640
//! KiB. In the host's pooling allocator each growth is an `mprotect`, and
//! the next instance in that pool slot shrinks the memory back with
//! another, each a TLB shootdown across cores: ~60 % of a fresh
//! instantiation's time (`perf`, `--instance-reuse 1`). wasi-libc's
//! allocator uses the initial memory above the data before it grows any.
//! Pages a request never touches are not resident, and where the kernel
//! has `PAGEMAP_SCAN` (Linux 6.7) the pool resets only the pages a request
//! dirtied; on older kernels it `memset`s the whole initial memory at each
//! reset (see `MEMORY_KEEP_RESIDENT`), so the initial size is kept to what
//! ordinary requests use, with room: 512 KiB. It is under the least
//! `limits.memory_mib` allows (1 MiB), so no valid cap refuses it.
//!
//! The 0.3 build uses more: from 512 KiB it grew its memory ten times for
//! a product and a 20-id batch, from 1 MiB twice, from 2 MiB never
//! (`ordinary_requests_fit_the_guests_initial_memory`). It needs more than
//! 1 MiB for those two anyway, so 2 MiB refuses no cap under which it
//! could answer them.

/// Bytes of stack for the guest.
const STACK_SIZE: u32 = 128 << 10;

/// Prints the link arguments of the guest crate being built, for a wasm32
/// build only (natively the guest crates are plain libraries).
pub fn link_args() {
    // Bytes of linear memory the guest starts with, stack and data included.
    let initial_memory: u32 = match std::env::var("CARGO_PKG_NAME").as_deref() {
        Ok("fanout-guest-p3") => 2 << 20,
        _ => 512 << 10,
    };
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-arg=-zstack-size={STACK_SIZE}");
        println!("cargo:rustc-link-arg=--initial-memory={initial_memory}");
    }
}
