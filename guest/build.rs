//! The guest's stack size.
//!
//! Rust gives a wasm program a 1 MiB stack at the bottom of its linear
//! memory. Each request in flight has an instance of its own, and that
//! region ends up resident for every one: peak RSS per in-flight request was
//! 1417 KiB with the default, 507 KiB with 256 KiB and 294 KiB with 64 KiB
//! (`fanout-bench micro`). Ordinary requests run in 16 KiB; the deepest JSON
//! serde_json reads (128 levels) needs between 32 and 64 KiB
//! (`deeply_nested_upstream_json_fits_the_guest_stack`). 128 KiB keeps twice
//! that. An overflow traps (the stack sits below the data): a 500, never
//! corrupted memory.

/// Bytes of stack for the guest.
const STACK_SIZE: u32 = 128 << 10;

fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-arg=-zstack-size={STACK_SIZE}");
    }
}
