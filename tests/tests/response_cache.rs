//! Request coalescing and the response cache end to end: the built-in guest
//! under the fanout host, upstreams counting their calls. (The cache's
//! rules, to the millisecond, are unit tests in `host/src/response_cache`.)

use anyhow::Result;
use fanout_host::response_cache::ResponseCacheConfig;
use fanout_tests::{MS, ProductUpstreams, TestHost};
use http::StatusCode;
use std::time::Duration;

async fn wave(host: &TestHost, n: usize) -> Result<()> {
    let answers = futures_util::future::join_all((0..n).map(|_| host.get("/products/42"))).await;
    for answer in answers {
        let answer = answer?;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        assert_eq!(answer.json["degraded"], serde_json::json!([]));
    }
    Ok(())
}

/// The product route with room to spare: a loaded machine (CI, two cores,
/// tests in parallel) must not turn the slow upstreams that keep calls in
/// flight together into timeouts.
fn patient(builder: fanout_host::FanoutBuilder) -> fanout_host::FanoutBuilder {
    let upstream = |name: &str, field: &str, required: bool| {
        serde_json::json!({"name": name, "url": format!("{{base}}/{name}/{{id}}"),
            "field": field, "required": required, "timeout_ms": 1400})
    };
    let config = serde_json::json!({
        "deadline_ms": 1500, "max_deadline_ms": 1500,
        "routes": [{"path": "/products/{id}", "upstreams": [
            upstream("inventory", "inventory", true),
            upstream("pricing", "price", true),
            upstream("reviews", "reviews", false),
        ]}]
    });
    builder
        .env("FANOUT_CONFIG", config.to_string())
        // All of a wave admitted at once, whatever the adaptive limit learnt.
        .admission(fanout_host::AdmissionMode::Fixed)
}

fn calls(upstreams: &ProductUpstreams) -> [usize; 3] {
    [
        upstreams.inventory.calls().len(),
        upstreams.pricing.calls().len(),
        upstreams.reviews.calls().len(),
    ]
}

/// A series with a label appears from its first count: absent is 0.
fn metric(host: &TestHost, name_and_labels: &str) -> u64 {
    host.metric(name_and_labels).map_or(0, |n| n as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_make_one_call_per_upstream() -> Result<()> {
    // Slow enough that all fifty are in flight together.
    let upstreams = ProductUpstreams::start(MS(400)).await?;
    let fanout = patient(upstreams.builder()).build()?;
    let host = TestHost::start(fanout).await?;
    wave(&host, 50).await?;
    assert_eq!(calls(&upstreams), [1, 1, 1], "coalescing is on by default");
    assert_eq!(
        metric(
            &host,
            "fanout_response_cache_lookups_total{upstream=\"pricing\",result=\"coalesced\"}"
        ),
        49
    );
    // Nothing is stored without a cache: the next wave calls once more.
    wave(&host, 50).await?;
    assert_eq!(calls(&upstreams), [2, 2, 2]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_can_be_turned_off() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(400)).await?;
    let fanout = patient(upstreams.builder())
        .coalescing(false)
        .coalesce("reviews", true)
        .build()?;
    let host = TestHost::start(fanout).await?;
    wave(&host, 10).await?;
    assert_eq!(calls(&upstreams), [10, 10, 1], "only reviews coalesces");
    Ok(())
}

#[tokio::test]
async fn a_cached_upstream_is_not_called_again_within_its_ttl() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    let upstreams = ProductUpstreams::start(MS(300)).await?;
    let fanout = patient(upstreams.builder())
        .response_cache(
            "pricing",
            ResponseCacheConfig {
                ttl: Duration::from_secs(60),
                ..ResponseCacheConfig::default()
            },
        )
        .build()?;
    let host = TestHost::start(fanout).await?;
    wave(&host, 20).await?;
    wave(&host, 20).await?;
    let [inventory, pricing, reviews] = calls(&upstreams);
    assert_eq!(pricing, 1, "stored after the first call");
    assert_eq!((inventory, reviews), (2, 2), "coalesced, not stored");
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.json["price"]["amount"], 12.5);
    assert_eq!(upstreams.pricing.calls().len(), 1);
    assert_eq!(
        metric(
            &host,
            "fanout_response_cache_lookups_total{upstream=\"pricing\",result=\"hit\"}"
        ),
        20 + 1
    );
    assert!(metric(&host, "fanout_response_cache_bytes{upstream=\"pricing\"}") > 0);
    // The access line says which calls were answered without one.
    let access = logs
        .events()
        .into_iter()
        .rfind(|e| e["message"] == "request")
        .expect("an access line");
    let summary = access["upstreams"].as_str().unwrap_or_default().to_string();
    assert!(
        summary
            .split(' ')
            .any(|call| call.starts_with("pricing:ok:") && call.ends_with(":hit")),
        "{access}"
    );
    Ok(())
}
