//! Instance reuse (`Limits::instance_reuse`): a worker serves requests one
//! after another, each under its own limits, and is retired after its
//! allowance of requests or any failure; nothing of one request reaches
//! the next through the host or the built-in guest.

use anyhow::Result;
use fanout_host::{AdmissionMode, Fanout, Limits};
use fanout_tests::{MS, ProductUpstreams, TestHost};
use http::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// The hostile guest in one pool slot, so that every request runs in the
/// one worker there is, for as long as it lives.
async fn hostile(limits: Limits) -> Result<TestHost> {
    let fanout = Fanout::builder()
        .component_path(fanout_tests::HOSTILE_COMPONENT_PATH)
        .cache_dir(fanout_tests::cache_dir())
        .limits(Limits {
            max_instances: 1,
            ..limits
        })
        .admission(AdmissionMode::Fixed)
        .build()?;
    TestHost::start(fanout).await
}

fn reuse(n: u32) -> Limits {
    Limits {
        instance_reuse: n,
        memory_bytes: 16 << 20,
        deadline: Duration::from_secs(2),
        ..Limits::default()
    }
}

/// What the instance's previous `/remember` kept (`null` in a fresh one).
async fn remember(host: &TestHost, text: &str) -> Result<Value> {
    let answer = host.get(&format!("/remember?{text}")).await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    Ok(answer.json["previous"].clone())
}

#[tokio::test]
async fn a_worker_serves_its_allowance_of_requests_then_a_fresh_one_takes_over() -> Result<()> {
    let host = hostile(reuse(3)).await?;
    assert_eq!(remember(&host, "a").await?, Value::Null);
    assert_eq!(remember(&host, "b").await?, "a");
    assert_eq!(remember(&host, "c").await?, "b");
    // Three served: retired, and the fourth request starts afresh.
    assert_eq!(remember(&host, "d").await?, Value::Null);
    assert_eq!(remember(&host, "e").await?, "d");
    let stats = host.settled_stats().await;
    assert_eq!(stats.instantiations, 2);
    assert_eq!(stats.requests, 5);
    assert_eq!(stats.instances_in_use, 0);
    Ok(())
}

#[tokio::test]
async fn one_request_per_instance_when_reuse_is_one() -> Result<()> {
    let host = hostile(reuse(1)).await?;
    for text in ["a", "b", "c"] {
        assert_eq!(remember(&host, text).await?, Value::Null);
    }
    assert_eq!(host.fanout.stats().instantiations, 3);
    Ok(())
}

