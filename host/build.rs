//! Builds the guest component (`guest/`) for wasm32-wasip2 and embeds it,
//! so that `cargo run` needs nothing else.

#[path = "../build-support/wasm.rs"]
mod wasm;

use std::path::PathBuf;

fn main() {
    let root = wasm::workspace_root();
    wasm::rerun_if_inputs_change(&root, &["guest/src", "guest/Cargo.toml", "guest/build.rs"]);
    println!("cargo:rerun-if-env-changed=FANOUT_GUEST_WASM");
    // An escape hatch for packagers who build the guest themselves.
    let guest = match std::env::var_os("FANOUT_GUEST_WASM") {
        Some(path) => PathBuf::from(path),
        None => wasm::build_components(&root, &["fanout-guest"]).join("fanout_guest.wasm"),
    };
    let generated = format!(
        "/// Path of the guest component built by `host/build.rs`.\n\
         pub const GUEST_COMPONENT_PATH: &str = {guest:?};\n\
         /// The guest component, embedded in the binary.\n\
         pub static GUEST_COMPONENT: &[u8] = include_bytes!({guest:?});\n"
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    std::fs::write(out_dir.join("components.rs"), generated).unwrap();
}
