//! Builds the guest component for wasm32-wasip2 so that `cargo run` and
//! `cargo test` need nothing else. The guest gets its own target directory
//! under OUT_DIR: a nested cargo must not share the outer build's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    for watched in [
        "guest/src",
        "guest/Cargo.toml",
        "guest/build.rs",
        "test-guests/src",
        "test-guests/Cargo.toml",
        "wit",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=FANOUT_GUEST_WASM");

    ensure_wasm_target();
    // One cargo run builds the guest and the test guests together.
    let wasm_dir = build_wasm(
        &root,
        &out_dir.join("guest-target"),
        &["fanout-guest", "fanout-test-guests"],
    );
    // An escape hatch for packagers who build the guest themselves.
    let guest = std::env::var_os("FANOUT_GUEST_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| wasm_dir.join("fanout_guest.wasm"));
    let hostile = wasm_dir.join("fanout_test_guests.wasm");
    let generated = format!(
        "/// Path of the guest component built by `host/build.rs`.\n\
         pub const GUEST_COMPONENT_PATH: &str = {guest:?};\n\
         /// The guest component, embedded in the binary.\n\
         pub static GUEST_COMPONENT: &[u8] = include_bytes!({guest:?});\n\
         /// Path of the hostile test guest (`test-guests/`), for tests only.\n\
         #[doc(hidden)]\n\
         pub const HOSTILE_COMPONENT_PATH: &str = {hostile:?};\n"
    );
    std::fs::write(out_dir.join("components.rs"), generated).unwrap();
}

/// rust-toolchain.toml lists wasm32-wasip2, and rustup installs it with the
/// toolchain; but where rustup's auto-install is off (RUSTUP_AUTO_INSTALL=0)
/// or the toolchain predates the file, the target can be missing. Add it
/// rather than fail, so `cargo run` and `cargo test` stay the only commands.
fn ensure_wasm_target() {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if libdir.as_deref().is_some_and(Path::is_dir) {
        return;
    }
    println!("cargo:warning=installing the wasm32-wasip2 target with rustup");
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .status();
    match status {
        Ok(status) if status.success() => {}
        other => panic!(
            "the wasm32-wasip2 target is missing and `rustup target add wasm32-wasip2` \
             failed ({other:?}); install it and build again"
        ),
    }
}

/// Runs `cargo build` for `packages` on wasm32-wasip2 with the `wasm` profile
/// and returns the directory holding the components it wrote.
fn build_wasm(root: &Path, target_dir: &Path, packages: &[&str]) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--target", "wasm32-wasip2", "--profile", "wasm"])
        .args(packages.iter().flat_map(|p| ["-p", p]))
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
        "building {packages:?} for wasm32-wasip2 failed ({status}); \
         is the target installed? rust-toolchain.toml lists it, so rustup adds it"
    );
    target_dir.join("wasm32-wasip2/wasm")
}
