//! The shipped Spin manifest runs the component as built, lets it reach every
//! upstream of the default configuration, and sets every key the guest reads.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use toml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest() -> Result<Value> {
    let path = root().join("deploy/spin/spin.toml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(toml::from_str(&text)?)
}

/// `a/b/../c` -> `a/c`, without touching the file system.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn the_manifest_serves_the_component_the_build_produces() -> Result<()> {
    let manifest = manifest()?;
    assert_eq!(manifest["spin_manifest_version"].as_integer(), Some(2));
    let component = &manifest["component"]["fanout"];
    let source = component["source"].as_str().context("source")?;
    let resolved = normalise(&root().join("deploy/spin").join(source));
    // Where `cargo build -p fanout-guest --target wasm32-wasip2 --profile wasm`
    // (the manifest's build command, and `just build-guest`) writes it.
    assert_eq!(
        resolved,
        normalise(&root().join("target/wasm32-wasip2/wasm/fanout_guest.wasm"))
    );
    let build = &component["build"];
    assert_eq!(
        build["command"].as_str(),
        Some("cargo build -p fanout-guest --target wasm32-wasip2 --profile wasm")
    );
    assert_eq!(
        normalise(
            &root()
                .join("deploy/spin")
                .join(build["workdir"].as_str().unwrap())
        ),
        normalise(&root())
    );
    // An HTTP trigger routes the product paths to it.
    let triggers = manifest["trigger"]["http"]
        .as_array()
        .context("http triggers")?;
    assert!(
        triggers
            .iter()
            .any(|t| t["component"].as_str() == Some("fanout")
                && t["route"].as_str() == Some("/products/..."))
    );
    Ok(())
}

#[test]
fn every_default_upstream_is_allowed_and_configured() -> Result<()> {
    let manifest = manifest()?;
    let component = &manifest["component"]["fanout"];
    let variables = manifest["variables"].as_table().context("variables")?;
    let allowed: Vec<&str> = component["allowed_outbound_hosts"]
        .as_array()
        .context("allowed_outbound_hosts")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let environment = component["environment"].as_table().context("environment")?;

    let env = |key: &str| {
        environment
            .get(key)
            .and_then(Value::as_str)
            .map(String::from)
    };
    // The guest reads exactly what the manifest sets: it must validate.
    let config = fanout_guest::config::Config::from_lookup(env).map_err(|e| {
        anyhow::anyhow!("the manifest's environment is not a valid guest configuration: {e}")
    })?;

    for name in config.upstream_names() {
        let variable = format!("{name}_url");
        assert!(
            allowed.contains(&format!("{{{{ {variable} }}}}").as_str()),
            "{name} is not in allowed_outbound_hosts: {allowed:?}"
        );
        let default = variables
            .get(&variable)
            .and_then(|v| v["default"].as_str())
            .with_context(|| format!("variable {variable} has no default"))?;
        // The default host Spin allows is the base URL the guest is given.
        let base = env(&format!("FANOUT_UPSTREAM_{}", name.to_ascii_uppercase())).unwrap();
        assert_eq!(default, base, "{name}");
    }
    Ok(())
}
