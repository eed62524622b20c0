//! Hostile clients and failing upstreams: nothing wedged, leaked or left
//! running (issue #20).

use anyhow::Result;
use fanout_host::Limits;
use fanout_tests::{MS, ProductUpstreams, TestHost};
use http::StatusCode;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Waits (bounded) until no upstream of `upstreams` is working on a call.
async fn until_idle(upstreams: &ProductUpstreams) -> bool {
    tokio::time::timeout(MS(1000), async {
        while upstreams.inventory.in_flight()
            + upstreams.pricing.in_flight()
            + upstreams.reviews.in_flight()
            > 0
        {
            tokio::time::sleep(MS(1)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_client_that_goes_away_stops_its_upstream_calls() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    let upstreams = ProductUpstreams::start(MS(150)).await?;
    let host = upstreams.host().await?;
    let mut client = TcpStream::connect(host.addr).await?;
    client
        .write_all(b"GET /products/x HTTP/1.1\r\nhost: fanout\r\n\r\n")
        .await?;
    // The calls are out once each upstream has seen one.
    tokio::time::timeout(MS(1000), async {
        while upstreams.inventory.calls().is_empty()
            || upstreams.pricing.calls().is_empty()
            || upstreams.reviews.calls().is_empty()
        {
            tokio::time::sleep(MS(1)).await;
        }
    })
    .await?;
    drop(client);
    let left = Instant::now();
    assert!(until_idle(&upstreams).await, "upstream work went on");
    let mut slowest = MS(0);
    for upstream in [&upstreams.inventory, &upstreams.pricing, &upstreams.reviews] {
        let calls = upstream.calls();
        assert_eq!(calls.len(), 1, "no retry after the client left: {calls:?}");
        let call = &calls[0];
        assert!(call.cut_off(), "the upstream saw its caller go: {call:?}");
        slowest = slowest.max(call.ended.unwrap().saturating_duration_since(left));
    }
    println!("upstream calls closed {slowest:?} after the client left");
    // Aborted (about 1 ms here), well short of the upstreams' 150 ms.
    assert!(slowest < MS(25), "{slowest:?}");

    // Past when retries would have started (the budget is 200 ms): none.
    tokio::time::sleep(MS(250)).await;
    let calls = upstreams.inventory.calls().len()
        + upstreams.pricing.calls().len()
        + upstreams.reviews.calls().len();
    assert_eq!(calls, 3);

    let access: Vec<_> = logs
        .events()
        .into_iter()
        .filter(|e| e["target"] == "fanout::access")
        .collect();
    assert_eq!(access.len(), 1, "{access:#?}");
    assert_eq!(access[0]["status"], 499, "{access:#?}");
    assert_eq!(host.fanout.stats().instances_in_use, 0);
    Ok(())
}

/// Reads what the server sends on `stream` until it closes the connection,
/// or `None` if it is still open after `wait`.
async fn until_closed(stream: &mut TcpStream, wait: std::time::Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    tokio::time::timeout(wait, stream.read_to_end(&mut read))
        .await
        .ok()
        .map(|_| read)
}

/// The host with the three product upstreams and these connection limits.
async fn host_with(
    upstreams: &ProductUpstreams,
    set: impl FnOnce(&mut Limits),
) -> Result<TestHost> {
    let mut limits = fanout_tests::limits();
    set(&mut limits);
    TestHost::start(upstreams.builder().limits(limits).build()?).await
}

#[tokio::test]
async fn half_sent_heads_are_closed_after_the_header_timeout() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = host_with(&upstreams, |l| l.header_timeout = MS(300)).await?;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut client = TcpStream::connect(host.addr).await?;
        client
            .write_all(b"GET /products/1 HTTP/1.1\r\nhost: fa")
            .await?;
        slow.push(client);
    }
    // An idle keep-alive connection counts as slow too.
    let mut idle = TcpStream::connect(host.addr).await?;
    // Meanwhile the host serves.
    let started = Instant::now();
    let answer = host.get("/products/1").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    for client in slow.iter_mut().chain([&mut idle]) {
        let closed = until_closed(client, MS(2000)).await;
        assert!(closed.is_some(), "a slow client is still connected");
    }
    let took = started.elapsed();
    assert!(took >= MS(250), "closed before the timeout: {took:?}");
    // Counted: the 50 half-sent heads and the connection that sent none;
    // not the test client's own, idle after its answer until the timeout
    // closes it too.
    assert_eq!(
        until_metric(&host, "fanout_connections_open", 0.0).await,
        Some(0.0)
    );
    assert_eq!(
        host.metric(r#"fanout_request_heads_refused_total{cause="head_timeout"}"#),
        Some(51.0)
    );
    Ok(())
}

#[tokio::test]
async fn the_connection_cap_holds_and_frees_as_connections_close() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = host_with(&upstreams, |l| l.max_connections = 4).await?;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(host.addr).await?);
    }
    // The fifth gets through the kernel's backlog, not to the server.
    let fifth = tokio::spawn({
        let url = host.url("/products/1");
        async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
            client
                .get(url.parse()?)
                .await
                .map(|r| r.status())
                .map_err(anyhow::Error::from)
        }
    });
    tokio::time::sleep(MS(300)).await;
    assert!(
        !fifth.is_finished(),
        "a fifth connection was served at the cap"
    );
    assert_eq!(
        host.metric("fanout_connections_open"),
        Some(4.0),
        "the gauge shows the cap"
    );
    drop(held.pop());
    let status = tokio::time::timeout(MS(2000), fifth).await???;
    assert_eq!(status, StatusCode::OK);
    // Every client gone (the fifth's pool with its task): the gauge
    // comes back to zero as the server sees each close.
    drop(held);
    assert_eq!(
        until_metric(&host, "fanout_connections_open", 0.0).await,
        Some(0.0),
        "connections still counted open"
    );
    Ok(())
}

