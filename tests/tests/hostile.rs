//! Hostile guests: each misdeed is stopped by the limit meant for it, answered
//! with a JSON error naming the cause, and the host keeps serving.

use anyhow::{Context, Result};
use fanout_host::{Fanout, Limits};
use fanout_tests::{Answer, MS, MockUpstream, TestHost};
use http::StatusCode;
use serde_json::json;
use std::time::Duration;

fn hostile(limits: Limits) -> Result<Fanout> {
    Ok(hostile_builder(limits).build()?)
}

/// The hostile guests on a runtime of their own
/// ([`fanout_host::FanoutBuilder::guest_threads`]).
fn hostile_on_guest_threads(limits: Limits) -> Result<Fanout> {
    Ok(hostile_builder(limits).guest_threads(1).build()?)
}

fn hostile_builder(limits: Limits) -> fanout_host::FanoutBuilder {
    fanout_tests::builder()
        .component_path(fanout_tests::HOSTILE_COMPONENT_PATH)
        .cache_dir(fanout_tests::cache_dir())
        .limits(limits)
        // These tests drive the instance pool itself; adaptive admission
        // has its own tests.
        .admission(fanout_host::AdmissionMode::Fixed)
}

fn limits(deadline: Duration) -> Limits {
    Limits {
        memory_bytes: 16 << 20,
        deadline,
        max_instances: 4,
        ..fanout_tests::limits()
    }
}

/// Sends `path`, checks status, code and timing, then checks that a normal
/// request on the same host still succeeds.
///
/// A misdeed that no limit stops (a loop without fuel, were the epoch not
/// advancing) would block the runtime's thread for good and hang the test:
/// the watchdog fails it instead.
async fn misbehave(host: &TestHost, path: &str, status: StatusCode, code: &str) -> Result<()> {
    let _watchdog = fanout_tests::watchdog("a hostile guest no limit stopped", MS(60_000));
    let deadline = host.fanout.limits().deadline;
    let answer = host.get(path).await?;
    assert_eq!(answer.status, status, "{path}: {}", answer.json);
    assert_eq!(answer.error_code(), code, "{path}");
    assert!(answer.json["error"]["message"].is_string());
    assert!(
        answer.elapsed < deadline + MS(500),
        "{path} answered after {:?}, deadline {deadline:?}",
        answer.elapsed
    );
    let after = host.get("/ok").await?;
    assert_eq!(after.status, StatusCode::OK, "after {path}: {}", after.json);
    assert_eq!(after.json, json!({"ok": true}));
    Ok(())
}

#[tokio::test]
async fn an_infinite_loop_runs_out_of_fuel() -> Result<()> {
    let host = TestHost::start(hostile(limits(Duration::from_secs(5)))?).await?;
    misbehave(
        &host,
        "/loop",
        StatusCode::INTERNAL_SERVER_ERROR,
        "guest_fuel_exhausted",
    )
    .await
}

#[tokio::test]
async fn an_infinite_loop_without_fuel_limit_hits_the_epoch_deadline() -> Result<()> {
    let limits = Limits {
        fuel: None,
        ..limits(MS(300))
    };
    let host = TestHost::start(hostile(limits)?).await?;
    misbehave(
        &host,
        "/loop",
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
    )
    .await
}

#[tokio::test]
async fn a_memory_hog_hits_the_memory_cap() -> Result<()> {
    // Unlimited fuel: zeroing 16 MiB costs ~10M fuel, and this test is about
    // the memory cap alone.
    let limits = Limits {
        fuel: None,
        ..limits(Duration::from_secs(5))
    };
    let host = TestHost::start(hostile(limits)?).await?;
    misbehave(
        &host,
        "/hog",
        StatusCode::INTERNAL_SERVER_ERROR,
        "guest_memory_limit",
    )
    .await
}

#[tokio::test]
async fn a_panic_is_a_trap() -> Result<()> {
    let host = TestHost::start(hostile(limits(Duration::from_secs(5)))?).await?;
    misbehave(
        &host,
        "/panic",
        StatusCode::INTERNAL_SERVER_ERROR,
        "guest_trap",
    )
    .await
}

