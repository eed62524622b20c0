//! The load driver: a fixed number of requests in flight (closed loop), a
//! warm-up, then a measured window; latencies in HDR histograms.
//!
//! Each simulated client behaves as a well-behaved HTTP client does: after a
//! 503 with `Retry-After` it waits that long before its next request
//! ([`Backoff::RetryAfter`]). [`Backoff::None`] is the hostile client that
//! answers every 503 with a new request at once.

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A request that takes longer than this counts as a `timeout` error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client does after a 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// Waits as long as the header says (at most [`MAX_RETRY_AFTER`]).
    #[default]
    RetryAfter,
    /// Sends its next request at once.
    None,
}

/// The longest a client honours a `Retry-After`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// What one load run measured.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
#[serde(default)]
pub struct LoadResult {
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: u64,
    pub rps: f64,
    /// 2xx answers per second.
    pub goodput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// p99 of the non-2xx answers only.
    pub non_2xx_p99_ms: Option<f64>,
    /// p99 of the 2xx answers only.
    pub ok_p99_ms: Option<f64>,
    /// How the clients treated `Retry-After`.
    pub backoff: Backoff,
    /// Times a client waited because of a `Retry-After`.
    pub backoffs: u64,
    /// Requests that got no answer, by kind (timeout, connect, other).
    pub errors: BTreeMap<String, u64>,
    /// rps in each second of the window (for long runs).
    pub rps_per_second: Vec<u64>,
    /// 2xx answers to the requests sent in each second of the window.
    pub ok_per_second: Vec<u64>,
    /// The first body of each non-2xx status, to say what it was.
    pub samples: BTreeMap<u16, String>,
    /// Open loop: the arrival rate offered (`concurrency` is then the peak
    /// in flight).
    pub offered_rps: Option<f64>,
    /// Closed loop: clients that got no 2xx in the window (each sent at
    /// least one request in it).
    pub clients_without_2xx: Option<usize>,
    /// Closed loop: Jain's fairness index of the clients' 2xx counts, from
    /// 1/n (one client got every answer) to 1 (all got as many).
    pub fairness: Option<f64>,
}

/// Latencies of every client, in one place: a histogram is ~128 KiB,
/// and three per client at c=5000 had the driver spend its first seconds
/// zeroing 2 GB of fresh pages, a core's worth, while connections opened at
/// a few hundred a second. One lock per answer costs far less.
struct Latencies {
    all: Histogram<u64>,
    failed: Histogram<u64>,
    ok: Histogram<u64>,
}

struct TaskStats {
    backoffs: u64,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    per_second: Vec<u64>,
    ok_per_second: Vec<u64>,
    samples: BTreeMap<u16, String>,
}

pub(crate) fn histogram() -> Histogram<u64> {
    // Microseconds, up to the request timeout, 3 significant digits.
    Histogram::new_with_bounds(1, REQUEST_TIMEOUT.as_micros() as u64 * 2, 3).expect("bounds")
}

/// The URLs closed-loop clients ask for.
#[derive(Clone, Debug)]
pub enum Urls {
    /// The same one every time.
    One(http::Uri),
    /// Hot keys: [`HOT_SHARE`] of the requests on ten products, the rest
    /// spread over a million (each seen about once).
    HotKeys { base: String },
}

/// The share of hot-key requests that ask for one of the ten hot ids.
pub const HOT_SHARE: f64 = 0.9;

impl Urls {
    pub fn one(url: &str) -> Urls {
        Urls::One(url.parse().expect("a valid URL"))
    }

    fn pick(&self) -> http::Uri {
        match self {
            Urls::One(uri) => uri.clone(),
            Urls::HotKeys { base } => {
                let id = if fastrand::f64() < HOT_SHARE {
                    fastrand::u32(1..=10)
                } else {
                    fastrand::u32(11..=1_000_000)
                };
                format!("{base}/products/{id}")
                    .parse()
                    .expect("a valid URL")
            }
        }
    }
}

