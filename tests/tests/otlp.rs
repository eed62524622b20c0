//! OTLP export, received in-process: the span tree of one fan-out with a
//! retried call, its parent links and attributes, and the trace context the
//! upstreams saw.
//!
//! Each test installs its subscriber for its own thread only, so the tests
//! run on the current-thread runtime: every span is created on that thread.

use anyhow::Result;
use fanout_host::telemetry::Otlp;
use fanout_tests::{Behaviour, OtlpReceiver, ProductUpstreams, ReceivedSpan, TestHost};
use http::StatusCode;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

/// Exports every span that has ended, from a blocking thread: the exporter
/// waits for the collector.
async fn flush(otlp: Otlp) -> Result<()> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        otlp.force_flush()?;
        drop(otlp);
        Ok(())
    })
    .await?
}

/// A receiver, an exporter to it, and this thread's subscriber feeding the
/// exporter (until the guard is dropped).
fn exporting() -> Result<(OtlpReceiver, Otlp, tracing::subscriber::DefaultGuard)> {
    let receiver = OtlpReceiver::start()?;
    let otlp = Otlp::to_endpoint(&receiver.endpoint())?;
    let subscriber = tracing_subscriber::registry().with(otlp.layer());
    let guard = tracing::subscriber::set_default(subscriber);
    Ok((receiver, otlp, guard))
}

/// The `traceparent` an upstream saw, split into trace id and parent id.
fn seen_traceparent(call: &fanout_tests::Call) -> (String, String) {
    let value = call.headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test]