#[tokio::test]
async fn a_parked_guest_hits_the_wall_clock_deadline() -> Result<()> {
    let host = TestHost::start(hostile(limits(MS(300)))?).await?;
    let answer = host.get("/park").await?;
    assert!(answer.elapsed >= MS(300), "{:?}", answer.elapsed);
    misbehave(
        &host,
        "/park",
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
    )
    .await
}

/// With the only instance held by `/park` (for 400 ms, to its deadline),
/// asks for `/ok`. Returns the host, the parked answer and the second one.
async fn behind_a_parked_guest(queue_wait: Duration) -> Result<(TestHost, Answer, Answer)> {
    behind_a_parked_guest_on(hostile, queue_wait).await
}

async fn behind_a_parked_guest_on(
    build: fn(Limits) -> Result<Fanout>,
    queue_wait: Duration,
) -> Result<(TestHost, Answer, Answer)> {
    let limits = Limits {
        max_instances: 1,
        queue_wait,
        ..limits(MS(400))
    };
    let host = TestHost::start(build(limits)?).await?;
    let (parked, second) = tokio::join!(host.get("/park"), async {
        // Wait until the parked request really holds the instance.
        while host.fanout.stats().instances_in_use == 0 {
            tokio::task::yield_now().await;
        }
        host.get("/ok").await
    });
    Ok((host, parked?, second?))
}

fn assert_shed(answer: &Answer, code: &str) {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.json
    );
    assert_eq!(answer.error_code(), code);
    assert_eq!(answer.headers["retry-after"], "1");
}

