//! Serde helpers for the units `fanout.toml` spells its settings in
//! (`*_ms`, `*_kib`, `*_mib`), shared by every table that has them.

use serde::{Deserialize, Deserializer};

/// `open_ms = 5000` as a `Duration`.
pub(crate) mod millis {
    use super::*;
    use std::time::Duration;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

fn scaled<'de, D: Deserializer<'de>>(d: D, shift: u32) -> Result<usize, D::Error> {
    usize::deserialize(d)?
        .checked_mul(1 << shift)
        .ok_or_else(|| serde::de::Error::custom("too large"))
}

/// `max_entry_kib = 256` in bytes.
pub(crate) mod kib {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        scaled(d, 10)
    }
}

/// `max_mib = 64` in bytes.
pub(crate) mod mib {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        scaled(d, 20)
    }
}
