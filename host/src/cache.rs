//! An on-disk cache of compiled components, so that a restart skips
//! compilation.
//!
//! An entry is keyed by the SHA-256 of the component and by the engine's
//! compatibility hash (wasmtime version, target, and every setting that
//! changes the generated code), so a stale entry is simply never looked up.
//!
//! An entry is native code that `Component::deserialize` runs as it is, so
//! the cache trusts nothing it did not write itself:
//!
//! - the folder is created `0700`, and refused (the component is compiled,
//!   nothing read or written) when another user owns it or anyone else may
//!   write in it;
//! - each entry starts with an HMAC-SHA256 of the rest, keyed by a random
//!   key in `key` beside the entries (created `0600`, refused on the same
//!   terms as the folder): an entry planted or swapped by someone who cannot
//!   read the key fails the check, is logged and recompiled, never loaded;
//! - files are opened without following symbolic links, and an entry is
//!   written to a new temporary file (created exclusively) and renamed into
//!   place, so that a concurrent reader never sees half of one.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

type HmacSha256 = Hmac<Sha256>;

/// The key's file name in the cache folder.
const KEY_FILE: &str = "key";
/// Bytes of the key, and of the tag that starts each entry.
const KEY_LEN: usize = 32;

/// How a component was obtained, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now; no cache configured.
    Compiled,
    /// Compiled now and written to the cache.
    CompiledAndCached,
    /// Loaded from the cache.
    Cached,
    /// The cache entry was corrupt or not ours: compiled again and
    /// rewritten.
    Rebuilt,
    /// The cache folder or its key was not safe to use (see the module
    /// docs): compiled, and the cache neither read nor written.
    CacheRefused,
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

/// Compiles `bytes`, or loads the compiled form from `dir` when an entry
/// written there by this user is found.
pub fn load_or_compile(
    engine: &Engine,
    bytes: &[u8],
    dir: Option<&Path>,
) -> wasmtime::Result<(Component, Origin)> {
    let Some(dir) = dir else {
        return Ok((Component::new(engine, bytes)?, Origin::Compiled));
    };
    let key = match open_cache(dir) {
        Ok(key) => key,
        Err(reason) => {
            tracing::warn!(dir = %dir.display(), "compiled-component cache refused: {reason}; compiling");
            return Ok((Component::new(engine, bytes)?, Origin::CacheRefused));
        }
    };
    let path = entry_path(dir, engine, bytes);
    let mut origin = Origin::CompiledAndCached;
    if let Some(file) = read_no_follow(&path) {
        match authenticated(&key, &file) {
            Some(payload) => {
                // SAFETY: `deserialize` trusts its input to be wasmtime's own
                // output. The entry's HMAC matched under a key only this
                // user can read, so these are the bytes `serialize` wrote
                // for us; wasmtime itself refuses output of another version
                // or configuration.
                match unsafe { Component::deserialize(engine, payload) } {
                    Ok(component) => return Ok((component, Origin::Cached)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cache entry refused; recompiling");
                    }
                }
            }
            None => {
                tracing::warn!(path = %path.display(), "cache entry is corrupt or was not written by this host; recompiling");
            }
        }
        origin = Origin::Rebuilt;
    }
    let component = Component::new(engine, bytes)?;
    if let Err(e) = store(&key, &path, &component.serialize()?) {
        // A read-only or full disk costs the next start a compile, nothing more.
        tracing::warn!(path = %path.display(), error = %e, "cannot write the compiled-component cache");
        if origin == Origin::CompiledAndCached {
            origin = Origin::Compiled;
        }
    }
    Ok((component, origin))
}

/// Creates `dir` (`0700`) if need be, checks that it and its key are this
/// user's alone, and returns the key (made on first use).
fn open_cache(dir: &Path) -> Result<[u8; KEY_LEN], String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create it: {e}"))?;
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if let Some(reason) = unsafe_to_trust(meta.uid(), meta.mode(), 0o022) {
        return Err(format!("the folder {reason}"));
    }
    let path = dir.join(KEY_FILE);
    match read_key(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        read => return read.map_err(|e| e.to_string()),
    }
    // First use. Written whole to a temporary file, then linked into place:
    // of two hosts starting at once one makes the key, and the other,
    // finding it there, reads it whole.
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness for a key: {e}"))?;
    let temp = dir.join(format!(
        ".key.{}.{:016x}.tmp",
        std::process::id(),
        fastrand::u64(..)
    ));
    let made = (|| {
        let mut file = create_exclusive(&temp)?;
        file.write_all(&key)?;
        file.sync_all()?;
        std::fs::hard_link(&temp, &path)
    })();
    let _ = std::fs::remove_file(&temp);
    match made {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(&path).map_err(|e| e.to_string())
        }
        Err(e) => Err(format!("cannot create the key file: {e}")),
    }
}