#[tokio::test]
async fn a_failed_request_retires_its_worker_and_the_next_runs_afresh() -> Result<()> {
    let limits = Limits {
        fuel: Some(20_000_000),
        ..reuse(1000)
    };
    let host = hostile(limits).await?;
    // Each misdeed, its limit's answer: a trap, fuel, memory; and more
    // resources left behind than a worker may keep between requests
    // (answered 200, but not reused).
    let misdeeds = [
        ("/panic", StatusCode::INTERNAL_SERVER_ERROR),
        ("/loop", StatusCode::INTERNAL_SERVER_ERROR),
        ("/hog", StatusCode::INTERNAL_SERVER_ERROR),
        ("/keep?1500", StatusCode::OK),
    ];
    for (path, status) in misdeeds {
        remember(&host, "before").await?;
        let answer = host.get(path).await?;
        assert_eq!(answer.status, status, "{path}: {}", answer.json);
        assert_eq!(remember(&host, "after").await?, Value::Null, "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn a_few_resources_left_behind_do_not_retire_a_worker() -> Result<()> {
    let host = hostile(reuse(1000)).await?;
    remember(&host, "before").await?;
    for _ in 0..10 {
        assert_eq!(host.get("/keep?10").await?.status, StatusCode::OK);
    }
    assert_eq!(remember(&host, "after").await?, "before");
    Ok(())
}

#[tokio::test]
async fn a_deadline_retires_the_worker() -> Result<()> {
    let host = hostile(Limits {
        deadline: MS(300),
        queue_wait: MS(100),
        ..reuse(1000)
    })
    .await?;
    remember(&host, "before").await?;
    let answer = host.get("/park").await?;
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.json
    );
    assert_eq!(remember(&host, "after").await?, Value::Null);
    Ok(())
}

#[tokio::test]
async fn each_request_gets_its_whole_fuel_allowance() -> Result<()> {
    const FUEL: u64 = 20_000_000;
    let host = hostile(Limits {
        fuel: Some(FUEL),
        ..reuse(1000)
    })
    .await?;
    // Fuel a round costs, from two requests in the same worker.
    let fuel_of = async |rounds: u64| -> Result<u64> {
        let before = host.fanout.stats().fuel_consumed;
        let answer = host.get(&format!("/burn?{rounds}")).await?;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        Ok(host.fanout.stats().fuel_consumed - before)
    };
    fuel_of(0).await?;
    let base = fuel_of(0).await?;
    let per_round = (fuel_of(100_000).await? - base) as f64 / 100_000.0;
    assert!(per_round > 0.0);
    // Each takes 60% of the allowance: the second would run out were the
    // fuel not topped up.
    let rounds = ((FUEL as f64 * 0.6 - base as f64) / per_round) as u64;
    for _ in 0..4 {
        let used = fuel_of(rounds).await?;
        assert!(used > FUEL / 2 && used < FUEL, "{used}");
    }
    assert_eq!(host.fanout.stats().instantiations, 1);
    Ok(())
}

#[tokio::test]
async fn a_worker_that_keeps_growing_is_retired_before_its_memory_cap() -> Result<()> {
    // 1 MiB leaked per request, under a 16 MiB cap: kept, a worker would
    // be refused memory by its fourteenth request or so.
    let host = hostile(reuse(1000)).await?;
    for i in 0..40 {
        let answer = host.get("/leak?1024").await?;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "request {i}: {}",
            answer.json
        );
    }
    let instantiations = host.fanout.stats().instantiations;
    assert!((3..=20).contains(&instantiations), "{instantiations}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_the_pool_and_leave_it_whole() -> Result<()> {
    let fanout = Fanout::builder()
        .component_path(fanout_tests::HOSTILE_COMPONENT_PATH)
        .cache_dir(fanout_tests::cache_dir())
        .limits(Limits {
            max_instances: 4,
            queue_wait: MS(1000),
            ..reuse(16)
        })
        .admission(AdmissionMode::Fixed)
        .build()?;
    let host = TestHost::start(fanout).await?;
    let asks = (0..200).map(|i| {
        let host = &host;
        async move { host.get(&format!("/burn?{}", i * 100)).await }
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut ran = 0;
    for answer in answers {
        let answer = answer?;
        assert!(
            answer.status == StatusCode::OK || answer.status == StatusCode::SERVICE_UNAVAILABLE,
            "{}: {}",
            answer.status,
            answer.json
        );
        ran += u64::from(answer.status == StatusCode::OK);
    }
    let stats = host.settled_stats().await;
    assert_eq!(stats.instances_in_use, 0);
    // The 503s were shed before they reached an instance: on a slow
    // machine the line's second does not hold all 200 behind four
    // instances. `ran` requests at most 16 to an instance need at least
    // ran / 16 of them; one per request would be `ran`.
    assert!(ran >= 32, "only {ran} of 200 ran: nothing to tell reuse by");
    assert!(
        (ran.div_ceil(16)..ran).contains(&stats.instantiations),
        "{} instances for {ran} requests",
        stats.instantiations
    );
    let idle = host
        .metric("fanout_instances_idle")
        .expect("the idle gauge");
    assert!((1.0..=4.0).contains(&idle), "{idle}");
    Ok(())
}

/// Two requests through one worker of the built-in guest: the second sees
/// nothing of the first's headers, ids or answers.
#[tokio::test]
async fn the_second_request_in_a_worker_sees_nothing_of_the_first() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    // A second of budget, not the default 200 ms: this test is about what
    // an instance keeps, not its speed, and in CI a debug 0.3 guest beside
    // this binary's pool test (200 requests at once) once ran out of the
    // default budget (504 `upstream_timeout`).
    let config = json!({"deadline_ms": 1000, "routes": [{"path": "/products/{id}", "upstreams": [
        {"name": "inventory", "url": "{base}/inventory/{id}"},
        {"name": "pricing", "url": "{base}/pricing/{id}", "field": "price",
         "forward_headers": ["accept-language", "authorization"]},
        {"name": "reviews", "url": "{base}/reviews/{id}", "required": false}
    ]}]});
    let host_with = |reuse: u32| {
        upstreams
            .builder()
            .env("FANOUT_CONFIG", config.to_string())
            .limits(Limits {
                max_instances: 1,
                instance_reuse: reuse,
                ..Limits::default()
            })
            .admission(AdmissionMode::Fixed)
            .build()
    };
    let host = TestHost::start(host_with(128)?).await?;
    let first = host
        .get_with(
            "/products/1",
            &[("authorization", "Bearer alice"), ("accept-language", "fr")],
        )
        .await?;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    let second = host.get("/products/2").await?;
    assert_eq!(second.status, StatusCode::OK, "{}", second.json);
    assert_eq!(
        host.fanout.stats().instantiations,
        1,
        "one worker served both"
    );

    // What the second call to each upstream got: its own id, and none of
    // the first request's headers.
    let pricing = upstreams.pricing.calls();
    assert_eq!(pricing.len(), 2);
    assert_eq!(pricing[1].path, "/pricing/2");
    for name in ["authorization", "accept-language"] {
        assert!(!pricing[1].headers.contains_key(name), "{name}");
    }
    assert_eq!(upstreams.inventory.calls()[1].path, "/inventory/2");
    // The second answer is the one a fresh instance gives.
    let fresh = TestHost::start(host_with(1)?).await?;
    let alone = fresh.get("/products/2").await?;
    assert_eq!(second.json, alone.json);
    assert!(!second.json.to_string().contains("alice"));
    Ok(())
}

#[tokio::test]
async fn a_reused_workers_output_is_logged_once_under_its_own_request() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    let host = hostile(reuse(1000)).await?;
    for _ in 0..3 {
        assert_eq!(host.get("/print").await?.status, StatusCode::OK);
    }
    assert_eq!(host.fanout.stats().instantiations, 1);
    let events = logs.events();
    let printed: Vec<_> = events
        .iter()
        .filter(|e| {
            e["target"] == "fanout::guest"
                && e["stream"] == "stdout"
                && e["message"] == "hello from the guest's stdout"
        })
        .collect();
    // One line a request, not the instance's output so far each time.
    assert_eq!(printed.len(), 3, "{events:#?}");
    let mut traces: Vec<_> = printed.iter().map(|e| e["trace_id"].clone()).collect();
    traces.dedup();
    assert_eq!(traces.len(), 3, "each under its own request: {traces:?}");
    Ok(())
}

/// The built-in guest leaves nothing in its table between requests that
/// shortens an instance's life: wasmtime-wasi-http 48 never frees the
/// `request-options` of an upstream call, one per call, and the host
/// deletes them (`outgoing_handler.rs`). Left there, they passed the
/// leftover bound long before 128 product requests: 256 took four
/// instances.
#[tokio::test]
async fn the_built_in_guest_keeps_an_instance_for_its_whole_allowance() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    // A second of budget: see the test above.
    let fanout = upstreams
        .builder()
        .env("FANOUT_DEADLINE_MS", "1000")
        .limits(Limits {
            max_instances: 1,
            instance_reuse: 128,
            ..Limits::default()
        })
        .admission(AdmissionMode::Fixed)
        .build()?;
    let host = TestHost::start(fanout).await?;
    for i in 0..256 {
        let answer = host.get(&format!("/products/{i}")).await?;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    }
    let stats = host.settled_stats().await;
    assert_eq!(stats.requests, 256);
    assert_eq!(stats.instantiations, 2, "128 requests an instance");
    Ok(())
}
