//! Builds the guest component for wasm32-wasip2 so that `cargo run` and
//! `cargo test` need nothing else. The guest gets its own target directory
//! under OUT_DIR: a nested cargo must not share the outer build's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    for watched in ["guest/src", "guest/Cargo.toml", "wit", "Cargo.lock", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=FANOUT_GUEST_WASM");

    // An escape hatch for packagers who build the guest themselves.
    let wasm = match std::env::var_os("FANOUT_GUEST_WASM") {
        Some(path) => PathBuf::from(path),
        None => build_wasm(&root, &out_dir.join("guest-target"), "fanout-guest", "fanout_guest"),
    };
    let generated = format!(
        "/// Path of the guest component built by `host/build.rs`.\n\
         pub const GUEST_COMPONENT_PATH: &str = {wasm:?};\n\
         /// The guest component, embedded in the binary.\n\
         pub static GUEST_COMPONENT: &[u8] = include_bytes!({wasm:?});\n"
    );
    std::fs::write(out_dir.join("components.rs"), generated).unwrap();
}

/// Runs `cargo build` for `package` on wasm32-wasip2 with the `wasm` profile
/// and returns the path of the component it wrote.
pub fn build_wasm(root: &Path, target_dir: &Path, package: &str, artifact: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--target", "wasm32-wasip2", "--profile", "wasm", "-p", package])
        .arg("--target-dir")
        .arg(target_dir);
    // Flags meant for the outer (native) build must not leak into the wasm one.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("failed to run cargo for the guest");
    assert!(
        status.success(),
        "building {package} for wasm32-wasip2 failed ({status}); \
         is the target installed? rust-toolchain.toml lists it, so rustup adds it"
    );
    target_dir.join(format!("wasm32-wasip2/wasm/{artifact}.wasm"))
}
