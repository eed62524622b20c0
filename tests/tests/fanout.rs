//! The product fan-out end to end: guest component on the host, upstreams on
//! port 0.

use anyhow::Result;
use fanout_tests::{Behaviour, MS, ProductUpstreams, TestHost};
use http::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn three_slow_upstreams_cost_the_slowest_not_the_sum() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(100)).await?;
    let host = upstreams.host().await?;

    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    println!("3 x 100 ms fan-out answered in {:?}", answer.elapsed);
    assert!(
        answer.elapsed < MS(180),
        "3 x 100 ms upstreams took {:?}: the calls were not concurrent",
        answer.elapsed
    );

    // The upstreams' own records: every call started before any finished.
    let calls: Vec<_> = [&upstreams.inventory, &upstreams.pricing, &upstreams.reviews]
        .iter()
        .map(|u| {
            let calls = u.calls();
            assert_eq!(calls.len(), 1, "each upstream is called once");
            calls[0].clone()
        })
        .collect();
    let last_start = calls.iter().map(|c| c.started).max().unwrap();
    let first_end = calls.iter().map(|c| c.finished.unwrap()).min().unwrap();
    assert!(
        last_start < first_end,
        "upstream calls did not overlap: {calls:?}"
    );
    assert_eq!(upstreams.inventory.calls()[0].path, "/inventory/42");
    assert_eq!(upstreams.pricing.calls()[0].path, "/pricing/42");
    assert_eq!(upstreams.reviews.calls()[0].path, "/reviews/42");
    Ok(())
}

#[tokio::test]
async fn answer_has_the_contract_shape() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    let answer = host.get("/products/sku_42-b").await?;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "application/json");

    let body = answer.json.as_object().expect("an object");
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["degraded", "id", "inventory", "price", "reviews"]);
    assert_eq!(body["degraded"], json!([]));
    assert!(answer.headers.get("x-fanout-degraded").is_none());
    assert_eq!(body["id"], "sku_42-b");
    assert!(body["inventory"]["in_stock"].is_boolean());
    assert!(body["inventory"]["quantity"].is_u64());
    assert!(body["price"]["amount"].is_f64());
    assert!(body["price"]["currency"].is_string());
    assert!(body["reviews"]["rating"].is_f64());
    assert!(body["reviews"]["count"].is_u64());
    // The upstreams' JSON is passed through as is.
    assert_eq!(body["price"], json!({"amount": 12.5, "currency": "EUR"}));
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_json_errors() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    let long = format!("/products/{}", "a".repeat(65));
    let cases: &[(&str, &str, StatusCode, &str)] = &[
        ("GET", "/products/", StatusCode::BAD_REQUEST, "invalid_id"),
        ("GET", &long, StatusCode::BAD_REQUEST, "invalid_id"),
        (
            "GET",
            "/products/a%20b",
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "GET",
            "/products/a.b",
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "GET",
            "/products/a/b",
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "GET",
            "/products/%2e%2e",
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        ("GET", "/", StatusCode::NOT_FOUND, "not_found"),
        ("GET", "/orders/42", StatusCode::NOT_FOUND, "not_found"),
        (
            "POST",
            "/products/42",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "DELETE",
            "/products/42",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (method, path, status, code) in cases {
        let answer = host.request(method, path).await?;
        assert_eq!(answer.status, *status, "{method} {path}: {}", answer.json);
        assert_eq!(answer.error_code(), *code, "{method} {path}");
        assert!(answer.json["error"]["message"].is_string());
        assert_eq!(answer.headers["content-type"], "application/json");
        if *status == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(answer.headers["allow"], "GET");
        }
    }
    // Nothing invalid reached an upstream.
    assert!(upstreams.inventory.calls().is_empty());
    // The id is exactly 64 characters long at most: 64 is fine.
    let ok = host.get(&format!("/products/{}", "a".repeat(64))).await?;
    assert_eq!(ok.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn a_late_required_upstream_is_a_504_at_the_deadline() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(10)).await?;
    upstreams
        .pricing
        .set_behaviour(Behaviour::json(MS(2_000), json!({})));
    let host = upstreams.host().await?;

    let answer = host.get("/products/42").await?;
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.json
    );
    assert_eq!(answer.error_code(), "upstream_timeout");
    assert_eq!(answer.json["error"]["upstream"], "pricing");
    println!(
        "deadline hit answered in {:?} (budget 200 ms)",
        answer.elapsed
    );
    // The guest's 200 ms budget, not the upstream's 2 s, bounds the answer.
    assert!(
        answer.elapsed >= MS(190) && answer.elapsed < MS(1_000),
        "{:?}",
        answer.elapsed
    );
    Ok(())
}

