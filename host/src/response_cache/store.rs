//! The bounded store of one upstream's answers, on quick_cache.
//!
//! quick_cache rather than moka: it bounds by weight with no background
//! threads, and the lifetimes here are ours to check on lookup anyway (an
//! answer past its freshness stays for stale-while-revalidate, which a
//! cache that evicts on expiry would have dropped). Both bounds hold with
//! one weigher: an entry weighs its bytes, but at least
//! `max_bytes / max_entries`, so neither more than `max_entries` entries nor
//! more than `max_bytes` bytes fit.

use super::ResponseCacheConfig;
use crate::metrics::{Metrics, UpstreamLabel};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One stored answer, whole.
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// When it arrived, and the upstream's `Age` then.
    pub(crate) received: Instant,
    pub(crate) age_then: Duration,
    pub(crate) fresh_for: Duration,
    pub(crate) stale_for: Duration,
    /// The `Vary` fields, with the values of the request that fetched it.
    pub(crate) vary: Vec<(HeaderName, Option<HeaderValue>)>,
    /// Counted in the bytes gauge while stored.
    pub(crate) held: Option<Held>,
}

impl Stored {
    /// Its size in memory, near enough: what the bounds count.
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 128
    }

    /// How old it is now, as `Age` says (RFC 9111 §4.2.3).
    pub(crate) fn age(&self, now: Instant) -> Duration {
        self.age_then + now.saturating_duration_since(self.received)
    }

    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now < self.received + self.fresh_for
    }

    pub(crate) fn may_serve_stale(&self, now: Instant) -> bool {
        now < self.received + self.fresh_for + self.stale_for
    }

    /// Whether a request with `headers` asked for this very variant.
    pub(crate) fn matches(&self, headers: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| headers.get(name) == value.as_ref())
    }
}

/// The answer's bytes in the gauge, from storing to the last reference.
pub(crate) struct Held {
    gauge: Gauge,
    bytes: i64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

/// An entry of the store.
#[derive(Clone)]
pub(crate) enum Slot {
    Answer(Arc<Stored>),
    /// The key's answers are never reusable (no-store, private...):
    /// until then, its requests go straight upstream, waiting for nobody.
    Pass {
        until: Instant,
    },
    /// The `Vary` field names the URL's answers last came with.
    VaryNames(Arc<[HeaderName]>),
}

#[derive(Clone)]
struct Weigher {
    floor: u64,
}

impl quick_cache::Weighter<String, Slot> for Weigher {
    fn weight(&self, key: &String, slot: &Slot) -> u64 {
        let size = key.len()
            + match slot {
                Slot::Answer(stored) => stored.size(),
                Slot::Pass { .. } => 16,
                Slot::VaryNames(names) => names.iter().map(|n| n.as_str().len() + 24).sum(),
            };
        (size as u64).max(self.floor)
    }
}

/// Counts evictions (replacements are not evictions).
#[derive(Clone)]
struct Evictions(prometheus_client::metrics::counter::Counter);

impl quick_cache::Lifecycle<String, Slot> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: String, _: Slot) {
        self.0.inc();
    }
}

/// The store of one upstream.
pub(crate) struct Store {
    cache:
        quick_cache::sync::Cache<String, Slot, Weigher, quick_cache::DefaultHashBuilder, Evictions>,
    bytes: Gauge,
}

/// Room for pass marks and `Vary` names when only coalescing is on.
const COALESCE_ONLY: ResponseCacheConfig = ResponseCacheConfig {
    ttl: Duration::ZERO,
    stale_while_revalidate: Duration::ZERO,
    max_entries: 10_000,
    max_entry_bytes: 0,
    max_bytes: 4 << 20,
    shared: false,
};

impl Store {
    pub(crate) fn new(
        config: Option<&ResponseCacheConfig>,
        metrics: &Metrics,
        upstream: &str,
    ) -> Store {
        let config = config.unwrap_or(&COALESCE_ONLY);
        let label = UpstreamLabel {
            upstream: upstream.to_string(),
        };
        let evictions = metrics
            .response_cache_evictions
            .get_or_create(&label)
            .clone();
        let max_entries = config.max_entries.max(1);
        let weigher = Weigher {
            floor: (config.max_bytes / max_entries).max(1) as u64,
        };
        Store {
            cache: quick_cache::sync::Cache::with(
                max_entries,
                config.max_bytes as u64,
                weigher,
                Default::default(),
                Evictions(evictions),
            ),
            bytes: metrics.response_cache_bytes.get_or_create(&label).clone(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Slot> {
        self.cache.get(key)
    }

    /// Stores `stored` under `key`, counting its bytes until it is gone.
    pub(crate) fn insert_answer(&self, key: String, mut stored: Stored) -> Arc<Stored> {
        let bytes = stored.size() as i64;
        self.bytes.inc_by(bytes);
        stored.held = Some(Held {
            gauge: self.bytes.clone(),
            bytes,
        });
        let stored = Arc::new(stored);
        self.cache.insert(key, Slot::Answer(stored.clone()));
        stored
    }

    pub(crate) fn insert(&self, key: String, slot: Slot) {
        self.cache.insert(key, slot);
    }

    /// Removes `key` if it still holds `stored` (and not a newer answer).
    pub(crate) fn remove_answer(&self, key: &str, stored: &Arc<Stored>) {
        self.cache.remove_if(
            key,
            |slot| matches!(slot, Slot::Answer(s) if Arc::ptr_eq(s, stored)),
        );
    }

    /// Entries and the bytes the bound counts.
    #[cfg(test)]
    pub(crate) fn usage(&self) -> (usize, u64) {
        (self.cache.len(), self.cache.weight())
    }
}