async fn a_fan_out_with_a_retry_is_one_span_tree() -> Result<()> {
    let (receiver, otlp, _guard) = exporting()?;

    let upstreams = ProductUpstreams::start(Duration::from_millis(5)).await?;
    // Pricing fails once with a 503, then answers: one retry.
    upstreams.pricing.script(vec![Behaviour::status(503)]);
    let host = TestHost::start(upstreams.builder().build()?).await?;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let answer = host
        .get_with(
            "/products/7",
            &[("traceparent", &format!("00-{trace}-{caller_span}-01"))],
        )
        .await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    host.shutdown().await?;
    flush(otlp).await?;

    let spans: Vec<ReceivedSpan> = receiver.spans();
    let servers: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.span.kind == SERVER).collect();
    assert_eq!(servers.len(), 1, "{spans:#?}");
    let server = servers[0];
    assert_eq!(server.service.as_deref(), Some("fanout"));
    assert_eq!(server.span.name, "GET /products/{id}");
    assert_eq!(server.trace_id(), trace);
    assert_eq!(server.parent_span_id(), caller_span, "the caller's span");
    assert_eq!(
        server.attribute("http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        server.attribute("http.route").as_deref(),
        Some("/products/{id}")
    );
    assert_eq!(server.attribute("url.path").as_deref(), Some("/products/7"));
    assert_eq!(
        server.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(server.attribute("error.type"), None);

    let clients: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.span.kind == CLIENT).collect();
    let of = |upstream: &str| -> Vec<&ReceivedSpan> {
        let mut list: Vec<&ReceivedSpan> = clients
            .iter()
            .copied()
            .filter(|s| s.attribute("fanout.upstream").as_deref() == Some(upstream))
            .collect();
        list.sort_by_key(|s| s.span.start_time_unix_nano);
        list
    };
    assert_eq!(
        clients.len(),
        4,
        "inventory, pricing twice, reviews: {clients:#?}"
    );
    for client in &clients {
        assert_eq!(client.trace_id(), trace);
        assert_eq!(
            client.parent_span_id(),
            server.span_id(),
            "child of the request"
        );
        assert_eq!(client.span.name, "GET");
        assert_eq!(
            client.attribute("http.request.method").as_deref(),
            Some("GET")
        );
        assert_eq!(
            client.attribute("server.address").as_deref(),
            Some("127.0.0.1")
        );
        let url = client.attribute("url.full").unwrap();
        let port = client.attribute("server.port").unwrap();
        assert!(
            url.starts_with(&format!("http://127.0.0.1:{port}/")),
            "{url}"
        );
        // Each attempt lies inside the request.
        assert!(client.span.start_time_unix_nano >= server.span.start_time_unix_nano);
        assert!(client.span.end_time_unix_nano <= server.span.end_time_unix_nano);
    }

    let pricing = of("pricing");
    assert_eq!(pricing.len(), 2);
    let (failed, retried) = (pricing[0], pricing[1]);
    assert_eq!(
        failed.attribute("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(failed.attribute("error.type").as_deref(), Some("503"));
    assert_eq!(
        failed.span.status.as_ref().map(|s| s.code),
        Some(STATUS_ERROR)
    );
    assert_eq!(failed.attribute("http.request.resend_count"), None);
    assert_eq!(
        retried.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        retried.attribute("http.request.resend_count").as_deref(),
        Some("1")
    );
    assert_eq!(retried.attribute("error.type"), None);
    assert!(retried.span.start_time_unix_nano >= failed.span.end_time_unix_nano);
    assert!(
        pricing[0]
            .attribute("url.full")
            .unwrap()
            .ends_with("/pricing/7"),
        "{:?}",
        pricing[0].attribute("url.full")
    );

    // Each upstream saw the trace, with the attempt's own client span as the
    // parent: the upstream's spans hang under the call that made them.
    let seen: Vec<(String, String)> = upstreams
        .pricing
        .calls()
        .iter()
        .map(seen_traceparent)
        .collect();
    assert_eq!(
        seen,
        vec![
            (trace.to_string(), failed.span_id()),
            (trace.to_string(), retried.span_id())
        ]
    );
    for (mock, name) in [
        (&upstreams.inventory, "inventory"),
        (&upstreams.reviews, "reviews"),
    ] {
        let calls = mock.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            seen_traceparent(&calls[0]),
            (trace.to_string(), of(name)[0].span_id())
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_trace_and_timeouts_are_errors() -> Result<()> {
    let (receiver, otlp, _guard) = exporting()?;

    let upstreams = ProductUpstreams::start(Duration::from_millis(5)).await?;
    // Reviews is optional: it hangs, the guest gives up on it at its
    // deadline and answers a degraded product.
    upstreams.reviews.set_behaviour(Behaviour::hang());
    let host = TestHost::start(upstreams.builder().build()?).await?;
    let answer = host.get("/products/8").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let missing = host.get("/nowhere").await?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    host.shutdown().await?;
    flush(otlp).await?;

    let spans = receiver.spans();
    let servers: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.span.kind == SERVER).collect();
    assert_eq!(servers.len(), 2, "{spans:#?}");
    let product = servers
        .iter()
        .find(|s| s.attribute("url.path").as_deref() == Some("/products/8"))
        .unwrap();
    // A root span: the host started the trace.
    assert!(product.span.parent_span_id.is_empty());
    assert_eq!(product.trace_id().len(), 32);
    let unknown = servers
        .iter()
        .find(|s| s.attribute("url.path").as_deref() == Some("/nowhere"))
        .unwrap();
    // Not a route of the guest: no http.route, and the name is the method.
    assert_eq!(unknown.span.name, "GET");
    assert_eq!(unknown.attribute("http.route"), None);
    assert_eq!(
        unknown.attribute("http.response.status_code").as_deref(),
        Some("404")
    );
    assert_ne!(unknown.trace_id(), product.trace_id());

    let reviews = spans
        .iter()
        .find(|s| s.attribute("fanout.upstream").as_deref() == Some("reviews"))
        .expect("the reviews attempt");
    assert_eq!(reviews.trace_id(), product.trace_id());
    // The host's first-byte timer (the guest's request option) and the
    // guest's own attempt timer are both set to the attempt's timeout:
    // whichever fires first names the error.
    let error_type = reviews.attribute("error.type");
    assert!(
        matches!(
            error_type.as_deref(),
            Some("HttpResponseTimeout" | "timeout")
        ),
        "{error_type:?}"
    );
    assert_eq!(
        reviews.span.status.as_ref().map(|s| s.code),
        Some(STATUS_ERROR)
    );
    assert_eq!(reviews.attribute("http.response.status_code"), None);

    let (seen_trace, _) = seen_traceparent(&upstreams.inventory.calls()[0]);
    assert_eq!(seen_trace, product.trace_id());
    Ok(())
}