#[tokio::test]
async fn the_guest_budget_is_configurable() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    let upstreams = ProductUpstreams::start(MS(150)).await?;
    let host = TestHost::start(
        upstreams
            .builder()
            .env("FANOUT_DEADLINE_MS", "50")
            .build()?,
    )
    .await?;
    // The default line (100 ms) is longer than this budget: said at start.
    assert!(
        logs.events()
            .iter()
            .any(|e| e["level"] == "WARN" && e["queue_wait_ms"] == 100 && e["budget_ms"] == 50),
        "{:?}",
        logs.events()
    );
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(answer.elapsed < MS(150), "{:?}", answer.elapsed);
    Ok(())
}

#[tokio::test]
async fn a_broken_guest_configuration_fails_before_listening() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let cases = [
        ("FANOUT_DEADLINE_MS", "soon", "FANOUT_DEADLINE_MS"),
        ("FANOUT_CONFIG", "{not json", "FANOUT_CONFIG"),
        (
            "FANOUT_CONFIG",
            r#"{"max_in_flight": 0}"#,
            "FANOUT_CONFIG.max_in_flight",
        ),
        // Larger than the host's own deadline: the host would cut first.
        (
            "FANOUT_CONFIG",
            r#"{"max_deadline_ms": 5000}"#,
            "max_deadline_ms",
        ),
    ];
    for (key, value, named) in cases {
        let Err(err) = upstreams.builder().env(key, value).build() else {
            panic!("{key}={value} was accepted");
        };
        match &err {
            fanout_host::Error::GuestConfig { key, .. } => assert_eq!(key, named, "{err}"),
            other => panic!("{key}={value}: {other}"),
        }
    }
    // A line as long as the guest's largest budget (1 s by default):
    // whoever waits it out has no time left.
    let limits = fanout_host::Limits {
        queue_wait: MS(1000),
        ..fanout_tests::limits()
    };
    let Err(err) = upstreams.builder().limits(limits).build() else {
        panic!("a 1 s line was accepted");
    };
    assert!(
        matches!(
            err,
            fanout_host::Error::InvalidLimit {
                key: "queue_wait",
                ..
            }
        ),
        "{err}"
    );
    // An upstream the routes need but nobody registered.
    let Err(err) = fanout_tests::builder()
        .http_upstream("inventory", upstreams.inventory.base_url())
        .build()
    else {
        panic!("missing upstreams were accepted");
    };
    assert!(err.to_string().contains("FANOUT_UPSTREAM_PRICING"), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_guest_still_validates_what_it_reads() -> Result<()> {
    // Loaded from a path, the component is not known to be the built-in
    // guest: the host does not check its configuration, the guest does.
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let fanout = upstreams
        .builder()
        .component_path(fanout_tests::guest_component_path())
        .env("FANOUT_DEADLINE_MS", "soon")
        .build()?;
    let host = TestHost::start(fanout).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.error_code(), "config_invalid");
    let message = answer.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("FANOUT_DEADLINE_MS"), "{message}");
    Ok(())
}

