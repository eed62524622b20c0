//! The layer against a scripted upstream, on tokio's paused clock: calls
//! counted at the upstream, lifetimes to the millisecond.

use super::*;
use crate::guard::GuardedService;
use crate::metrics::Metrics;
use crate::response::full_body;
use crate::upstream::{Call, TransportError, UpstreamBody};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use wasmtime_wasi_http::RequestOptions;

/// What the scripted upstream answers, and what it was asked.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    answer: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

#[derive(Clone)]
struct Script {
    delay: Duration,
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
}

impl Upstream {
    fn new(delay_ms: u64, headers: &[(&'static str, &'static str)]) -> Upstream {
        Upstream {
            calls: Arc::default(),
            answer: Arc::new(Mutex::new(Script {
                delay: Duration::from_millis(delay_ms),
                status: 200,
                headers: headers.to_vec(),
                body: r#"{"amount":12.5}"#.into(),
            })),
            seen: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn set(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.answer.lock().unwrap());
    }

    /// The service, honouring the caller's first-byte timeout as the
    /// http adapter does. Each answer's body says which call it was.
    fn service(&self) -> GuardedService {
        let this = self.clone();
        BoxCloneSyncService::new(tower::service_fn(move |call: Call| {
            let this = this.clone();
            async move {
                let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                this.seen
                    .lock()
                    .unwrap()
                    .push(call.request.headers().clone());
                let script = this.answer.lock().unwrap().clone();
                let wait = tokio::time::sleep(script.delay);
                match call.options.first_byte_timeout {
                    Some(limit) => tokio::time::timeout(limit, wait)
                        .await
                        .map_err(|_| TransportError::ConnectionReadTimeout)?,
                    None => wait.await,
                }
                let mut response = Response::new(full_body(format!("{}#{n}", script.body)));
                *response.status_mut() = StatusCode::from_u16(script.status).unwrap();
                for (name, value) in script.headers {
                    response.headers_mut().append(name, value.parse().unwrap());
                }
                Ok::<_, tower::BoxError>(response)
            }
        }))
    }
}

struct Cache {
    layer: ResponseCacheLayer,
    service: GuardedService,
    metrics: Arc<Metrics>,
}

fn layered(upstream: &Upstream, config: Option<ResponseCacheConfig>) -> Cache {
    let metrics = Arc::new(Metrics::default());
    let layer = ResponseCacheLayer::new("pricing", config, metrics.clone());
    let service = GuardedService::new(layer.layer(upstream.service()));
    Cache {
        layer,
        service,
        metrics,
    }
}

fn ttl(ms: u64) -> Option<ResponseCacheConfig> {
    Some(ResponseCacheConfig {
        ttl: Duration::from_millis(ms),
        ..ResponseCacheConfig::default()
    })
}

fn get(path: &str, headers: &[(&str, &str)], timeout_ms: Option<u64>) -> Call {
    let mut request = Request::get(format!("http://pricing.test{path}"))
        .body(full_body(Bytes::new()))
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    Call {
        request,
        options: RequestOptions {
            first_byte_timeout: timeout_ms.map(Duration::from_millis),
            ..RequestOptions::default()
        },
        attempt: 1,
    }
}

/// One call through the cache: status, how it was answered, `Age`, body.
struct Got {
    status: StatusCode,
    cache: Option<CacheStatus>,
    age: Option<u64>,
    body: String,
}

async fn call(cache: &Cache, call: Call) -> Result<Got, TransportError> {
    let response = cache
        .service
        .clone()
        .oneshot(call)
        .await
        .map_err(crate::error::guarded_error_code)?;
    let status = response.status();
    let cache = response.extensions().get::<CacheStatus>().copied();
    let age = response
        .headers()
        .get("age")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body: UpstreamBody = response.into_body();
    let bytes = body.collect().await?.to_bytes();
    Ok(Got {
        status,
        cache,
        age,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    })
}

async fn wave(cache: &Cache, n: usize, headers: &[(&str, &str)]) -> Vec<Got> {
    let calls = (0..n).map(|_| call(cache, get("/pricing/42", headers, Some(1000))));
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|got| got.expect("answered"))
        .collect()
}

fn counted(gots: &[Got], status: CacheStatus) -> usize {
    gots.iter().filter(|g| g.cache == Some(status)).count()
}