/// The key at `path`, if it is a regular file of this user's that nobody
/// else may read.
fn read_key(path: &Path) -> std::io::Result<[u8; KEY_LEN]> {
    let refused = |reason: String| std::io::Error::other(format!("the key file {reason}"));
    let mut file = open_no_follow(path)?;
    let meta = file.metadata()?;
    if let Some(reason) = unsafe_to_trust(meta.uid(), meta.mode(), 0o077) {
        return Err(refused(reason));
    }
    let mut key = [0u8; KEY_LEN];
    file.read_exact(&mut key)
        .map_err(|e| refused(format!("is unreadable: {e}")))?;
    Ok(key)
}

/// Why a file or folder with this owner and mode is not to be trusted, if
/// it is not: another user owns it, or `forbidden` mode bits are set.
fn unsafe_to_trust(owner: u32, mode: u32, forbidden: u32) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if owner != me {
        return Some(format!("is owned by uid {owner}, not this user ({me})"));
    }
    if mode & forbidden != 0 {
        return Some(format!(
            "has mode {:o}: others may write or read it",
            mode & 0o777
        ));
    }
    None
}

fn open_no_follow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// A new file, `0600`: fails if anything (a symbolic link included) is
/// already at `path`.
fn create_exclusive(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The file at `path`, if it is a regular file (not a link) we can read.
fn read_no_follow(path: &Path) -> Option<Vec<u8>> {
    let mut file = open_no_follow(path).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The payload of a cache file whose tag matches under `key`.
fn authenticated<'a>(key: &[u8; KEY_LEN], file: &'a [u8]) -> Option<&'a [u8]> {
    let (tag, payload) = file.split_at_checked(KEY_LEN)?;
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(payload);
    mac.verify_slice(tag).ok().map(|()| payload)
}

/// Writes `payload`, tagged, through a fresh temporary file renamed into
/// place.
fn store(key: &[u8; KEY_LEN], path: &Path, payload: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(format!(
        ".{}.{}.{:016x}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(payload);
    let written = (|| {
        let mut file = create_exclusive(&temp)?;
        file.write_all(&mac.finalize().into_bytes())?;
        file.write_all(payload)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
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
    use std::os::unix::fs::PermissionsExt;

    fn tagged(key: &[u8; KEY_LEN], payload: &[u8]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(payload);
        let mut file = mac.finalize().into_bytes().to_vec();
        file.extend_from_slice(payload);
        file
    }

    #[test]
    fn only_entries_tagged_with_our_key_are_authentic() {
        let key = [7u8; KEY_LEN];
        let payload = b"compiled code".to_vec();
        let file = tagged(&key, &payload);
        assert_eq!(authenticated(&key, &file), Some(&payload[..]));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(authenticated(&key, &flipped), None, "tampered");
        assert_eq!(authenticated(&key, &file[..40]), None, "truncated");
        assert_eq!(authenticated(&key, &[]), None);
        // Planted: a well-formed entry under another key, or checksummed
        // the way entries used to be.
        assert_eq!(
            authenticated(&key, &tagged(&[8u8; KEY_LEN], &payload)),
            None
        );
        let mut checksummed = Sha256::digest(&payload).to_vec();
        checksummed.extend_from_slice(&payload);
        assert_eq!(authenticated(&key, &checksummed), None);
    }

    #[test]
    fn the_folder_and_key_are_made_private_and_checked() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cache");
        let key = open_cache(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(open_cache(&dir).unwrap(), key, "the same key next time");

        // World-writable folder: refused.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = open_cache(&dir).unwrap_err();
        assert!(refused.contains("mode 777"), "{refused}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();

        // A key others may read: refused.
        let key_path = dir.join(KEY_FILE);
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_cache(&dir).unwrap_err().contains("key file"));

        // A key that is a link to a file elsewhere: refused.
        std::fs::remove_file(&key_path).unwrap();
        let elsewhere = parent.path().join("planted-key");
        std::fs::write(&elsewhere, [0u8; KEY_LEN]).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &key_path).unwrap();
        assert!(open_cache(&dir).is_err());
    }

    #[test]
    fn other_owners_are_refused() {
        let me = unsafe { libc::geteuid() };
        assert_eq!(unsafe_to_trust(me, 0o40700, 0o022), None);
        assert!(unsafe_to_trust(me.wrapping_add(1), 0o40700, 0o022).is_some());
        assert!(unsafe_to_trust(me, 0o40770, 0o022).is_some());
        assert!(unsafe_to_trust(me, 0o100640, 0o077).is_some());
    }

    #[test]
    fn a_link_at_the_temporary_path_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let temp = dir.path().join(".entry.tmp");
        std::os::unix::fs::symlink(&victim, &temp).unwrap();
        assert!(create_exclusive(&temp).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // And an entry that is a link is not read.
        let entry = dir.path().join("linked.cwasm");
        std::os::unix::fs::symlink(&victim, &entry).unwrap();
        assert_eq!(read_no_follow(&entry), None);
    }
}