#[tokio::test]
async fn an_upstream_answer_over_the_size_cap_fails_that_upstream_alone() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    let padded = |len: usize| Behaviour::json(MS(0), json!({"pad": "x".repeat(len)}));
    let over = fanout_guest::errors::MAX_UPSTREAM_BODY;
    // Optional: the answer degrades, the rest is intact.
    upstreams.reviews.set_behaviour(padded(over));
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json["degraded"], json!(["reviews"]));
    assert_eq!(answer.json["price"]["amount"], 12.5);
    // Required: a 502 that says why.
    upstreams.pricing.set_behaviour(padded(over));
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.json);
    assert_eq!(answer.error_code(), "upstream_invalid_response");
    let message = answer.json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("larger than {} KiB", over >> 10)),
        "{message}"
    );
    // Just under the cap is read and merged whole.
    let under = over - 64;
    upstreams.pricing.set_behaviour(padded(under));
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(
        answer.json["price"]["pad"].as_str().map(str::len),
        Some(under)
    );
    Ok(())
}

#[tokio::test]
async fn required_upstream_failures_are_errors_naming_the_upstream() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    let cases = [
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "{}",
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        ),
        (
            StatusCode::OK,
            "not json",
            StatusCode::BAD_GATEWAY,
            "upstream_invalid_response",
        ),
        (
            StatusCode::OK,
            "[1,2]",
            StatusCode::BAD_GATEWAY,
            "upstream_invalid_response",
        ),
        (
            StatusCode::NOT_FOUND,
            "{}",
            StatusCode::NOT_FOUND,
            "item_not_found",
        ),
    ];
    for (upstream_status, body, status, code) in cases {
        upstreams.pricing.set_behaviour(Behaviour {
            status: upstream_status,
            body: body.into(),
            ..Behaviour::status(200)
        });
        let answer = host.get("/products/42").await?;
        assert_eq!(
            answer.status, status,
            "{upstream_status} {body}: {}",
            answer.json
        );
        assert_eq!(answer.error_code(), code);
        assert_eq!(answer.json["error"]["upstream"], "pricing");
    }
    Ok(())
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    // A port that was just free: bind, read it, release it.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    let fanout = upstreams
        .builder()
        .http_upstream("inventory", format!("http://{closed}"))
        .build()?;
    let host = TestHost::start(fanout).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.json);
    assert_eq!(answer.error_code(), "upstream_unavailable");
    assert_eq!(answer.json["error"]["upstream"], "inventory");
    Ok(())
}

#[tokio::test]
async fn fuel_per_request_leaves_headroom() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    const N: u64 = 20;
    for _ in 0..N {
        assert_eq!(host.get("/products/42").await?.status, StatusCode::OK);
    }
    let stats = host.fanout.stats();
    let per_request = stats.fuel_consumed / N;
    println!(
        "fuel per request: {per_request}; instantiation: {:?} on average",
        stats.instantiate_time / stats.instantiations as u32
    );
    assert!(per_request > 0);
    // The default limit must leave at least 10x headroom.
    assert!(
        per_request * 10 < fanout_host::limits::DEFAULT_FUEL,
        "a request burns {per_request} fuel"
    );
    assert_eq!(stats.requests, N);
    assert_eq!(stats.failures, 0);
    Ok(())
}

#[tokio::test]
async fn in_process_upstreams_need_no_network() -> Result<()> {
    let fanout = fanout_tests::builder().demo_upstreams().build()?;
    let request = http::Request::get("/products/7")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = fanout.handle(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    let body: Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    assert_eq!(body["id"], "7");
    assert!(body["inventory"]["in_stock"].is_boolean());
    Ok(())
}

#[tokio::test]
async fn demo_upstreams_also_serve_over_http() -> Result<()> {
    // The same demo upstreams the binary runs in-process, on a real socket:
    // what the component gets under `wasmtime serve`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fanout_host::demo::serve(listener, async {
        let _ = stopped.await;
    }));
    let fanout = fanout_tests::builder()
        .http_upstream("inventory", &base)
        .http_upstream("pricing", &base)
        .http_upstream("reviews", &base)
        .build()?;
    let host = TestHost::start(fanout).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert!(answer.json["price"]["amount"].is_f64());
    assert!(answer.json["reviews"]["count"].is_u64());
    let _ = stop.send(());
    server.await??;
    Ok(())
}