fn lookups(metrics: &Metrics, result: &str) -> u64 {
    let text = metrics.encode();
    let prefix =
        format!("fanout_response_cache_lookups_total{{upstream=\"pricing\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(start_paused = true)]
async fn fifty_identical_calls_in_flight_make_one() {
    let upstream = Upstream::new(50, &[]);
    // Coalescing alone: no cache configured.
    let cache = layered(&upstream, None);
    let gots = wave(&cache, 50, &[]).await;
    assert_eq!(upstream.calls(), 1);
    assert!(
        gots.iter()
            .all(|g| g.status == 200 && g.body.ends_with("#1"))
    );
    assert_eq!(counted(&gots, CacheStatus::Miss), 1);
    assert_eq!(counted(&gots, CacheStatus::Coalesced), 49);
    assert_eq!(lookups(&cache.metrics, "coalesced"), 49);
    // Nothing stored: the next wave calls again.
    wave(&cache, 5, &[]).await;
    assert_eq!(upstream.calls(), 2);
    assert_eq!(cache.layer.usage().1, 0, "nothing but bookkeeping stored");
}

#[tokio::test(start_paused = true)]
async fn a_stored_answer_is_served_until_its_ttl_then_fetched_once() {
    let upstream = Upstream::new(50, &[]);
    let cache = layered(&upstream, ttl(1000));
    assert_eq!(wave(&cache, 50, &[]).await.len(), 50);
    assert_eq!(upstream.calls(), 1);
    tokio::time::advance(Duration::from_millis(400)).await;
    let gots = wave(&cache, 50, &[]).await;
    assert_eq!(counted(&gots, CacheStatus::Hit), 50);
    assert_eq!(upstream.calls(), 1);
    tokio::time::advance(Duration::from_millis(600)).await;
    let gots = wave(&cache, 50, &[]).await;
    assert_eq!(upstream.calls(), 2, "one call after the ttl");
    assert!(gots.iter().all(|g| g.body.ends_with("#2")));
}

#[tokio::test(start_paused = true)]
async fn the_upstreams_max_age_wins_and_age_is_told() {
    let upstream = Upstream::new(0, &[("cache-control", "max-age=60"), ("age", "10")]);
    let cache = layered(&upstream, ttl(1000));
    let first = call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    assert_eq!(first.age, Some(10));
    tokio::time::advance(Duration::from_secs(30)).await;
    let later = call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    assert_eq!(later.cache, Some(CacheStatus::Hit));
    assert_eq!(later.age, Some(40));
    assert_eq!(upstream.calls(), 1);
    tokio::time::advance(Duration::from_secs(21)).await;
    call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    assert_eq!(upstream.calls(), 2, "stale at 60 s of age");
}

#[tokio::test(start_paused = true)]
async fn no_store_private_and_errors_are_never_served_to_another_call() {
    for (status, headers) in [
        (200, vec![("cache-control", "no-store")]),
        (200, vec![("cache-control", "private, max-age=60")]),
        (200, vec![("set-cookie", "session=1")]),
        (503, vec![]),
    ] {
        let upstream = Upstream::new(50, &[]);
        upstream.set(|s| {
            s.status = status;
            s.headers = headers.clone();
        });
        let cache = layered(&upstream, ttl(60_000));
        let gots = wave(&cache, 10, &[]).await;
        assert_eq!(upstream.calls(), 10, "{headers:?} {status}");
        let bodies: std::collections::HashSet<_> = gots.iter().map(|g| &g.body).collect();
        assert_eq!(bodies.len(), 10, "each its own answer: {headers:?}");
        // Remembered as never shareable: the next callers go straight
        // upstream (50 ms), not through a leader first (100 ms). A 5xx is
        // only not shareable this time: they wait for a leader again.
        let started = tokio::time::Instant::now();
        wave(&cache, 3, &[]).await;
        assert_eq!(upstream.calls(), 13, "{headers:?} {status}");
        let expected = if status == 503 { 100 } else { 50 };
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(expected),
            "{headers:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn vary_keeps_languages_apart() {
    let upstream = Upstream::new(10, &[("vary", "Accept-Language")]);
    let cache = layered(&upstream, ttl(60_000));
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    let first_en = call(&cache, get("/p", &en, None)).await.unwrap();
    let first_fr = call(&cache, get("/p", &fr, None)).await.unwrap();
    assert_eq!(upstream.calls(), 2);
    assert_ne!(first_en.body, first_fr.body);
    for _ in 0..3 {
        assert_eq!(
            call(&cache, get("/p", &en, None)).await.unwrap().body,
            first_en.body
        );
        assert_eq!(
            call(&cache, get("/p", &fr, None)).await.unwrap().body,
            first_fr.body
        );
    }
    // No language at all is a variant of its own.
    call(&cache, get("/p", &[], None)).await.unwrap();
    assert_eq!(upstream.calls(), 3);
    // Waiting French callers do not take an English answer in flight.
    let upstream = Upstream::new(50, &[("vary", "accept-language")]);
    let cache = layered(&upstream, None);
    let (english, french) = tokio::join!(wave(&cache, 5, &en), wave(&cache, 5, &fr));
    let english: std::collections::HashSet<_> = english.iter().map(|g| &g.body).collect();
    let french: std::collections::HashSet<_> = french.iter().map(|g| &g.body).collect();
    assert!(english.is_disjoint(&french), "{english:?} {french:?}");
    let seen = upstream.seen.lock().unwrap().clone();
    assert!(seen.iter().any(|h| h["accept-language"] == "fr"));
}

#[tokio::test(start_paused = true)]
async fn a_callers_credentials_are_never_served_to_another() {
    let upstream = Upstream::new(50, &[("cache-control", "max-age=60")]);
    let cache = layered(&upstream, ttl(60_000));
    let alice = [("authorization", "Bearer alice")];
    let bob = [("authorization", "Bearer bob")];
    let (a, b, anonymous) = tokio::join!(
        wave(&cache, 3, &alice),
        wave(&cache, 3, &bob),
        wave(&cache, 3, &[])
    );
    assert_eq!(
        upstream.calls(),
        3 + 3 + 1,
        "credentials bypass; anonymous coalesce"
    );
    let a: std::collections::HashSet<_> = a.iter().map(|g| g.body.clone()).collect();
    assert!(b.iter().all(|g| !a.contains(&g.body)));
    assert!(anonymous.iter().all(|g| !a.contains(&g.body)));
    assert_eq!(counted(&anonymous, CacheStatus::Coalesced), 2);
    // A stored anonymous answer is not given to an authorised caller either.
    let with_cookie = call(&cache, get("/pricing/42", &[("cookie", "s=1")], None))
        .await
        .unwrap();
    assert_eq!(with_cookie.cache, Some(CacheStatus::Pass));
    // Unless the upstream is declared shared.
    let upstream = Upstream::new(50, &[]);
    let shared = layered(
        &upstream,
        Some(ResponseCacheConfig {
            shared: true,
            ..ttl(60_000).unwrap()
        }),
    );
    wave(&shared, 3, &alice).await;
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn waiters_outlive_a_leader_that_times_out() {
    let upstream = Upstream::new(100, &[]);
    let cache = layered(&upstream, None);
    let started = tokio::time::Instant::now();
    // The leader gives the upstream 20 ms; the waiters 500 ms.
    let leader = call(&cache, get("/pricing/42", &[], Some(20)));
    let waiters = async {
        tokio::task::yield_now().await;
        futures_util::future::join_all(
            (0..5).map(|_| call(&cache, get("/pricing/42", &[], Some(500)))),
        )
        .await
    };
    let (leader, waiters) = tokio::join!(leader, waiters);
    assert!(matches!(leader, Err(TransportError::ConnectionReadTimeout)));
    let waiters: Vec<Got> = waiters.into_iter().map(|w| w.unwrap()).collect();
    assert!(
        waiters
            .iter()
            .all(|w| w.status == 200 && w.body.ends_with("#2"))
    );
    assert_eq!(counted(&waiters, CacheStatus::Coalesced), 4);
    assert_eq!(
        upstream.calls(),
        2,
        "the timed-out call, then one for the rest"
    );
    // 20 ms lost to the first leader, then one 100 ms call.
    assert_eq!(started.elapsed(), Duration::from_millis(120));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_keeps_its_own_deadline() {
    let upstream = Upstream::new(100, &[]);
    let cache = layered(&upstream, None);
    let leader = call(&cache, get("/pricing/42", &[], Some(1000)));
    let impatient = async {
        tokio::task::yield_now().await;
        call(&cache, get("/pricing/42", &[], Some(30))).await
    };
    let (leader, impatient) = tokio::join!(leader, impatient);
    assert_eq!(leader.unwrap().status, 200);
    assert!(matches!(
        impatient,
        Err(TransportError::ConnectionReadTimeout)
    ));
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_leader_hands_the_lead_to_a_waiter() {
    let upstream = Upstream::new(100, &[]);
    let cache = layered(&upstream, None);
    let leader = tokio::spawn({
        let service = cache.service.clone();
        async move { service.oneshot(get("/pricing/42", &[], None)).await }
    });
    tokio::task::yield_now().await;
    let waiter = tokio::spawn({
        let service = cache.service.clone();
        async move { service.oneshot(get("/pricing/42", &[], None)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    let answer = waiter.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Miss)
    );
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_answers_are_served_while_one_call_refreshes_them() {
    let upstream = Upstream::new(50, &[]);
    let cache = layered(
        &upstream,
        Some(ResponseCacheConfig {
            ttl: Duration::from_millis(1000),
            stale_while_revalidate: Duration::from_millis(5000),
            ..ResponseCacheConfig::default()
        }),
    );
    call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    tokio::time::advance(Duration::from_millis(1500)).await;
    let started = tokio::time::Instant::now();
    let gots = wave(&cache, 20, &[]).await;
    assert_eq!(started.elapsed(), Duration::ZERO, "served at once");
    assert_eq!(counted(&gots, CacheStatus::Stale), 20);
    assert!(gots.iter().all(|g| g.body.ends_with("#1")));
    // One refresh in the background.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(upstream.calls(), 2);
    let fresh = call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    assert_eq!(fresh.cache, Some(CacheStatus::Hit));
    assert!(fresh.body.ends_with("#2"));
    // Past the stale window, a caller waits for a call of its own again.
    tokio::time::advance(Duration::from_millis(7000)).await;
    let late = call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    assert_eq!(late.cache, Some(CacheStatus::Miss));
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_distinct_keys_stays_within_the_bounds() {
    let upstream = Upstream::new(0, &[]);
    upstream.set(|s| s.body = "x".repeat(1000));
    let config = ResponseCacheConfig {
        ttl: Duration::from_secs(60),
        max_entries: 500,
        max_bytes: 256 << 10,
        max_entry_bytes: 4 << 10,
        ..ResponseCacheConfig::default()
    };
    let cache = layered(&upstream, Some(config));
    for id in 0..5_000 {
        call(&cache, get(&format!("/pricing/{id}"), &[], None))
            .await
            .unwrap();
    }
    let (entries, weight) = cache.layer.usage();
    assert!(weight <= 256 << 10, "{weight}");
    assert!(entries <= 500, "{entries}");
    let text = cache.metrics.encode();
    let gauge = text
        .lines()
        .find_map(|l| l.strip_prefix("fanout_response_cache_bytes{upstream=\"pricing\"} "))
        .unwrap();
    assert!(gauge.parse::<u64>().unwrap() <= 256 << 10, "{gauge}");
    assert!(text.contains("fanout_response_cache_evictions_total{upstream=\"pricing\"}"));
    // An answer over max_entry_kib is passed on whole, never stored.
    upstream.set(|s| s.body = "y".repeat(10_000));
    let big = call(&cache, get("/big", &[], None)).await.unwrap();
    assert_eq!(big.body.len(), 10_000 + "#5001".len());
    call(&cache, get("/big", &[], None)).await.unwrap();
    assert_eq!(upstream.calls(), 5_002);
}

#[tokio::test(start_paused = true)]
async fn only_plain_gets_are_shared() {
    let upstream = Upstream::new(10, &[]);
    let cache = layered(&upstream, ttl(60_000));
    let mut post = get("/pricing/42", &[], None);
    *post.request.method_mut() = http::Method::POST;
    call(&cache, post).await.unwrap();
    call(
        &cache,
        get("/pricing/42", &[("cache-control", "no-cache")], None),
    )
    .await
    .unwrap();
    assert_eq!(upstream.calls(), 2);
    call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    call(&cache, get("/pricing/42", &[], None)).await.unwrap();
    assert_eq!(upstream.calls(), 3);
}