/// Keeps `concurrency` requests to `urls` in flight for `warmup + measure`,
/// recording only those sent during `measure`.
pub async fn run(
    urls: Urls,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    label: &str,
    backoff: Backoff,
) -> LoadResult {
    // Each client keeps a connection of its own, as wrk's and k6's do: a
    // client's requests are then told apart from another's by the server.
    let client = || -> Client<HttpConnector, Empty<Bytes>> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector)
    };
    let start = Instant::now() + warmup;
    let end = start + measure;
    let progress = ProgressBar::new(measure.as_secs().max(1));
    progress.set_style(
        ProgressStyle::with_template("{prefix:>32} [{bar:30}] {pos}/{len}s {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    progress.set_prefix(label.to_string());
    let ticker = {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if Instant::now() > start {
                    progress.inc(1);
                }
            }
        })
    };
    let seconds = measure.as_secs().max(1) as usize + 1;
    let latencies = std::sync::Arc::new(std::sync::Mutex::new(Latencies {
        all: histogram(),
        failed: histogram(),
        ok: histogram(),
    }));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client();
            let urls = urls.clone();
            let latencies = latencies.clone();
            tokio::spawn(async move {
                let mut stats = TaskStats {
                    backoffs: 0,
                    statuses: BTreeMap::new(),
                    errors: BTreeMap::new(),
                    per_second: vec![0; seconds],
                    ok_per_second: vec![0; seconds],
                    samples: BTreeMap::new(),
                };
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        let response = client.get(urls.pick()).await?;
                        let status = response.status().as_u16();
                        let retry_after = response
                            .headers()
                            .get(http::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                            .map(Duration::from_secs);
                        let body = response.into_body().collect().await?.to_bytes();
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                            status,
                            body,
                            retry_after,
                        ))
                    })
                    .await;
                    let took = sent.elapsed().as_micros() as u64;
                    let wait = match &outcome {
                        Ok(Ok((503, _, Some(after)))) if backoff == Backoff::RetryAfter => {
                            Some((*after).min(MAX_RETRY_AFTER))
                        }
                        _ => None,
                    };
                    if let Some(wait) = wait {
                        if sent >= start {
                            stats.backoffs += 1;
                        }
                        // Never past the end of the window.
                        let until = (Instant::now() + wait).min(end);
                        tokio::time::sleep_until(until.into()).await;
                    }
                    if sent < start {
                        continue;
                    }
                    match outcome {
                        Ok(Ok((status, body, _))) => {
                            if !(200..300).contains(&status) {
                                stats.samples.entry(status).or_insert_with(|| {
                                    String::from_utf8_lossy(&body[..body.len().min(300)])
                                        .into_owned()
                                });
                            }
                            {
                                let mut latencies =
                                    latencies.lock().unwrap_or_else(|e| e.into_inner());
                                let _ = latencies.all.record(took.max(1));
                                if !(200..300).contains(&status) {
                                    let _ = latencies.failed.record(took.max(1));
                                } else {
                                    let _ = latencies.ok.record(took.max(1));
                                }
                            }
                            *stats.statuses.entry(status).or_default() += 1;
                            let second = (sent - start).as_secs() as usize;
                            if let Some(slot) = stats.per_second.get_mut(second) {
                                *slot += 1;
                            }
                            if (200..300).contains(&status)
                                && let Some(slot) = stats.ok_per_second.get_mut(second)
                            {
                                *slot += 1;
                            }
                        }
                        Ok(Err(e)) => {
                            *stats.errors.entry(error_kind(&*e).into()).or_default() += 1;
                            // A refused connection would spin: back off a little.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(_) => *stats.errors.entry("timeout".into()).or_default() += 1,
                    }
                }
                stats
            })
        })
        .collect();
    let mut backoffs = 0;
    let mut statuses = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut per_second = vec![0u64; seconds];
    let mut ok_per_second = vec![0u64; seconds];
    let mut samples = BTreeMap::new();
    let mut ok_per_client = Vec::with_capacity(concurrency);
    for task in tasks {
        let Ok(stats) = task.await else { continue };
        backoffs += stats.backoffs;
        if stats.statuses.values().sum::<u64>() > 0 {
            ok_per_client.push(
                stats
                    .statuses
                    .iter()
                    .filter(|(s, _)| (200..300).contains(*s))
                    .map(|(_, n)| *n)
                    .sum::<u64>(),
            );
        }
        for (k, v) in stats.statuses {
            *statuses.entry(k).or_default() += v;
        }
        for (k, v) in stats.errors {
            *errors.entry(k).or_default() += v;
        }
        for (k, v) in stats.samples {
            samples.entry(k).or_insert(v);
        }
        for (slot, v) in per_second.iter_mut().zip(stats.per_second) {
            *slot += v;
        }
        for (slot, v) in ok_per_second.iter_mut().zip(stats.ok_per_second) {
            *slot += v;
        }
    }
    ticker.abort();
    progress.finish_and_clear();
    per_second.truncate(measure.as_secs() as usize);
    ok_per_second.truncate(measure.as_secs() as usize);
    let latencies = latencies.lock().unwrap_or_else(|e| e.into_inner());
    LoadResult {
        concurrency,
        backoff,
        backoffs,
        errors,
        rps_per_second: per_second,
        ok_per_second,
        samples,
        clients_without_2xx: Some(ok_per_client.iter().filter(|n| **n == 0).count()),
        fairness: jain_index(&ok_per_client),
        ..LoadResult::from_latencies(
            measure,
            &latencies.all,
            &latencies.ok,
            &latencies.failed,
            statuses,
        )
    }
}