/// `name;dur=12.3, ...` as (name, ms).
fn server_timing(headers: &http::HeaderMap) -> Vec<(String, f64)> {
    headers["server-timing"]
        .to_str()
        .unwrap()
        .split(", ")
        .map(|entry| {
            let (name, dur) = entry.split_once(";dur=").expect("name;dur=ms");
            (name.to_string(), dur.parse().expect("milliseconds"))
        })
        .collect()
}

fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap()
}

#[tokio::test]
async fn trace_context_propagates_to_every_upstream() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = host
        .get_with(
            "/products/42",
            &[("traceparent", incoming), ("tracestate", "vendor=1")],
        )
        .await?;
    assert_eq!(answer.status, StatusCode::OK);
    let mut span_ids = Vec::new();
    for upstream in [&upstreams.inventory, &upstreams.pricing, &upstreams.reviews] {
        let call = &upstream.calls()[0];
        let traceparent = call.headers["traceparent"].to_str()?;
        assert_eq!(trace_id(traceparent), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(call.headers["tracestate"], "vendor=1");
        let span = traceparent.split('-').nth(2).unwrap().to_string();
        assert_ne!(
            span, "00f067aa0ba902b7",
            "an outgoing call is a span of its own"
        );
        span_ids.push(span);
    }
    span_ids.sort();
    span_ids.dedup();
    assert_eq!(span_ids.len(), 3, "each call has its own span id");

    // Without one, the guest starts a trace: one trace id for the request.
    host.get("/products/43").await?;
    let ids: Vec<String> = [&upstreams.inventory, &upstreams.pricing, &upstreams.reviews]
        .iter()
        .map(|u| trace_id(u.calls()[1].headers["traceparent"].to_str().unwrap()).to_string())
        .collect();
    assert!(
        ids.iter()
            .all(|id| id == &ids[0] && id != "4bf92f3577b34da6a3ce929d0e0e4736")
    );
    Ok(())
}

#[tokio::test]
async fn server_timing_shows_each_upstream_and_the_total() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(20)).await?;
    upstreams
        .reviews
        .set_behaviour(Behaviour::json(MS(60), json!({"rating": 1.0, "count": 1})));
    let host = upstreams.host().await?;
    let answer = host.get("/products/42").await?;
    let timing = server_timing(&answer.headers);
    let names: Vec<&str> = timing.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["inventory", "pricing", "reviews", "total"]);
    let (reviews, total) = (timing[2].1, timing[3].1);
    assert!(reviews >= 60.0 && timing[0].1 >= 20.0, "{timing:?}");
    assert!(total >= reviews, "{timing:?}");
    // Error answers carry it too.
    let answer = host.get("/products/not.valid").await?;
    assert_eq!(server_timing(&answer.headers)[0].0, "total");
    Ok(())
}

/// A JSON value nested `depth` arrays deep around `1`.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

/// The built-in guest (either build) starts with memory enough for a
/// product and a 20-id batch (`build-support/guest_memory.rs`), so fresh
/// instances serve them without growing it: each growth is an `mprotect`
/// in the instance pool, and the next instance in the slot undoes it with
/// another.
#[tokio::test]
async fn ordinary_requests_fit_the_guests_initial_memory() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let fanout = upstreams
        .builder()
        .limits(fanout_host::Limits {
            instance_reuse: 1,
            ..fanout_tests::limits()
        })
        .build()?;
    let host = TestHost::start(fanout).await?;
    let batch = |n: u32| {
        let ids: Vec<String> = (1..=n).map(|id| id.to_string()).collect();
        format!("/products?ids={}", ids.join(","))
    };
    for path in ["/products/42".to_string(), batch(20)] {
        let answer = host.get(&path).await?;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.json);
    }
    let stats = host.settled_stats().await;
    assert_eq!(stats.instantiations, 2);
    // The count itself is tested in hostile.rs, with a guest that grows.
    assert_eq!(stats.memory_growths, 0, "{stats:?}");
    Ok(())
}