#[tokio::test]
async fn a_wait_in_line_is_bounded() -> Result<()> {
    // Nothing has been measured yet, so the second request may wait, but
    // only its 100 ms.
    let (host, parked, waited) = behind_a_parked_guest(MS(100)).await?;
    assert_shed(&waited, "queue_timeout");
    assert!(
        (MS(95)..MS(300)).contains(&waited.elapsed),
        "{:?}",
        waited.elapsed
    );
    assert_eq!(parked.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(host.get("/ok").await?.status, StatusCode::OK);
    let metrics = host.fanout.metrics().encode();
    assert!(
        metrics.contains("fanout_queue_wait_seconds_count 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_full_pool_sheds_with_503() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    // No waiting in line: a full pool sheds at once.
    let (host, parked, shed) = behind_a_parked_guest(Duration::ZERO).await?;
    // A shed is in the access log, and no warning: under a flood there
    // would be one per 503.
    let events = logs.events();
    assert!(
        events
            .iter()
            .any(|e| e["target"] == "fanout::access" && e["status"] == 503),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["level"] == "WARN" && e["cause"] == "pool_full"),
        "{events:?}"
    );
    assert_shed(&shed, "pool_full");
    assert!(
        shed.elapsed < MS(100),
        "shedding must be fast: {:?}",
        shed.elapsed
    );
    assert_eq!(parked.status, StatusCode::GATEWAY_TIMEOUT);
    // The slot is free again.
    assert_eq!(host.get("/ok").await?.status, StatusCode::OK);
    assert_eq!(host.fanout.stats().instances_in_use, 0);
    Ok(())
}

/// Sheds while the only instance is parked, re-sent at once as wrk would,
/// on a host built with `shed_lines`; the access lines of the sheds and
/// whether the parked request's 504 kept its line.
async fn flood_of_sheds(shed_lines: Option<u32>) -> Result<(Vec<serde_json::Value>, bool)> {
    let logs = fanout_tests::capture_logs();
    let limits = Limits {
        max_instances: 1,
        queue_wait: Duration::ZERO,
        ..limits(MS(400))
    };
    let mut builder = hostile_builder(limits);
    if let Some(lines) = shed_lines {
        builder = builder.shed_lines_per_second(lines);
    }
    let host = TestHost::start(builder.build()?).await?;
    let (parked, sheds) = tokio::join!(host.get("/park"), async {
        while host.fanout.stats().instances_in_use == 0 {
            tokio::task::yield_now().await;
        }
        let mut sheds = Vec::new();
        while sheds.len() < FLOOD {
            sheds.push(host.get("/ok").await);
        }
        sheds
    });
    assert_eq!(parked?.status, StatusCode::GATEWAY_TIMEOUT);
    let shed = sheds
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    // The parked guest holds the instance for 400 ms: time for all.
    assert_eq!(shed, FLOOD);
    let metrics = host.fanout.metrics().encode();
    assert!(
        metrics.contains(&format!(
            r#"fanout_shed_total{{cause="pool_full"}} {FLOOD}"#
        )),
        "every shed is counted: {metrics}"
    );
    let events = logs.events();
    let timed_out = events
        .iter()
        .any(|e| e["target"] == "fanout::access" && e["status"] == 504);
    let lines = events
        .into_iter()
        .filter(|e| e["target"] == "fanout::access" && e["status"] == 503)
        .collect();
    Ok((lines, timed_out))
}

/// Sheds in [`flood_of_sheds`].
const FLOOD: usize = 60;

#[tokio::test]
async fn a_flood_of_sheds_is_logged_a_few_lines_a_second() -> Result<()> {
    use fanout_host::telemetry::SHED_LINES_PER_SECOND;
    let (lines, timed_out) = flood_of_sheds(None).await?;
    // The first second's worth, and a second's more if the flood
    // straddled one.
    let most = 2 * SHED_LINES_PER_SECOND as usize;
    assert!(
        !lines.is_empty() && lines.len() <= most,
        "{} lines for {FLOOD} sheds: {lines:#?}",
        lines.len()
    );
    // Each line says how many sheds it stands for; none is counted twice.
    let stood_for: u64 = lines
        .iter()
        .map(|e| 1 + e["sheds_not_logged"].as_u64().expect("a count"))
        .sum();
    assert!(stood_for <= FLOOD as u64, "{lines:#?}");
    // The other answers keep a line each.
    assert!(timed_out);
    Ok(())
}

#[tokio::test]
async fn an_operator_may_log_every_shed() -> Result<()> {
    let (lines, timed_out) = flood_of_sheds(Some(0)).await?;
    assert_eq!(lines.len(), FLOOD, "{lines:#?}");
    assert!(lines.iter().all(|e| e.get("sheds_not_logged").is_none()));
    assert!(timed_out);
    Ok(())
}

#[tokio::test]
async fn guest_output_and_failures_are_logged() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    let host = TestHost::start(hostile(limits(Duration::from_secs(5)))?).await?;
    assert_eq!(host.get("/print").await?.status, StatusCode::OK);
    assert_eq!(
        host.get("/panic").await?.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let events = logs.events();
    let guest_line = |stream: &str, text: &str| {
        events.iter().any(|e| {
            e["target"] == "fanout::guest" && e["stream"] == stream && e["message"] == text
        })
    };
    // Each line of guest output is its own structured event.
    assert!(
        guest_line("stdout", "hello from the guest's stdout"),
        "{events:#?}"
    );
    assert!(
        guest_line("stderr", "hello from the guest's stderr"),
        "{events:#?}"
    );
    // The panic message is captured too, and the trap is logged with its cause.
    assert!(
        events.iter().any(|e| e["stream"] == "stderr"
            && e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("panics on purpose")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["cause"] == "guest_trap" && e["path"] == "/panic"),
        "{events:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn unconfigured_authorities_are_denied() -> Result<()> {
    let allowed = MockUpstream::inventory(MS(0)).await?;
    let stranger = MockUpstream::inventory(MS(0)).await?;
    let fanout = fanout_tests::builder()
        .component_path(fanout_tests::HOSTILE_COMPONENT_PATH)
        .http_upstream("inventory", allowed.base_url())
        .build()?;
    let host = TestHost::start(fanout).await?;

    let answer = host.get(&format!("/call?{}/x", allowed.base_url())).await?;
    assert_eq!(answer.json, json!({"status": 200}));
    assert_eq!(allowed.calls().len(), 1);

    for target in [
        stranger.base_url(),
        // Same host as the allowed upstream, another port.
        format!(
            "http://127.0.0.1:{}",
            stranger.base_url().rsplit(':').next().unwrap()
        ),
        "http://localhost:1".to_string(),
        "http://169.254.169.254".to_string(),
        "http://inventory.demo".to_string(),
    ] {
        let answer = host.get(&format!("/call?{target}/x")).await?;
        assert_eq!(
            answer.json,
            json!({"error": "ErrorCode::HttpRequestDenied"}),
            "{target}"
        );
    }
    assert!(
        stranger.calls().is_empty(),
        "a denied request reached the network"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_beyond_the_pool_gets_only_200s_and_503s() -> Result<()> {
    // Regression: a permit was released before the store (and its pool
    // slot), so a request admitted in between failed to instantiate with
    // "maximum concurrent limit reached" (a 500).
    let limits = Limits {
        max_instances: 2,
        ..limits(Duration::from_secs(5))
    };
    let host = TestHost::start(hostile(limits)?).await?;
    // Requests from several threads at once: the race needs another thread
    // to take the permit between the two drops.
    let host = std::sync::Arc::new(host);
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { host.get("/ok").await })
        })
        .collect();
    let answers = futures_util::future::join_all(tasks).await;
    let mut statuses = std::collections::BTreeMap::new();
    for answer in answers {
        let answer = answer??;
        *statuses.entry(answer.status.as_u16()).or_insert(0) += 1;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            // Shed at the door, or after a bounded wait in line.
            assert!(
                ["overloaded", "pool_full", "queue_full", "queue_timeout"]
                    .contains(&answer.error_code()),
                "{}",
                answer.json
            );
        }
    }
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 2,
        "{statuses:?}"
    );
    Ok(())
}

