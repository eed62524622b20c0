//! The 0.3 guest's linear memory layout: see `build-support/guest_memory.rs`.

#[path = "../build-support/guest_memory.rs"]
mod guest_memory;

fn main() {
    println!("cargo:rerun-if-changed=../build-support/guest_memory.rs");
    guest_memory::link_args();
}
