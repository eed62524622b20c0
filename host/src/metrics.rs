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
//! | `fanout_connections_open` (gauge, client connections open on the aggregator's listener; at `max_connections` it stops accepting) | |
//! | `fanout_request_heads_refused_total` (request heads the HTTP server refused before any handler ran, the connection then closed: `head_timeout` a head begun, or none sent, within `header_timeout_ms` (slow clients; a keep-alive connection idle after its answers is not counted), `head_too_large` 431 or 414 and `malformed` 400 in the JSON error shape, `http2_preface` an HTTP/2 client on this HTTP/1.1 port, answered with GOAWAY `HTTP_1_1_REQUIRED`) | `cause` |
//! | `fanout_shed_total` (requests turned away by admission, 503 with `Retry-After`, by the JSON body's `code`: `overloaded` at the adaptive limit, `pool_full` at a fixed one, `queue_full` the line too long, `queue_timeout` waited as long as allowed) | `cause` |
//! | `fanout_shed_held_total` (shed answers held until `Retry-After`, or longer when many are held, because the client came back sooner on its connection) | |
//! | `fanout_queue_wait_seconds` (histogram, time spent in the admission line) | |
//! | `fanout_admission_limit` (gauge, the admission limit now: learnt when adaptive, the pool's size when fixed) | |
//! | `fanout_queue_length` (gauge, requests waiting in the admission line now) | |
//! | `fanout_shed_holding` (gauge, shed answers being held now: clients that came back sooner than `Retry-After`) | |
//! | `fanout_shed_pacing` (gauge, 1 while such sheds may be held, 0 while a probe found that holding them does not slow the load: see [`PacingProbe`](crate::admission::PacingProbe)) | |
//! | `fanout_guest_failures_total` (traps, limits, deadlines) | `cause` |
//! | `fanout_response_cache_lookups_total` (upstream GETs by how they were answered: hit, stale, coalesced, miss, pass) | `upstream`, `result` |
//! | `fanout_response_cache_evictions_total` (entries pushed out by the bounds) | `upstream` |
//! | `fanout_response_cache_bytes` (gauge, stored answers) | `upstream` |
//! | `fanout_log_lines_dropped_total` (log lines dropped because stdout's reader fell behind: see [`stdout_log`](crate::stdout_log); only with that log) | |

use crate::admission::Admission;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::{Arc, OnceLock};
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
    pub(crate) connections_open: Gauge,
    pub(crate) refused_heads: Family<CauseLabel, Counter>,
    pub(crate) instances_idle: Gauge,
    pub(crate) shed: Family<CauseLabel, Counter>,
    pub(crate) sheds_held: Counter,
    pub(crate) queue_wait: Histogram,
    pub(crate) failures: Family<CauseLabel, Counter>,
    pub(crate) response_cache_lookups: Family<CacheLabels, Counter>,
    pub(crate) response_cache_evictions: Family<UpstreamLabel, Counter>,
    pub(crate) response_cache_bytes: Family<UpstreamLabel, Gauge>,
    /// Where the limit, the line and the held sheds are read at each scrape.
    admission: Arc<OnceLock<Admission>>,
}

/// The admission's limit, line and held sheds, read when the metrics are
/// encoded: they change with every request, and only a scrape needs them
/// (the limit, set on a gauge at each answer, took the admission's lock a
/// second time per request).
struct AdmissionGauges(Arc<OnceLock<Admission>>);

// `Collector` asks for it; the admission's state is in the gauges.
impl std::fmt::Debug for AdmissionGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmissionGauges")
    }
}

