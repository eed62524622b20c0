//! Prometheus metrics, served in text format on the admin listener.
//!
//! | metric | labels |
//! |---|---|
//! | `http_server_request_duration_seconds` (histogram) | `route`, `status` |
//! | `http_client_request_duration_seconds` (histogram, per upstream attempt) | `upstream`, `outcome` (ok, error, timeout, shed, circuit_open) |
//! | `fanout_upstream_retries_total` | `upstream` |
//! | `fanout_fuel_consumed` (histogram, per request) | |
//! | `fanout_instances_in_use` (gauge) | |
//! | `fanout_instances_idle` (gauge, instances kept for the next request) | |
//! | `fanout_shed_total` (requests turned away by admission, 503 with `Retry-After`, by the JSON body's `code`: `overloaded` at the adaptive limit, `pool_full` at a fixed one, `queue_full` the line too long, `queue_timeout` waited as long as allowed) | `cause` |
//! | `fanout_shed_held_total` (shed answers held until `Retry-After`, or longer when many are held, because the client came back sooner on its connection) | |
//! | `fanout_queue_wait_seconds` (histogram, time spent in the admission line) | |
//! | `fanout_admission_limit` (gauge, the adaptive limit now) | |
//! | `fanout_guest_failures_total` (traps, limits, deadlines) | `cause` |
//! | `fanout_response_cache_lookups_total` (upstream GETs by how they were answered: hit, stale, coalesced, miss, pass) | `upstream`, `result` |
//! | `fanout_response_cache_evictions_total` (entries pushed out by the bounds) | `upstream` |
//! | `fanout_response_cache_bytes` (gauge, stored answers) | `upstream` |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServerLabels {
    pub(crate) route: String,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClientLabels {
    pub(crate) upstream: String,
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamLabel {
    pub(crate) upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    pub(crate) upstream: String,
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CauseLabel {
    pub(crate) cause: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~8 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// The host's metrics. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    pub(crate) server: HistogramFamily<ServerLabels>,
    pub(crate) client: HistogramFamily<ClientLabels>,
    pub(crate) retries: Family<UpstreamLabel, Counter>,
    pub(crate) fuel: Histogram,
    pub(crate) instances_in_use: Gauge,
    pub(crate) instances_idle: Gauge,
    pub(crate) shed: Family<CauseLabel, Counter>,
    pub(crate) sheds_held: Counter,
    pub(crate) queue_wait: Histogram,
    pub(crate) admission_limit: Gauge,
    pub(crate) failures: Family<CauseLabel, Counter>,
    pub(crate) response_cache_lookups: Family<CacheLabels, Counter>,
    pub(crate) response_cache_evictions: Family<UpstreamLabel, Counter>,
    pub(crate) response_cache_bytes: Family<UpstreamLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let server: HistogramFamily<ServerLabels> = Family::new_with_constructor(latency_histogram);
        let client: HistogramFamily<ClientLabels> = Family::new_with_constructor(latency_histogram);
        let retries = Family::<UpstreamLabel, Counter>::default();
        // 10k to ~160M fuel.
        let fuel = Histogram::new(exponential_buckets(10_000.0, 2.0, 15));
        let instances_in_use = Gauge::default();
        let instances_idle = Gauge::default();
        let shed = Family::<CauseLabel, Counter>::default();
        let sheds_held = Counter::default();
        let queue_wait = latency_histogram();
        let admission_limit = Gauge::default();
        let failures = Family::<CauseLabel, Counter>::default();
        let response_cache_lookups = Family::<CacheLabels, Counter>::default();
        let response_cache_evictions = Family::<UpstreamLabel, Counter>::default();
        let response_cache_bytes = Family::<UpstreamLabel, Gauge>::default();
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of incoming requests, by route and status",
            Unit::Seconds,
            server.clone(),
        );
        registry.register_with_unit(
            "http_client_request_duration",
            "Duration of each upstream attempt, by upstream and outcome",
            Unit::Seconds,
            client.clone(),
        );
        registry.register(
            "fanout_upstream_retries",
            "Retry attempts, by upstream",
            retries.clone(),
        );
        registry.register(
            "fanout_fuel_consumed",
            "Fuel consumed per request",
            fuel.clone(),
        );
        registry.register(
            "fanout_instances_in_use",
            "Component instances running now",
            instances_in_use.clone(),
        );
        registry.register(
            "fanout_instances_idle",
            "Component instances kept between two requests, for reuse",
            instances_idle.clone(),
        );
        registry.register(
            "fanout_shed",
            "Requests turned away by admission (503 with Retry-After), by cause",
            shed.clone(),
        );
        registry.register(
            "fanout_shed_held",
            "Shed answers held (Retry-After or longer), the client having come back sooner",
            sheds_held.clone(),
        );
        registry.register_with_unit(
            "fanout_queue_wait",
            "Time requests waited in the admission line",
            Unit::Seconds,
            queue_wait.clone(),
        );
        registry.register(
            "fanout_admission_limit",
            "Requests the adaptive admission lets run at once",
            admission_limit.clone(),
        );
        registry.register(
            "fanout_guest_failures",
            "Requests the host answered for the guest, by cause",
            failures.clone(),
        );
        registry.register(
            "fanout_response_cache_lookups",
            "Upstream GETs by how they were answered: hit, stale, coalesced, miss, pass",
            response_cache_lookups.clone(),
        );
        registry.register(
            "fanout_response_cache_evictions",
            "Stored answers pushed out by the cache's bounds",
            response_cache_evictions.clone(),
        );
        registry.register_with_unit(
            "fanout_response_cache",
            "Bytes of stored answers",
            Unit::Bytes,
            response_cache_bytes.clone(),
        );
        Metrics {
            registry,
            server,
            client,
            retries,
            fuel,
            instances_in_use,
            instances_idle,
            shed,
            sheds_held,
            queue_wait,
            admission_limit,
            failures,
            response_cache_lookups,
            response_cache_evictions,
            response_cache_bytes,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn server_request(&self, route: &str, status: u16, took: Duration) {
        self.server
            .get_or_create(&ServerLabels {
                route: route.to_string(),
                status,
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn client_attempt(&self, upstream: &str, outcome: &'static str, took: Duration) {
        self.client
            .get_or_create(&ClientLabels {
                upstream: upstream.to_string(),
                outcome,
            })
            .observe(took.as_secs_f64());
    }
}
