//! Identical upstream GETs answered once: request coalescing (single
//! flight) and a bounded shared cache, per upstream, invisible to the guest.
//!
//! The layer sits outermost on an upstream's [guardrails](crate::guard):
//! an answer from the cache or from another request's call costs no
//! retry budget, no breaker outcome and no concurrency slot. For each GET:
//!
//! 1. **Pass** when it may not be shared: not a GET, a request that says
//!    `no-cache`/`no-store`, one carrying credentials the host did not add
//!    (`Authorization`, `Cookie`) unless `shared = true`, or a key whose
//!    answers were lately never reusable.
//! 2. **Hit**: a stored answer for the key (URL plus the values of the
//!    fields its `Vary` names) that is fresh, with `Age` set. **Stale**: one
//!    past its freshness but within stale-while-revalidate, served at once
//!    while one background call refreshes it.
//! 3. **Coalesced**: a call for the key is in flight; wait for it (within
//!    the request's own first-byte timeout and deadline) and share its
//!    answer if reusable. A leader that fails or is cancelled hands the lead
//!    to the next waiter (`flight`).
//! 4. **Miss**: make the call; store the answer if RFC 9111 lets a shared
//!    cache (`policy`) and it fits `max_entry_kib`.
//!
//! Coalescing is on for every `http` upstream unless turned off; storing is
//! off unless `cache` is configured. The outcome reaches the access log
//! (`pricing:ok:0.1ms:hit`), the client span (`fanout.cache`) and
//! `fanout_response_cache_lookups_total`.

mod flight;
mod policy;
mod service;
mod store;

pub(crate) use service::ResponseCacheLayer;

use serde::Deserialize;
use std::time::Duration;

/// An upstream's cache: `cache = { ttl_ms = 1000, ... }` in `fanout.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseCacheConfig {
    /// How long an answer is fresh when the upstream gives no lifetime
    /// (`max-age`, `s-maxage`), which wins when it does.
    #[serde(rename = "ttl_ms", with = "crate::units::millis")]
    pub ttl: Duration,
    /// How long past its freshness an answer may still be served while one
    /// call refreshes it (unless the upstream says `must-revalidate`).
    #[serde(rename = "stale_while_revalidate_ms", with = "crate::units::millis")]
    pub stale_while_revalidate: Duration,
    /// Entries at most.
    pub max_entries: usize,
    /// An answer larger than this is neither stored nor shared.
    #[serde(rename = "max_entry_kib", with = "crate::units::kib")]
    pub max_entry_bytes: usize,
    /// Bytes at most, all entries together.
    #[serde(rename = "max_mib", with = "crate::units::mib")]
    pub max_bytes: usize,
    /// Share answers to requests that carry credentials (a forwarded
    /// `Authorization` or cookie) with other requests: only for upstreams
    /// whose answers do not depend on who asks.
    pub shared: bool,
}

impl Default for ResponseCacheConfig {
    fn default() -> Self {
        ResponseCacheConfig {
            ttl: Duration::from_secs(1),
            stale_while_revalidate: Duration::ZERO,
            max_entries: 10_000,
            max_entry_bytes: 256 << 10,
            max_bytes: 64 << 20,
            shared: false,
        }
    }
}

impl ResponseCacheConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_entries == 0 {
            return Err("cache.max_entries must be at least 1".into());
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > self.max_bytes {
            return Err("cache.max_entry_kib must be at least 1 and within max_mib".into());
        }
        if self.ttl.is_zero() && self.stale_while_revalidate.is_zero() {
            return Err(
                "cache.ttl_ms is 0: nothing would be stored (coalescing is on without a cache)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// How one upstream call was answered, as the access log and the client
/// span name it. Put in the answer's extensions by the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// A fresh stored answer.
    Hit,
    /// A stored answer past its freshness, while it is refreshed.
    Stale,
    /// Another request's call, waited for.
    Coalesced,
    /// A call of its own, its answer stored or shared when it may be.
    Miss,
    /// A call of its own that may not be shared.
    Pass,
}

impl CacheStatus {
    /// `hit`, `stale`, `coalesced`, `miss` or `pass`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Stale => "stale",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Miss => "miss",
            CacheStatus::Pass => "pass",
        }
    }
}

#[cfg(test)]
mod tests;