impl Collector for AdmissionGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(admission) = self.0.get() else {
            return Ok(());
        };
        let gauges = [
            (
                "fanout_admission_limit",
                "Requests the admission lets run at once",
                admission.snapshot().0,
            ),
            (
                "fanout_queue_length",
                "Requests waiting in the admission line now",
                admission.waiting(),
            ),
            (
                "fanout_shed_holding",
                "Shed answers being held now, their clients having come back sooner than Retry-After",
                admission.held_sheds().held(),
            ),
            (
                "fanout_shed_pacing",
                "1 while sheds to clients back too soon may be held, 0 while holding them was found not to slow the load",
                usize::from(admission.pacing().holding()),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// The stdout log's dropped lines, read when the metrics are encoded: the
/// log belongs to the process, not to one host.
#[derive(Debug)]
struct LogDrops;

impl Collector for LogDrops {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(dropped) = crate::stdout_log::dropped_lines() else {
            return Ok(());
        };
        let counter = ConstCounter::new(dropped as u64);
        counter.encode(encoder.encode_descriptor(
            "fanout_log_lines_dropped",
            "Log lines dropped because the reader of stdout fell behind",
            None,
            counter.metric_type(),
        )?)
    }
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
        let connections_open = Gauge::default();
        let refused_heads = Family::<CauseLabel, Counter>::default();
        let instances_idle = Gauge::default();
        let shed = Family::<CauseLabel, Counter>::default();
        let sheds_held = Counter::default();
        let queue_wait = latency_histogram();
        let failures = Family::<CauseLabel, Counter>::default();
        let response_cache_lookups = Family::<CacheLabels, Counter>::default();
        let response_cache_evictions = Family::<UpstreamLabel, Counter>::default();
        let response_cache_bytes = Family::<UpstreamLabel, Gauge>::default();
        let admission = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(AdmissionGauges(admission.clone())));
        registry.register_collector(Box::new(LogDrops));
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
            "fanout_connections_open",
            "Client connections open on the aggregator's listener now",
            connections_open.clone(),
        );
        registry.register(
            "fanout_request_heads_refused",
            "Request heads the HTTP server refused before any handler ran, by cause: head_timeout (not finished within the header timeout), head_too_large (431 or 414), malformed (400), http2_preface (an HTTP/2 client on this HTTP/1.1 port)",
            refused_heads.clone(),
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
            connections_open,
            refused_heads,
            instances_idle,
            shed,
            sheds_held,
            queue_wait,
            failures,
            response_cache_lookups,
            response_cache_evictions,
            response_cache_bytes,
            admission,
        }
    }
}

impl Metrics {
    /// Reads the limit, the line's length and the held sheds from
    /// `admission` at each scrape. The first admission given stays.
    pub(crate) fn watch(&self, admission: &Admission) {
        let _ = self.admission.set(admission.clone());
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name` in `text`, if there is one.
    fn sample(text: &str, name: &str) -> Option<i64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn the_limit_the_line_and_the_held_sheds_are_read_at_each_scrape() {
        let metrics = Metrics::default();
        let admission = Admission::fixed(1);
        assert_eq!(sample(&metrics.encode(), "fanout_queue_length"), None);
        metrics.watch(&admission);
        let text = metrics.encode();
        assert_eq!(sample(&text, "fanout_admission_limit"), Some(1));
        assert_eq!(sample(&text, "fanout_queue_length"), Some(0));
        assert_eq!(sample(&text, "fanout_shed_holding"), Some(0));
        assert_eq!(sample(&text, "fanout_shed_pacing"), Some(1));

        let running = admission
            .admit(Duration::ZERO, None)
            .await
            .expect("a place");
        let line: Vec<_> = (0..2)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.admit(Duration::from_secs(5), None).await })
            })
            .collect();
        while admission.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        let held = admission.held_sheds().hold();
        let text = metrics.encode();
        assert_eq!(sample(&text, "fanout_queue_length"), Some(2), "{text}");
        assert_eq!(sample(&text, "fanout_shed_holding"), Some(1), "{text}");

        drop(held);
        drop(running);
        for waiter in line {
            // Each in turn takes the one place and gives it back.
            drop(waiter.await.expect("no panic").expect("admitted"));
        }
        let text = metrics.encode();
        assert_eq!(sample(&text, "fanout_queue_length"), Some(0));
        assert_eq!(sample(&text, "fanout_shed_holding"), Some(0));
    }
}