#[tokio::test]
async fn oversized_and_malformed_heads_are_client_errors() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    let raw = |head: Vec<u8>| async move {
        let mut client = TcpStream::connect(host.addr).await?;
        client.write_all(&head).await?;
        let read = until_closed(&mut client, MS(2000))
            .await
            .unwrap_or_default();
        anyhow::Ok(String::from_utf8_lossy(&read).into_owned())
    };
    // A Host that is not an authority: the JSON shape, 400, nothing leaked.
    let answer =
        raw(b"GET /products/1 HTTP/1.1\r\nhost: caf\xc3\xa9\r\nconnection: close\r\n\r\n".to_vec())
            .await?;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"bad_request""#), "{answer}");
    assert_eq!(host.fanout.stats().instances_in_use, 0);
    // Too many header fields, and too large a head: 431 from the server,
    // in the same shape.
    let mut many = b"GET /products/1 HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let answer = raw(many).await?;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        answer.contains(r#""code":"request_head_too_large""#),
        "{answer}"
    );
    let mut large = b"GET /products/1 HTTP/1.1\r\nhost: a\r\nx-big: ".to_vec();
    large.extend(std::iter::repeat_n(b'a', 64 << 10));
    large.extend_from_slice(b"\r\n\r\n");
    let answer = raw(large).await?;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        answer.contains(r#""code":"request_head_too_large""#),
        "{answer}"
    );
    // Garbage is a 400.
    let answer = raw(b"\x16\x03\x01 not http\r\n\r\n".to_vec()).await?;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"malformed_request""#), "{answer}");
    // After an answer on the same connection, too.
    let answer = raw(
        b"GET /products/1 HTTP/1.1\r\nhost: a\r\n\r\nGET /products/1 HTTP/1.1\r\nbad header\r\n\r\n"
            .to_vec(),
    )
    .await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let second = &answer[answer.find("HTTP/1.1 400").expect("a 400 after the 200")..];
    assert!(second.contains(r#""code":"malformed_request""#), "{answer}");
    // An HTTP/2 client (prior knowledge) on this HTTP/1.1 port: told so
    // in HTTP/2 (GOAWAY, HTTP_1_1_REQUIRED), and closed.
    let answer = raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()).await?;
    assert!(answer.ends_with("this port speaks HTTP/1.1"), "{answer:?}");
    // No handler saw those, but the metrics count each by its cause (as
    // its connection ends, a moment after the client sees it close).
    for (cause, count) in [
        ("head_too_large", 2.0),
        ("malformed", 2.0),
        ("http2_preface", 1.0),
    ] {
        let series = format!("fanout_request_heads_refused_total{{cause=\"{cause}\"}}");
        assert_eq!(
            until_metric(&host, &series, count).await,
            Some(count),
            "{series}"
        );
    }
    // And the host still serves.
    assert_eq!(host.get("/products/1").await?.status, StatusCode::OK);
    Ok(())
}

/// The value of `series` once it is `want`, or its last within a bound.
async fn until_metric(host: &TestHost, series: &str, want: f64) -> Option<f64> {
    let deadline = Instant::now() + MS(2000);
    loop {
        let value = host.metric(series);
        if value == Some(want) || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(MS(1)).await;
    }
}

#[tokio::test]
async fn http_upstreams_get_a_circuit_breaker_by_default() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    upstreams
        .pricing
        .set_behaviour(fanout_tests::Behaviour::status(503));
    let host = upstreams.host().await?;
    for _ in 0..4 {
        let answer = host.get("/products/1").await?;
        assert!(answer.status.is_server_error(), "{}", answer.json);
    }
    // Three attempts a request: the fourth request's first is the tenth
    // failure in a row, which opens the circuit, and the rest cost pricing
    // nothing.
    assert_eq!(upstreams.pricing.calls().len(), 10);
    assert_eq!(host.get("/products/1").await?.error_code(), "upstream_shed");
    Ok(())
}

