//! Builds the hostile test guests (`test-guests/`) for wasm32-wasip2, once
//! per build, for the integration tests: `fanout_tests::HOSTILE_COMPONENT_PATH`.

#[path = "../build-support/wasm.rs"]
mod wasm;

use std::path::PathBuf;

fn main() {
    let root = wasm::workspace_root();
    wasm::rerun_if_inputs_change(&root, &["test-guests/src", "test-guests/Cargo.toml"]);
    let hostile =
        wasm::build_components(&root, &["fanout-test-guests"]).join("fanout_test_guests.wasm");
    let generated = format!(
        "/// Path of the hostile test guest component (`test-guests/`).\n\
         pub const HOSTILE_COMPONENT_PATH: &str = {hostile:?};\n"
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    std::fs::write(out_dir.join("components.rs"), generated).unwrap();
}