#[tokio::test]
async fn deeply_nested_upstream_json_fits_the_guest_stack() -> Result<()> {
    // The guest's stack is small on purpose (build-support/guest_memory.rs):
    // a deep body must still be answered, or refused with a clear error,
    // never trap.
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    // As deep as serde_json goes (its recursion limit is 128).
    upstreams
        .pricing
        .set_behaviour(Behaviour::json(MS(0), json!({ "price": nested(120) })));
    let answer = host.get("/products/1").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json["price"]["price"], nested(120));
    // Deeper than serde_json reads: a 502 that names the upstream.
    // (As text: a Value that deep would overflow this test's own stack.)
    let deep = format!(r#"{{"price": {}1{}}}"#, "[".repeat(2000), "]".repeat(2000));
    upstreams.pricing.set_behaviour(Behaviour {
        body: deep,
        ..Behaviour::status(200)
    });
    let answer = host.get("/products/2").await?;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.json);
    assert_eq!(answer.error_code(), "upstream_invalid_response");
    Ok(())
}

#[tokio::test]
async fn each_attempt_tells_the_upstream_its_shrinking_budget() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    // 300 ms per failing attempt in a 1000 ms budget, pricing's attempts
    // allowed 900: from the second attempt on, what the request has left
    // binds, whatever the backoff's jitter and however loaded the machine.
    let failing = Behaviour {
        delay: MS(300),
        ..Behaviour::status(503)
    };
    upstreams.pricing.script(vec![failing.clone(), failing]);
    let config = json!({"deadline_ms": 1000, "routes": [{"path": "/products/{id}", "upstreams": [
        {"name": "inventory", "url": "{base}/inventory/{id}"},
        {"name": "pricing", "url": "{base}/pricing/{id}", "field": "price", "timeout_ms": 900},
        {"name": "reviews", "url": "{base}/reviews/{id}", "required": false}
    ]}]});
    let fanout = upstreams
        .builder()
        .env("FANOUT_CONFIG", config.to_string())
        .build()?;
    let host = TestHost::start(fanout).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let budgets: Vec<u64> = upstreams
        .pricing
        .calls()
        .iter()
        .map(|c| {
            c.headers["x-request-timeout-ms"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(budgets.len(), 3, "two 503s, then an answer");
    // The first attempt gets the upstream's timeout; each retry only what
    // the request has left.
    assert_eq!(budgets[0], 900);
    assert!(
        budgets[1] < budgets[0] && budgets[2] < budgets[1],
        "{budgets:?}"
    );
    assert!(budgets[2] <= 400, "{budgets:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_client_headers_reach_their_upstream_and_credentials_are_never_shared() -> Result<()>
{
    // Slow upstreams and a patient route: the two requests' inventory
    // calls are in flight together even on a loaded machine.
    let upstreams = ProductUpstreams::start(MS(300)).await?;
    let config = serde_json::json!({"deadline_ms": 1500, "max_deadline_ms": 1500,
        "routes": [{"path": "/products/{id}", "upstreams": [
        {"name": "inventory", "url": "{base}/inventory/{id}", "timeout_ms": 1400},
        {"name": "pricing", "url": "{base}/pricing/{id}", "field": "price", "timeout_ms": 1400,
         "forward_headers": ["accept-language", "authorization"]},
        {"name": "reviews", "url": "{base}/reviews/{id}", "required": false, "timeout_ms": 1400}
    ]}]});
    let fanout = upstreams
        .builder()
        .env("FANOUT_CONFIG", config.to_string())
        .admission(fanout_host::AdmissionMode::Fixed)
        .build()?;
    let host = TestHost::start(fanout).await?;
    let ask = |user: &'static str| {
        let host = &host;
        async move {
            host.get_with(
                "/products/42",
                &[
                    ("accept-language", "fr"),
                    ("authorization", user),
                    ("cookie", "session=1"),
                ],
            )
            .await
        }
    };
    let (alice, bob) = tokio::join!(ask("Bearer alice"), ask("Bearer bob"));
    assert_eq!(alice?.status, StatusCode::OK);
    assert_eq!(bob?.status, StatusCode::OK);

    let pricing = upstreams.pricing.calls();
    let mut users: Vec<_> = pricing
        .iter()
        .map(|c| c.headers["authorization"].to_str().unwrap().to_string())
        .collect();
    users.sort();
    // Each user's call of its own: an answer to a credentialed request is
    // never another's, coalesced or cached.
    assert_eq!(users, ["Bearer alice", "Bearer bob"]);
    assert!(pricing.iter().all(|c| c.headers["accept-language"] == "fr"));
    assert!(pricing.iter().all(|c| !c.headers.contains_key("cookie")));
    // Unlisted upstreams get none of them, and coalesce.
    let inventory = upstreams.inventory.calls();
    assert_eq!(inventory.len(), 1);
    for name in ["authorization", "accept-language", "cookie"] {
        assert!(!inventory[0].headers.contains_key(name), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn a_route_calling_an_unregistered_address_stops_the_start() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let config = json!({"routes": [{"path": "/products/{id}", "upstreams": [
        {"name": "pricing", "url": "http://elsewhere.internal:9/pricing/{id}"}
    ]}]});
    let err = upstreams
        .builder()
        .env("FANOUT_CONFIG", config.to_string())
        .build()
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("FANOUT_CONFIG.routes[/products/{id}].upstreams[0].url")
            && err.contains("elsewhere.internal:9"),
        "{err}"
    );
    Ok(())
}

/// `/users/{user}/orders/{order}`: pricing takes both variables and a query
/// parameter with a default, reviews one without.
fn orders_route() -> Value {
    json!({"routes": [{"path": "/users/{user}/orders/{order}", "upstreams": [
        {"name": "pricing", "url": "{base}/pricing/{user}/{order}?currency={query.currency:EUR}",
         "field": "price"},
        {"name": "reviews", "url": "{base}/reviews/{order}?lang={query.lang}", "required": false}
    ]}]})
}

/// Mock upstreams and a host serving [`orders_route`] in front of them.
async fn orders_host() -> Result<(ProductUpstreams, TestHost)> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let fanout = upstreams
        .builder()
        .env("FANOUT_CONFIG", orders_route().to_string())
        .build()?;
    let host = TestHost::start(fanout).await?;
    Ok((upstreams, host))
}

#[tokio::test]
async fn many_path_variables_and_query_parameters_reach_the_upstreams() -> Result<()> {
    let (upstreams, host) = orders_host().await?;

    let answer = host.get("/users/u-7/orders/42?lang=fr+CA&x=1").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(
        (&answer.json["user"], &answer.json["order"]),
        (&json!("u-7"), &json!("42"))
    );
    assert!(answer.json["price"].is_object() && answer.json["reviews"].is_object());
    let paths = |u: &fanout_tests::MockUpstream| -> Vec<String> {
        u.calls().into_iter().map(|c| c.path).collect()
    };
    assert_eq!(paths(&upstreams.pricing), ["/pricing/u-7/42?currency=EUR"]);
    // Decoded from the client's form encoding, encoded again for the URL.
    assert_eq!(paths(&upstreams.reviews), ["/reviews/42?lang=fr%20CA"]);

    // The batch form fills the last variable; the client's currency wins.
    let answer = host
        .get("/users/u-7/orders?ids=1,2&currency=USD&lang=de")
        .await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let items = answer.json["items"].as_array().unwrap();
    let orders: Vec<&Value> = items.iter().map(|i| &i["order"]).collect();
    assert_eq!(orders, [&json!("1"), &json!("2")]);
    assert!(items.iter().all(|i| i["user"] == "u-7"));
    let mut priced = paths(&upstreams.pricing)[1..].to_vec();
    priced.sort();
    assert_eq!(
        priced,
        ["/pricing/u-7/1?currency=USD", "/pricing/u-7/2?currency=USD"]
    );
    Ok(())
}

#[tokio::test]
async fn bad_path_and_query_values_are_400_and_call_nothing() -> Result<()> {
    let (upstreams, host) = orders_host().await?;
    let long = "a".repeat(65);
    let long_query = format!("/users/7/orders/1?lang={}", "x".repeat(257));
    let long_path = format!("/users/{long}/orders/1?lang=fr");
    let cases = [
        ("/users/7/orders/1", "invalid_query", "lang=<value>"),
        ("/users/7/orders/1?lang=", "invalid_query", "lang=<value>"),
        (
            "/users/7/orders/1?lang=a/b",
            "invalid_query",
            "`lang` contains '/'",
        ),
        (
            "/users/7/orders/1?lang=a%2Fb",
            "invalid_query",
            "`lang` contains '/'",
        ),
        (
            "/users/7/orders/1?lang=a%3Fb",
            "invalid_query",
            "`lang` contains '?'",
        ),
        (
            "/users/7/orders/1?lang=a%23b",
            "invalid_query",
            "`lang` contains '#'",
        ),
        (
            "/users/7/orders/1?lang=a%0D%0Ab",
            "invalid_query",
            "`lang` contains '\\r'",
        ),
        (
            "/users/7/orders/1?lang=fr&currency=%0A",
            "invalid_query",
            "`currency` contains '\\n'",
        ),
        (
            "/users/7/orders/1?lang=%FF",
            "invalid_query",
            "percent-encoded UTF-8",
        ),
        (long_query.as_str(), "invalid_query", "at most 256"),
        (
            "/users/7/orders/1%2F2?lang=fr",
            "invalid_id",
            "the order contains '%'",
        ),
        (
            "/users/7/orders/1/2?lang=fr",
            "invalid_id",
            "the order contains '/'",
        ),
        (
            "/users/7/orders/1%3F?lang=fr",
            "invalid_id",
            "the order contains '%'",
        ),
        (
            "/users/7/orders/1%23?lang=fr",
            "invalid_id",
            "the order contains '%'",
        ),
        (
            "/users/a%0D%0Ab/orders/1?lang=fr",
            "invalid_id",
            "the user contains '%'",
        ),
        (
            "/users/a.b/orders/1?lang=fr",
            "invalid_id",
            "the user contains '.'",
        ),
        (long_path.as_str(), "invalid_id", "at most 64"),
    ];
    for (path, code, mention) in cases {
        let answer = host.get(path).await?;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            answer.json
        );
        let error = &answer.json["error"];
        assert_eq!(error["code"], code, "{path}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{path}: {message}");
    }
    for upstream in [&upstreams.inventory, &upstreams.pricing, &upstreams.reviews] {
        assert!(upstream.calls().is_empty(), "{:?}", upstream.calls());
    }
    Ok(())
}

#[tokio::test]
async fn the_demo_order_route_uses_every_part_of_the_model() -> Result<()> {
    let fanout = fanout_tests::builder()
        .cache_dir(fanout_tests::cache_dir())
        .demo_upstreams()
        .env(
            "FANOUT_CONFIG",
            fanout_host::demo::guest_config().to_string(),
        )
        .build()?;
    let host = TestHost::start(fanout).await?;
    // Order 1 lists sku-21 twice (the demo's data is derived from the id).
    let answer = host.get("/orders/1").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let order = &answer.json;
    assert_eq!(order["id"], "1");
    // Merged into the answer, cut by `select`: no customer_id, no warehouse.
    assert!(order["status"].is_string() && order["placed_at"].is_string());
    assert!(order.get("customer_id").is_none() && order.get("warehouse").is_none());
    // The customer, found through the order's answer, cut to two fields.
    let customer = order["customer"].as_object().expect("a customer");
    assert_eq!(customer.keys().collect::<Vec<_>>(), ["name", "tier"]);
    // One price and one stock per line, in line order.
    let lines = order["lines"].as_array().unwrap();
    let skus: Vec<&str> = lines.iter().map(|l| l["sku"].as_str().unwrap()).collect();
    assert_eq!(skus, ["sku-3", "sku-21", "sku-28", "sku-21", "sku-5"]);
    let prices = order["prices"].as_array().unwrap();
    let stock = order["stock"].as_array().unwrap();
    assert_eq!((prices.len(), stock.len()), (lines.len(), lines.len()));
    for price in prices {
        assert_eq!(
            price.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["amount", "currency"]
        );
    }
    // The same sku, the same (shared) answer.
    assert_eq!(prices[1], prices[3]);
    assert_eq!(order["degraded"], json!([]));
    // Two stages: the order, then everything else at once.
    let timing = answer.headers["server-timing"].to_str()?;
    for name in ["orders", "customers", "inventory", "pricing"] {
        assert!(timing.contains(&format!("{name};dur=")), "{timing}");
    }
    // The batch form and the first route still work beside it.
    let batch = host.get("/orders?ids=1,2").await?;
    assert_eq!(batch.json["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(host.get("/products/42").await?.status, StatusCode::OK);
    Ok(())
}

/// A route at the limits: an order and its list of 999 elements, each
/// called (1000 calls, the most an item may make), and the same list
/// priced in batches of 100; both within the default fuel.
#[tokio::test]
async fn the_largest_list_and_batch_fit_the_default_fuel() -> Result<()> {
    use fanout_host::adapters;
    let catalog = adapters::from_fn(|request| async move {
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let body = match path.split_once("?skus=") {
            Some((_, skus)) => Value::Array(
                skus.split(',')
                    .map(|s| json!({"sku": s, "price": 1}))
                    .collect(),
            ),
            None if path.starts_with("/order") => {
                let lines: Vec<Value> = (0..999).map(|i| json!({"sku": format!("s{i}")})).collect();
                json!({ "lines": lines })
            }
            None => json!({"stock": 1}),
        };
        Ok(adapters::json_response(StatusCode::OK, &body))
    });
    let route = |name: &str, upstream: Value| {
        json!({"path": format!("/{name}/{{id}}"), "upstreams": [
            {"name": "catalog", "url": "{base}/order/{id}", "field": "order", "select": ["n"]},
            upstream]})
    };
    let config = json!({"deadline_ms": 1900, "max_deadline_ms": 1900, "routes": [
        route("each", json!({"name": "catalog2", "url": "{base}/stock/{each}",
            "each": "catalog.lines[].sku", "max_items": 999, "timeout_ms": 1800})),
        route("batch", json!({"name": "catalog2", "url": "{base}/prices",
            "each": "catalog.lines[].sku", "max_items": 1000,
            "batch": {"param": "skus", "max": 100, "key": "sku"}, "timeout_ms": 1800}))
    ]});
    let fanout = fanout_tests::builder()
        .cache_dir(fanout_tests::cache_dir())
        .upstream("catalog", "http://catalog.test", catalog.clone())
        .upstream("catalog2", "http://catalog2.test", catalog)
        .limits(fanout_host::Limits {
            deadline: std::time::Duration::from_secs(5),
            ..fanout_tests::limits()
        })
        .env("FANOUT_CONFIG", config.to_string())
        .build()?;
    let host = TestHost::start(fanout).await?;
    for (path, calls) in [("/each/1", 1000), ("/batch/1", 11)] {
        let before = host.fanout.stats().fuel_consumed;
        let answer = host.get(path).await?;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.json);
        let field = &answer.json["catalog2"];
        assert_eq!(field.as_array().map(Vec::len), Some(999), "{path}");
        assert!(
            field.as_array().unwrap().iter().all(Value::is_object),
            "{path}"
        );
        let fuel = host.fanout.stats().fuel_consumed - before;
        println!(
            "{path}: {calls} calls, {fuel} fuel ({} per call)",
            fuel / calls
        );
        assert!(fuel < fanout_host::limits::DEFAULT_FUEL, "{path}: {fuel}");
    }
    Ok(())
}