impl LoadResult {
    /// The rates and percentiles of a window of `measure` from its latency
    /// histograms (all answers, 2xx, the rest) and its answers by status;
    /// the other fields are left to the driver.
    pub fn from_latencies(
        measure: Duration,
        all: &Histogram<u64>,
        ok: &Histogram<u64>,
        failed: &Histogram<u64>,
        statuses: BTreeMap<u16, u64>,
    ) -> LoadResult {
        let secs = measure.as_secs_f64();
        let ms = |us: u64| us as f64 / 1e3;
        let good: u64 = statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        LoadResult {
            seconds: secs,
            requests: all.len(),
            rps: all.len() as f64 / secs,
            goodput: good as f64 / secs,
            p50_ms: ms(all.value_at_quantile(0.5)),
            p90_ms: ms(all.value_at_quantile(0.9)),
            p99_ms: ms(all.value_at_quantile(0.99)),
            p999_ms: ms(all.value_at_quantile(0.999)),
            max_ms: ms(all.max()),
            statuses,
            non_2xx_p99_ms: (!failed.is_empty()).then(|| ms(failed.value_at_quantile(0.99))),
            ok_p99_ms: (!ok.is_empty()).then(|| ms(ok.value_at_quantile(0.99))),
            ..LoadResult::default()
        }
    }
}

/// Jain's fairness index of `counts`: (Σx)² / (n·Σx²). `None` for no
/// clients or no answers at all.
pub fn jain_index(counts: &[u64]) -> Option<f64> {
    let n = counts.len() as f64;
    let sum: f64 = counts.iter().map(|&x| x as f64).sum();
    let squares: f64 = counts.iter().map(|&x| (x as f64) * (x as f64)).sum();
    (squares > 0.0).then(|| sum * sum / (n * squares))
}

/// How a request that got no answer failed: `connect` or `other`.
pub fn error_kind(e: &(dyn std::error::Error + Send + Sync)) -> &'static str {
    // hyper-util's client error says "Connect" in its debug form only.
    if format!("{e:?}").contains("Connect") {
        "connect"
    } else {
        "other"
    }
}

/// One GET whose answer is a JSON number (the upstreams' `/calls`).
pub async fn get_number(url: &str) -> anyhow::Result<u64> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client.get(url.parse()?).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// One GET, its status.
pub async fn get_once(url: &str) -> anyhow::Result<u16> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client.get(url.parse()?).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_keys_ask_for_ten_products_nine_times_in_ten() {
        let urls = Urls::HotKeys {
            base: "http://fanout".into(),
        };
        let n = 20_000;
        let hot = (0..n)
            .filter(|_| {
                let uri = urls.pick();
                let id: u32 = uri
                    .path()
                    .strip_prefix("/products/")
                    .unwrap()
                    .parse()
                    .unwrap();
                id <= 10
            })
            .count();
        let share = hot as f64 / n as f64;
        assert!((share - HOT_SHARE).abs() < 0.02, "{share}");
        assert_eq!(
            Urls::one("http://x/products/42").pick().path(),
            "/products/42"
        );
    }

    #[test]
    fn jain_index_runs_from_one_client_served_to_all_served_alike() {
        assert_eq!(jain_index(&[]), None, "no clients");
        assert_eq!(jain_index(&[0, 0, 0]), None, "no answers");
        assert_eq!(jain_index(&[7, 7, 7, 7]), Some(1.0), "all alike");
        assert_eq!(jain_index(&[12, 0, 0, 0]), Some(0.25), "one of four: 1/n");
        // Half the clients served, alike: 1/2.
        assert_eq!(jain_index(&[5, 5, 0, 0]), Some(0.5));
    }
}
