//! Builds the guest component (`guest/`) for wasm32-wasip2 and embeds it,
//! so that `cargo run` needs nothing else; and its `wasi:http@0.3` build
//! (`guest-p3/`), served with `--wasi-http 0.3`.

#[path = "../build-support/wasm.rs"]
mod wasm;

use std::path::{Path, PathBuf};

fn main() {
    let root = wasm::workspace_root();
    wasm::rerun_if_inputs_change(
        &root,
        &[
            "guest/src",
            "guest/Cargo.toml",
            "guest/build.rs",
            "guest-p3/src",
            "guest-p3/Cargo.toml",
            "guest-p3/build.rs",
        ],
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    // Each build is copied out before the next: the 0.3 build compiles
    // `fanout-guest` without its 0.2 export, and that library's own
    // component lands where the 0.2 build puts it.
    let p3 = component(&root, &out_dir, "FANOUT_GUEST_P3_WASM", "fanout-guest-p3");
    let p2 = component(&root, &out_dir, "FANOUT_GUEST_WASM", "fanout-guest");
    let generated = format!(
        "/// Path of the guest component built by `host/build.rs`.\n\
         pub const GUEST_COMPONENT_PATH: &str = {p2:?};\n\
         /// The guest component, embedded in the binary.\n\
         pub static GUEST_COMPONENT: &[u8] = include_bytes!({p2:?});\n\
         /// Path of the guest's `wasi:http@0.3` build.\n\
         pub const GUEST_P3_COMPONENT_PATH: &str = {p3:?};\n\
         /// The guest's `wasi:http@0.3` build, embedded in the binary.\n\
         pub static GUEST_P3_COMPONENT: &[u8] = include_bytes!({p3:?});\n"
    );
    std::fs::write(out_dir.join("components.rs"), generated).unwrap();
}

/// `package` built (or, for packagers who build it themselves, the file
/// named by `env`), copied into `out_dir`.
fn component(root: &Path, out_dir: &Path, env: &str, package: &str) -> PathBuf {
    println!("cargo:rerun-if-env-changed={env}");
    let file = format!("{}.wasm", package.replace('-', "_"));
    let built = match std::env::var_os(env) {
        Some(path) => PathBuf::from(path),
        None => wasm::build_components(root, &[package]).join(&file),
    };
    let copy = out_dir.join(&file);
    std::fs::copy(&built, &copy)
        .unwrap_or_else(|e| panic!("copying {} failed: {e}", built.display()));
    copy
}
