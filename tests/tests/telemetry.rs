//! Observability: Prometheus metrics after known traffic, the admin
//! endpoints, and the access log with trace ids and upstream outcomes.

use anyhow::Result;
use fanout_host::Limits;
use fanout_tests::{Behaviour, MS, ProductUpstreams, TestHost, sample};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};

async fn get(url: &str) -> Result<(StatusCode, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let response = client.get(url.parse()?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn metrics_count_known_traffic() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let host = TestHost::start(upstreams.builder().build()?).await?;
    for _ in 0..3 {
        assert_eq!(host.get("/products/1").await?.status, StatusCode::OK);
    }
    upstreams.pricing.script(vec![Behaviour::status(503)]);
    assert_eq!(host.get("/products/2").await?.status, StatusCode::OK);
    assert_eq!(
        host.get("/products/bad.id").await?.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(host.get("/products?ids=a,b").await?.status, StatusCode::OK);

    // Through the admin listener, as Prometheus scrapes it.
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = admin.local_addr()?;
    let fanout = host.fanout.clone();
    tokio::spawn(async move { fanout.serve_admin(admin, std::future::pending()).await });
    let (status, metrics) = get(&format!("http://{addr}/metrics")).await?;
    assert_eq!(status, StatusCode::OK);

    let server = |route: &str, status: u16| {
        sample(
            &metrics,
            &format!(
                "http_server_request_duration_seconds_count{{route=\"{route}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(server("/products/{id}", 200), Some(4.0), "{metrics}");
    assert_eq!(server("/products/{id}", 400), Some(1.0));
    assert_eq!(server("/products", 200), Some(1.0));
    let client = |upstream: &str, outcome: &str| {
        sample(
            &metrics,
            &format!(
                "http_client_request_duration_seconds_count{{upstream=\"{upstream}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(client("pricing", "ok"), Some(6.0), "4 single + 2 batch");
    assert_eq!(client("pricing", "error"), Some(1.0), "the 503");
    assert_eq!(client("inventory", "ok"), Some(6.0));
    assert_eq!(
        sample(
            &metrics,
            "fanout_upstream_retries_total{upstream=\"pricing\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&metrics, "fanout_fuel_consumed_count"), Some(6.0));
    assert!(sample(&metrics, "fanout_fuel_consumed_sum").unwrap() > 6.0 * 50_000.0);
    assert_eq!(sample(&metrics, "fanout_instances_in_use"), Some(0.0));
    assert!(metrics.trim_end().ends_with("# EOF"));

    assert_eq!(
        get(&format!("http://{addr}/healthz")).await?.0,
        StatusCode::OK
    );
    let (status, ready) = get(&format!("http://{addr}/readyz")).await?;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(
        get(&format!("http://{addr}/nope")).await?.0,
        StatusCode::NOT_FOUND
    );
    Ok(())
}

#[tokio::test]
async fn sheds_and_guest_failures_are_counted() -> Result<()> {
    let limits = Limits {
        max_instances: 1,
        deadline: MS(300),
        ..fanout_tests::limits()
    };
    let fanout = fanout_tests::builder()
        .component_path(fanout_tests::HOSTILE_COMPONENT_PATH)
        .limits(limits)
        .admission(fanout_host::AdmissionMode::Fixed)
        .build()?;
    let host = TestHost::start(fanout).await?;
    let (parked, shed) = tokio::join!(host.get("/park"), async {
        while host.fanout.stats().instances_in_use == 0 {
            tokio::task::yield_now().await;
        }
        host.get("/ok").await
    });
    assert_eq!(shed?.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(parked?.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        host.get("/panic").await?.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let metrics = host.fanout.metrics().encode();
    assert_eq!(
        sample(&metrics, "fanout_shed_total{cause=\"queue_timeout\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "fanout_guest_failures_total{cause=\"guest_trap\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "fanout_guest_failures_total{cause=\"deadline_exceeded\"}"
        ),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test]
async fn the_access_log_names_the_trace_and_every_upstream_call() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    upstreams.reviews.set_behaviour(Behaviour::hang());
    let host = TestHost::start(upstreams.builder().build()?).await?;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answer = host
        .get_with(
            "/products/9",
            &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
        )
        .await?;
    assert_eq!(answer.status, StatusCode::OK);
    // Without a traceparent the host starts a trace, and it is the one the
    // upstreams see.
    host.get("/products/10").await?;

    let events = logs.events();
    let access: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["target"] == "fanout::access")
        .collect();
    assert_eq!(access.len(), 2, "{events:#?}");
    let first = access[0];
    assert_eq!(first["trace_id"], trace);
    assert_eq!(first["route"], "/products/{id}");
    assert_eq!(first["status"], 200);
    assert!(
        first["duration_ms"].as_f64().unwrap() >= 190.0,
        "reviews hung to the deadline"
    );
    let calls = first["upstreams"].as_str().unwrap();
    assert!(
        calls.contains("inventory:ok:") && calls.contains("pricing:ok:"),
        "{calls}"
    );
    assert!(calls.contains("reviews:timeout:"), "{calls}");

    let second = access[1]["trace_id"].as_str().unwrap();
    assert_eq!(second.len(), 32);
    assert_ne!(second, trace);
    let seen = upstreams.inventory.calls()[1].headers["traceparent"]
        .to_str()?
        .to_string();
    assert!(seen.contains(second), "{seen} vs {second}");
    Ok(())
}

#[tokio::test]
async fn guest_output_carries_the_trace_id() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    let fanout = fanout_tests::builder()
        .component_path(fanout_tests::HOSTILE_COMPONENT_PATH)
        .build()?;
    let host = TestHost::start(fanout).await?;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    host.get_with(
        "/print",
        &[("traceparent", &format!("00-{trace}-b7ad6b7169203331-01"))],
    )
    .await?;
    let events = logs.events();
    let line = events
        .iter()
        .find(|e| e["target"] == "fanout::guest" && e["stream"] == "stdout")
        .expect("the guest's stdout line");
    assert_eq!(line["trace_id"], trace);
    Ok(())
}
