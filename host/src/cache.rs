//! An on-disk cache of compiled components, so that a restart skips
//! compilation.
//!
//! An entry is keyed by the SHA-256 of the component and by the engine's
//! compatibility hash (wasmtime version, target, and every setting that
//! changes the generated code), so a stale entry is simply never looked up.
//! Each file starts with the SHA-256 of the rest: a corrupt or truncated
//! entry is detected before anything is loaded, then rebuilt.

use sha2::{Digest, Sha256};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// How a component was obtained, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now; no cache configured.
    Compiled,
    /// Compiled now and written to the cache.
    CompiledAndCached,
    /// Loaded from the cache.
    Cached,
    /// The cache entry was corrupt: compiled again and rewritten.
    Rebuilt,
}

/// The cache file for `bytes` on `engine`, under `dir`.
pub fn entry_path(dir: &Path, engine: &Engine, bytes: &[u8]) -> PathBuf {
    let component = Sha256::digest(bytes);
    let mut engine_hash = DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let hex: String = component[..16].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}-{:016x}.cwasm", engine_hash.finish()))
}

/// Compiles `bytes`, or loads the compiled form from `dir` when a valid
/// entry is there.
pub fn load_or_compile(
    engine: &Engine,
    bytes: &[u8],
    dir: Option<&Path>,
) -> wasmtime::Result<(Component, Origin)> {
    let Some(dir) = dir else {
        return Ok((Component::new(engine, bytes)?, Origin::Compiled));
    };
    let path = entry_path(dir, engine, bytes);
    let mut origin = Origin::CompiledAndCached;
    if let Ok(file) = std::fs::read(&path) {
        match verified(&file) {
            Some(payload) => {
                // SAFETY: `deserialize` trusts its input to be wasmtime's own
                // output. The entry's checksum matched, so these are the
                // bytes `serialize` wrote into our cache directory; wasmtime
                // itself refuses output of another version or configuration.
                match unsafe { Component::deserialize(engine, payload) } {
                    Ok(component) => return Ok((component, Origin::Cached)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cache entry refused; recompiling");
                    }
                }
            }
            None => {
                tracing::warn!(path = %path.display(), "cache entry is corrupt; recompiling");
            }
        }
        origin = Origin::Rebuilt;
    }
    let component = Component::new(engine, bytes)?;
    if let Err(e) = store(&path, &component.serialize()?) {
        // A read-only or full disk costs the next start a compile, nothing more.
        tracing::warn!(path = %path.display(), error = %e, "cannot write the compiled-component cache");
        if origin == Origin::CompiledAndCached {
            origin = Origin::Compiled;
        }
    }
    Ok((component, origin))
}

/// The payload of a cache file whose checksum matches.
fn verified(file: &[u8]) -> Option<&[u8]> {
    let (sum, payload) = file.split_at_checked(32)?;
    (Sha256::digest(payload).as_slice() == sum).then_some(payload)
}

/// Writes atomically: a temporary file renamed into place, so a concurrent
/// reader never sees half an entry.
fn store(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id()
    ));
    let mut file = Vec::with_capacity(32 + payload.len());
    file.extend_from_slice(&Sha256::digest(payload));
    file.extend_from_slice(payload);
    std::fs::write(&temp, &file)?;
    std::fs::rename(&temp, path)
}

/// The default cache directory: `$XDG_CACHE_HOME/fanout`, else
/// `~/.cache/fanout`.
pub fn default_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("fanout"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_catch_corruption() {
        let payload = b"compiled code".to_vec();
        let mut file = Sha256::digest(&payload).to_vec();
        file.extend_from_slice(&payload);
        assert_eq!(verified(&file), Some(&payload[..]));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(verified(&flipped), None);
        assert_eq!(verified(&file[..40]), None);
        assert_eq!(verified(&[]), None);
    }
}