#[tokio::test]
async fn calls_cut_off_by_a_short_budget_do_not_open_a_circuit() -> Result<()> {
    use fanout_guest::protocol::TIMEOUT_HEADER;
    // Upstreams that answer in 40 ms. Under overload a request that waited
    // in line gives its calls a few milliseconds; so does a client that
    // asks for a 10 ms budget. Their timeouts say nothing of the upstreams,
    // and five in a row used to open each circuit for 5 s.
    let upstreams = ProductUpstreams::start(MS(40)).await?;
    let host = upstreams.host().await?;
    assert_eq!(host.get("/products/1").await?.status, StatusCode::OK);
    for i in 0..8 {
        let answer = host
            .get_with(&format!("/products/{i}"), &[(TIMEOUT_HEADER, "10")])
            .await?;
        assert_eq!(
            answer.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{}",
            answer.json
        );
    }
    let cut_off = upstreams
        .pricing
        .calls()
        .iter()
        .filter(|c| c.cut_off())
        .count();
    assert!(cut_off >= 5, "{cut_off} calls cut off");
    let answer = host.get("/products/1").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    Ok(())
}

/// `GET /products?ids=0,...,99` asking for `budget`.
async fn largest_batch(host: &TestHost, budget: Duration) -> Result<fanout_tests::Answer> {
    use fanout_guest::config::MAX_BATCH_IDS;
    use fanout_guest::protocol::TIMEOUT_HEADER;
    let ids: Vec<String> = (0..MAX_BATCH_IDS).map(|i| i.to_string()).collect();
    let budget = budget.as_millis().to_string();
    host.get_with(
        &format!("/products?ids={}", ids.join(",")),
        &[(TIMEOUT_HEADER, &budget)],
    )
    .await
}

#[tokio::test]
async fn the_largest_batch_with_the_largest_budget_completes() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(10)).await?;
    let host = upstreams.host().await?;
    let answer = largest_batch(&host, fanout_guest::config::DEFAULT_MAX_DEADLINE).await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let items = answer.json["items"].as_array().expect("items");
    assert_eq!(items.len(), fanout_guest::config::MAX_BATCH_IDS);
    let whole = items
        .iter()
        .filter(|item| item["degraded"] == serde_json::json!([]) && item["price"]["amount"] == 12.5)
        .count();
    assert_eq!(whole, items.len(), "every item whole");
    println!(
        "largest batch: {} fuel, {:?}",
        host.fanout.stats().fuel_consumed,
        answer.elapsed
    );
    Ok(())
}

#[tokio::test]
async fn the_largest_batch_with_every_retry_spent_completes() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(10)).await?;
    upstreams
        .reviews
        .set_behaviour(fanout_tests::Behaviour::status(503));
    // No breaker or retry budget to save the guest its attempts: all 300
    // reviews attempts go out. The fuel is under test, not the time: 5 s
    // of budget, not the default 1 s most a client may ask for, which the
    // 500 calls and their backoffs took ~380 ms of alone but used up with
    // the other tests and two busy loops beside them (an item's inventory
    // call cut off at 1.03 s).
    let budget = Duration::from_secs(5);
    let fanout = upstreams
        .builder()
        .guardrails("reviews", fanout_host::guard::Guardrails::default())
        .env(
            fanout_guest::protocol::ENV_CONFIG,
            serde_json::json!({"max_deadline_ms": budget.as_millis() as u64}).to_string(),
        )
        .limits(Limits {
            deadline: budget * 2,
            ..fanout_tests::limits()
        })
        .build()?;
    let host = TestHost::start(fanout).await?;
    let answer = largest_batch(&host, budget).await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.error_code());
    assert_eq!(
        answer.json["items"][99]["degraded"],
        serde_json::json!(["reviews"])
    );
    assert_eq!(upstreams.reviews.calls().len(), 300);
    println!(
        "largest batch, every reviews attempt failing: {} fuel, {:?}",
        host.fanout.stats().fuel_consumed,
        answer.elapsed
    );
    Ok(())
}

/// `GET /products/1` with pricing (required) replaced by `fault`: the
/// answer, and how many calls pricing took.
async fn with_faulty_pricing(fault: fanout_tests::Fault) -> Result<(fanout_tests::Answer, usize)> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let pricing = fanout_tests::FaultyUpstream::start(fault).await?;
    let fanout = upstreams
        .builder()
        .http_upstream("pricing", pricing.base_url())
        .build()?;
    let host = TestHost::start(fanout).await?;
    let answer = host.get("/products/1").await?;
    // The default budget is 200 ms; the answer never comes later.
    assert!(
        answer.elapsed < MS(300),
        "{:?}: {}",
        answer.elapsed,
        answer.json
    );
    assert_eq!(host.fanout.stats().instances_in_use, 0);
    Ok((answer, pricing.calls()))
}

