//! The component must run on any `wasi:http/proxy` host: its imports lie
//! within `wasi:http/proxy` plus `wasi:cli`, which is what `wasmtime serve
//! -Scli` and Spin provide, with one documented exception declared in
//! `wit/world.wit`: `wasi:random/insecure-seed`, which Rust's std needs to
//! seed `HashMap`s (and which both hosts provide too).

use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::path::Path;
use wasmtime::component::Component;
use wit_parser::{Resolve, WorldItem};

/// `wasi:http/types@0.2.12` -> `wasi:http/types@0.2`: hosts match imports by
/// semver-compatible version, so the patch level does not matter.
fn unversioned_patch(name: &str) -> String {
    match name.rsplit_once('@') {
        Some((interface, version)) => {
            let major_minor: Vec<&str> = version.split('.').take(2).collect();
            format!("{interface}@{}", major_minor.join("."))
        }
        None => name.to_string(),
    }
}

/// The exceptions to "proxy + cli" that `wit/world.wit` declares.
const EXCEPTIONS: &[&str] = &["wasi:random/insecure-seed@0.2"];

/// Interfaces a guest may import: everything the `wasi:http/proxy` world
/// imports, every interface of the `wasi:cli` package, and the exceptions
/// the project's world declares.
fn allowed_imports() -> Result<BTreeSet<String>> {
    let mut resolve = Resolve {
        // The vendored WASI packages gate a few interfaces behind @unstable.
        all_features: true,
        ..Resolve::default()
    };
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    let (main, _) = resolve.push_dir(&wit).context("parsing wit/")?;
    // The project's own world must itself stay inside the allowed set.
    let own_world = resolve.select_world(&[main], Some("aggregator"))?;
    let http = resolve
        .package_names
        .iter()
        .find(|(name, _)| name.namespace == "wasi" && name.name == "http")
        .map(|(_, id)| *id)
        .context("wasi:http is vendored")?;
    let proxy = resolve.select_world(&[http], Some("proxy"))?;

    let mut allowed = BTreeSet::new();
    for (key, item) in &resolve.worlds[proxy].imports {
        if let WorldItem::Interface { .. } = item {
            allowed.insert(unversioned_patch(&resolve.name_world_key(key)));
        }
    }
    let cli = resolve
        .package_names
        .iter()
        .find(|(name, _)| name.namespace == "wasi" && name.name == "cli")
        .map(|(_, id)| *id)
        .context("wasi:cli is vendored")?;
    for (_, iface) in &resolve.packages[cli].interfaces {
        allowed.insert(unversioned_patch(&resolve.id_of(*iface).unwrap()));
    }
    let mut declared_exceptions = Vec::new();
    for (key, item) in &resolve.worlds[own_world].imports {
        if let WorldItem::Interface { .. } = item {
            let name = unversioned_patch(&resolve.name_world_key(key));
            if !allowed.contains(&name) {
                declared_exceptions.push(name);
            }
        }
    }
    // The world may not quietly grow beyond proxy + cli.
    assert_eq!(
        declared_exceptions, EXCEPTIONS,
        "wit/world.wit's imports beyond proxy + cli"
    );
    allowed.extend(declared_exceptions);
    Ok(allowed)
}

fn imports_and_exports(path: &str) -> Result<(Vec<String>, Vec<String>)> {
    let engine = wasmtime::Engine::default();
    let component = Component::from_file(&engine, path)?;
    let ty = component.component_type();
    let imports = ty
        .imports(&engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let exports = ty
        .exports(&engine)
        .map(|(name, _)| name.to_string())
        .collect();
    Ok((imports, exports))
}

#[test]
fn guest_imports_stay_within_proxy_and_cli() -> Result<()> {
    let allowed = allowed_imports()?;
    assert!(allowed.contains("wasi:http/outgoing-handler@0.2"));
    assert!(allowed.contains("wasi:cli/environment@0.2"));
    assert!(!allowed.contains("wasi:filesystem/preopens@0.2"));
    assert!(!allowed.contains("wasi:sockets/tcp@0.2"));

    let (imports, exports) = imports_and_exports(fanout_host::GUEST_COMPONENT_PATH)?;
    println!("guest imports: {imports:#?}");
    assert!(
        imports
            .iter()
            .any(|i| i.starts_with("wasi:http/outgoing-handler@0.2."))
    );
    let outside: Vec<_> = imports
        .iter()
        .filter(|i| !allowed.contains(&unversioned_patch(i)))
        .collect();
    assert!(
        outside.is_empty(),
        "imports outside wasi:http/proxy + wasi:cli: {outside:?}"
    );
    assert!(
        exports
            .iter()
            .any(|e| e.starts_with("wasi:http/incoming-handler@0.2.")),
        "exports: {exports:?}"
    );
    Ok(())
}

/// The `wasi:http@0.3` build (`guest-p3/`) calls upstreams through 0.3's
/// `client`, exports 0.3's `handler` and nothing of 0.2's, and imports
/// nothing else but what the 0.2 build does (Rust's std on wasm32-wasip2)
/// and 0.3's clocks and randomness: a `wasi:http/service` host that also
/// serves 0.2's `wasi:cli` runs it (`wasmtime serve -Sp3,cli`).
#[test]
fn the_p3_guest_stays_within_the_service_world_and_the_p2_builds_imports() -> Result<()> {
    let (p2_imports, _) = imports_and_exports(fanout_host::GUEST_COMPONENT_PATH)?;
    let (imports, exports) = imports_and_exports(fanout_host::GUEST_P3_COMPONENT_PATH)?;
    println!("0.3 guest imports: {imports:#?}\nexports: {exports:#?}");
    let p2: BTreeSet<String> = p2_imports.iter().map(|i| unversioned_patch(i)).collect();
    let p3_allowed = [
        "wasi:http/types@0.3",
        "wasi:http/client@0.3",
        "wasi:clocks/types@0.3",
        "wasi:clocks/monotonic-clock@0.3",
        "wasi:random/random@0.3",
    ];
    let outside: Vec<_> = imports
        .iter()
        .map(|i| unversioned_patch(i))
        .filter(|i| !p2.contains(i) && !p3_allowed.contains(&i.as_str()))
        .collect();
    assert!(outside.is_empty(), "unexpected imports: {outside:?}");
    assert!(
        imports
            .iter()
            .any(|i| i.starts_with("wasi:http/client@0.3."))
    );
    assert!(
        !imports
            .iter()
            .any(|i| i.starts_with("wasi:http/outgoing-handler@")),
        "imports: {imports:?}"
    );
    assert_eq!(
        exports
            .iter()
            .map(|e| unversioned_patch(e))
            .collect::<Vec<_>>(),
        ["wasi:http/handler@0.3"],
    );
    Ok(())
}
