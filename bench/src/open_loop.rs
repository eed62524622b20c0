//! The open-loop driver: requests arrive at a constant rate whatever the
//! server does, as with wrk2 or k6's constant-arrival-rate, so a slow answer
//! does not hold back the next request (no coordinated omission). Each
//! latency is counted from when its request was due, not from when it
//! could be sent.
//!
//! Requests share a pool of keep-alive connections, as k6's virtual users
//! do: a connection free when a request is due is reused, else a new one
//! is opened.

use crate::driver::{Backoff, LoadResult, REQUEST_TIMEOUT, histogram};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests in flight beyond which the driver stops sending (and counts
/// what it did not send), so that a stalled server cannot make the driver
/// itself run out of sockets.
pub const MAX_IN_FLIGHT: usize = 10_000;

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    samples: BTreeMap<u16, String>,
    per_second: Vec<u64>,
}

/// Sends `rate` requests a second to `url` for `warmup + measure`,
/// recording those due during `measure`.
pub async fn run(url: &str, rate: f64, warmup: Duration, measure: Duration) -> LoadResult {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build(connector);
    let uri: http::Uri = url.parse().expect("a valid URL");
    let all = Arc::new(Mutex::new(histogram()));
    let ok = Arc::new(Mutex::new(histogram()));
    let failed = Arc::new(Mutex::new(histogram()));
    let tally = Arc::new(Mutex::new(Tally {
        per_second: vec![0; measure.as_secs() as usize + 1],
        ..Tally::default()
    }));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let start = t0 + warmup;
    let end = start + measure;
    let gap = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    let mut not_sent = 0u64;
    let mut n: u32 = 0;
    loop {
        // Every request due by now goes out now, each timed from when it
        // was due: timers tick by the millisecond, rates run to thousands.
        let due = t0 + gap * n;
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        n += 1;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            if due >= start {
                not_sent += 1;
            }
            continue;
        }
        let now_in_flight = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        peak.fetch_max(now_in_flight, Ordering::Relaxed);
        let (client, uri) = (client.clone(), uri.clone());
        let (all, ok, failed, tally, in_flight) = (
            all.clone(),
            ok.clone(),
            failed.clone(),
            tally.clone(),
            in_flight.clone(),
        );
        tasks.spawn(async move {
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let response = client.get(uri).await?;
                let status = response.status().as_u16();
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
            })
            .await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if due < start {
                return;
            }
            let took = (due.elapsed().as_micros() as u64).max(1);
            let mut tally = tally.lock().unwrap();
            match outcome {
                Ok(Ok((status, body))) => {
                    let _ = all.lock().unwrap().record(took);
                    if (200..300).contains(&status) {
                        let _ = ok.lock().unwrap().record(took);
                    } else {
                        let _ = failed.lock().unwrap().record(took);
                        tally.samples.entry(status).or_insert_with(|| {
                            String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
                        });
                    }
                    *tally.statuses.entry(status).or_default() += 1;
                    let second = (due - start).as_secs() as usize;
                    if let Some(slot) = tally.per_second.get_mut(second) {
                        *slot += 1;
                    }
                }
                Ok(Err(e)) => {
                    *tally
                        .errors
                        .entry(crate::driver::error_kind(&*e).into())
                        .or_default() += 1;
                }
                Err(_) => *tally.errors.entry("timeout".into()).or_default() += 1,
            }
        });
        // Reap finished tasks as we go: a JoinSet keeps their results.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut tally = std::mem::take(&mut *tally.lock().unwrap());
    if not_sent > 0 {
        tally.errors.insert("not_sent".into(), not_sent);
    }
    tally.per_second.truncate(measure.as_secs() as usize);
    let (all, ok, failed) = (
        all.lock().unwrap().clone(),
        ok.lock().unwrap().clone(),
        failed.lock().unwrap().clone(),
    );
    LoadResult {
        concurrency: peak.load(Ordering::Relaxed),
        backoff: Backoff::None,
        errors: tally.errors,
        rps_per_second: tally.per_second,
        samples: tally.samples,
        offered_rps: Some(rate),
        ..LoadResult::from_latencies(measure, &all, &ok, &failed, tally.statuses)
    }
}