fn assert_error(answer: &fanout_tests::Answer, status: u16, code: &str) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.json);
    assert_eq!(answer.error_code(), code, "{}", answer.json);
    assert_eq!(
        answer.json["error"]["upstream"], "pricing",
        "{}",
        answer.json
    );
}

mod faults {
    use super::*;
    use fanout_tests::Fault;

    #[tokio::test]
    async fn refused() -> Result<()> {
        let (answer, _) = with_faulty_pricing(Fault::Refuse).await?;
        assert_error(&answer, 502, "upstream_unavailable");
        Ok(())
    }

    #[tokio::test]
    async fn reset_mid_body() -> Result<()> {
        let (answer, calls) = with_faulty_pricing(Fault::ResetMidBody).await?;
        assert_eq!(answer.status.as_u16(), 502, "{}", answer.json);
        assert_eq!(calls, 3, "a transport failure is retried");
        Ok(())
    }

    #[tokio::test]
    async fn hang() -> Result<()> {
        let (answer, _) = with_faulty_pricing(Fault::Hang).await?;
        assert_error(&answer, 504, "upstream_timeout");
        assert!(answer.elapsed >= MS(150), "{:?}", answer.elapsed);
        Ok(())
    }

    #[tokio::test]
    async fn slow_body() -> Result<()> {
        // About 150 bytes at 5 ms each: well past the budget.
        let (answer, _) = with_faulty_pricing(Fault::SlowBody(MS(5))).await?;
        assert_error(&answer, 504, "upstream_timeout");
        Ok(())
    }

    #[tokio::test]
    async fn server_error() -> Result<()> {
        let (answer, calls) = with_faulty_pricing(Fault::Status(500)).await?;
        assert_error(&answer, 502, "upstream_error");
        assert_eq!(calls, 1, "a 500 is not retried");
        Ok(())
    }

    #[tokio::test]
    async fn throttled_with_retry_after() -> Result<()> {
        for status in [429, 503] {
            // Asked to wait a second, with 200 ms of budget: no retry at all.
            let (answer, calls) = with_faulty_pricing(Fault::Throttle(status, "1")).await?;
            assert_error(&answer, 502, "upstream_error");
            assert_eq!(calls, 1, "{status}");
            // A date is not within this request either.
            let later = "Wed, 21 Oct 2099 07:28:00 GMT";
            let (_, calls) = with_faulty_pricing(Fault::Throttle(status, later)).await?;
            assert_eq!(calls, 1, "{status}");
            // Asked to wait nothing: retried as usual.
            let (answer, calls) = with_faulty_pricing(Fault::Throttle(status, "0")).await?;
            assert_error(&answer, 502, "upstream_error");
            assert_eq!(calls, 3, "{status}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn bad_json() -> Result<()> {
        let (answer, calls) = with_faulty_pricing(Fault::BadJson).await?;
        assert_error(&answer, 502, "upstream_invalid_response");
        assert_eq!(calls, 1);
        Ok(())
    }

    #[tokio::test]
    async fn oversized() -> Result<()> {
        let too_big = fanout_guest::errors::MAX_UPSTREAM_BODY + 1;
        let (answer, _) = with_faulty_pricing(Fault::Oversized(too_big)).await?;
        assert_error(&answer, 502, "upstream_invalid_response");
        Ok(())
    }

    #[tokio::test]
    async fn flaky() -> Result<()> {
        let (answer, calls) = with_faulty_pricing(Fault::Flaky).await?;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        assert_eq!(answer.json["price"]["amount"], 12.5);
        assert_eq!(calls, 2, "503, then the retry's 200");
        Ok(())
    }
}

#[tokio::test]
async fn tracestate_beyond_the_w3c_limits_is_not_passed_on() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = upstreams.host().await?;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let long = format!("vendor={}", "x".repeat(600));
    let answer = host
        .get_with(
            "/products/1",
            &[("traceparent", traceparent), ("tracestate", &long)],
        )
        .await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    for call in upstreams.pricing.calls() {
        assert!(
            call.headers.get("tracestate").is_none(),
            "{:?}",
            call.headers
        );
    }
    // 60 KB of it does not even get in: the head is over its limit.
    let huge = format!("vendor={}", "x".repeat(60 << 10));
    let answer = host
        .get_with("/products/1", &[("tracestate", &huge)])
        .await?;
    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(answer.error_code(), "request_head_too_large");
    Ok(())
}