/// The bytes `/stream?n` sends.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn on_guest_threads_answers_cross_whole_and_intact() -> Result<()> {
    // Writing the pattern byte by byte takes more fuel than the default.
    let limits = Limits {
        fuel: Some(1 << 30),
        ..limits(Duration::from_secs(5))
    };
    let host = TestHost::start(hostile_on_guest_threads(limits)?).await?;
    assert_eq!(host.get("/ok").await?.json, json!({"ok": true}));
    let big = 4 * fanout_host::limits::HANDOFF_BUFFER + 12_345;
    for n in [0, 1000, 100_000, big] {
        let (head, body, _) = host.get_raw(&format!("/stream?{n}")).await?;
        assert_eq!(head.status, StatusCode::OK);
        let body = body?;
        assert_eq!(body.len(), n);
        assert!(
            body == pattern(n),
            "/stream?{n}: the body changed on the way"
        );
        // A body within the buffer was read to its end before it crossed,
        // so its length is known; a larger one streams on, chunked.
        let length = head.headers.get(http::header::CONTENT_LENGTH);
        if n <= fanout_host::limits::HANDOFF_BUFFER {
            assert_eq!(length.map(|v| v.to_str().unwrap()), Some(&*n.to_string()));
        } else {
            assert_eq!(length, None, "/stream?{n}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn on_guest_threads_the_limits_still_hold() -> Result<()> {
    let deadline = MS(400);
    let host = TestHost::start(hostile_on_guest_threads(limits(deadline))?).await?;
    misbehave(
        &host,
        "/loop",
        StatusCode::INTERNAL_SERVER_ERROR,
        "guest_fuel_exhausted",
    )
    .await?;
    misbehave(
        &host,
        "/panic",
        StatusCode::INTERNAL_SERVER_ERROR,
        "guest_trap",
    )
    .await?;
    misbehave(
        &host,
        "/park",
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
    )
    .await?;
    assert_eq!(host.get("/ok").await?.status, StatusCode::OK);
    assert_eq!(host.fanout.stats().instances_in_use, 0);
    Ok(())
}

/// A guest that fails after its answer's head is out: the client must see
/// a broken body, never a short one that passes for complete.
#[tokio::test]
async fn a_body_the_guest_leaves_unfinished_ends_in_an_error() -> Result<()> {
    let deadline = MS(400);
    for (mode, build) in [
        ("one runtime", hostile as fn(Limits) -> Result<Fanout>),
        ("guest threads", hostile_on_guest_threads),
    ] {
        // 10M fuel runs out a few hundred KiB into this body, past the
        // guest threads' buffer: the head is out on both.
        let limits = Limits {
            fuel: Some(10_000_000),
            ..limits(deadline)
        };
        let host = TestHost::start(build(limits)?).await?;
        let (head, body, _) = host.get_raw("/stream?4000000").await.context(mode)?;
        assert_eq!(head.status, StatusCode::OK, "{mode}");
        assert!(body.is_err(), "{mode}: fuel: {body:?}");
        // This one stops after its first piece and waits: the deadline.
        let (head, body, elapsed) = host.get_raw("/stall").await.context(mode)?;
        assert!(
            (deadline..deadline + MS(500)).contains(&elapsed),
            "{mode}: {elapsed:?}"
        );
        if mode == "one runtime" {
            assert_eq!(head.status, StatusCode::OK, "{mode}");
            assert!(body.is_err(), "{mode}: stall: {body:?}");
        } else {
            // The head was still held back with the body: the client gets
            // the failure's own answer.
            assert_eq!(head.status, StatusCode::GATEWAY_TIMEOUT, "{mode}");
            let json: serde_json::Value = serde_json::from_slice(&body?)?;
            assert_eq!(json["error"]["code"], "deadline_exceeded", "{json}");
        }
        let metrics = host.fanout.metrics().encode();
        for cause in ["guest_fuel_exhausted", "deadline_exceeded"] {
            assert!(
                metrics.contains(&format!(
                    "fanout_guest_failures_total{{cause=\"{cause}\"}} 1"
                )),
                "{mode}: {metrics}"
            );
        }
        assert_eq!(host.get("/ok").await?.status, StatusCode::OK, "{mode}");
        assert_eq!(host.fanout.stats().instances_in_use, 0, "{mode}");
    }
    Ok(())
}

#[tokio::test]
async fn on_guest_threads_a_full_pool_sheds_at_once() -> Result<()> {
    let (host, parked, shed) =
        behind_a_parked_guest_on(hostile_on_guest_threads, Duration::ZERO).await?;
    assert_shed(&shed, "pool_full");
    assert!(shed.elapsed < MS(100), "{:?}", shed.elapsed);
    assert_eq!(parked.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(host.get("/ok").await?.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn host_resources_held_at_once_are_capped() -> Result<()> {
    let host = TestHost::start(hostile(limits(Duration::from_secs(2)))?).await?;
    let answer = host.get("/resources?100").await?;
    assert_eq!(answer.json, json!({"held": 100}));
    let too_many = fanout_host::limits::MAX_GUEST_RESOURCES * 2;
    misbehave(
        &host,
        &format!("/resources?{too_many}"),
        StatusCode::INTERNAL_SERVER_ERROR,
        "guest_resource_limit",
    )
    .await
}

#[tokio::test]
async fn bodies_sent_to_in_process_upstreams_are_capped() -> Result<()> {
    let sink = fanout_host::adapters::from_fn(|request| async move {
        let _ = request;
        Ok(fanout_host::adapters::json_response(
            StatusCode::OK,
            &json!({}),
        ))
    });
    let fanout = hostile_builder(limits(Duration::from_secs(2)))
        .upstream("sink", "http://sink.test", sink)
        .build()?;
    let host = TestHost::start(fanout).await?;
    let small = host.get("/post?1000&http://sink.test/").await?;
    assert_eq!(small.json, json!({"status": 200}));
    let max = fanout_host::limits::MAX_IN_PROCESS_BODY;
    let answer = host
        .get(&format!("/post?{}&http://sink.test/", 2 * max))
        .await?;
    let error = answer.json["error"].as_str().unwrap_or_default();
    assert!(error.contains("HttpRequestBodySize"), "{}", answer.json);
    Ok(())
}

/// Growths past a memory's initial size are counted in the stats, the
/// memory's creation is not.
#[tokio::test]
async fn memory_growths_are_counted() -> Result<()> {
    let host = TestHost::start(hostile(limits(Duration::from_secs(2)))?).await?;
    assert_eq!(host.get("/ok").await?.status, StatusCode::OK);
    let stats = host.settled_stats().await;
    assert!(stats.instantiations >= 1, "{stats:?}");
    assert_eq!(stats.memory_growths, 0, "{stats:?}");
    // 2 MiB more than any memory the guest starts with.
    assert_eq!(host.get("/leak?2048").await?.status, StatusCode::OK);
    let stats = host.settled_stats().await;
    assert!(stats.memory_growths >= 1, "{stats:?}");
    Ok(())
}
