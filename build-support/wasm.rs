//! Builds wasm32-wasip2 components from build scripts, so that `cargo run`
//! and `cargo test` need nothing else. Shared by `host/build.rs` (the
//! guest) and `tests/build.rs` (the hostile test guests), which include
//! this file with `#[path]`.
//!
//! Both build into one folder beside the outer build's profiles, so that
//! the wasm dependencies are compiled once for every profile and both
//! crates (a nested cargo must not share the outer build's own folder,
//! whose lock the outer cargo holds; two nested ones simply take turns).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root, from the calling crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    manifest_dir.parent().unwrap().to_path_buf()
}

/// Asks cargo to rerun the build script when any wasm input changes.
pub fn rerun_if_inputs_change(root: &Path, inputs: &[&str]) {
    for watched in inputs
        .iter()
        .chain(&["wit", "Cargo.lock", "Cargo.toml", "build-support"])
    {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
}

/// Builds `packages` for wasm32-wasip2 with the `wasm` profile and returns
/// the directory holding the components.
pub fn build_components(root: &Path, packages: &[&str]) -> PathBuf {
    ensure_wasm_target();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<crate>-<hash>/out.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|target| target.join("wasm-components"))
        .unwrap_or_else(|| out_dir.join("wasm-components"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--target", "wasm32-wasip2", "--profile", "wasm"])
        .args(packages.iter().flat_map(|p| ["-p", p]))
        .arg("--target-dir")
        .arg(&target_dir);
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
    let status = cmd
        .status()
        .expect("failed to run cargo for the components");
    assert!(
        status.success(),
        "building {packages:?} for wasm32-wasip2 failed ({status}); \
         is the target installed? rust-toolchain.toml lists it, so rustup adds it"
    );
    target_dir.join("wasm32-wasip2/wasm")
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
