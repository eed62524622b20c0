//! Built-in demo upstreams: inventory, pricing and reviews answered
//! in-process with realistic latencies, so `cargo run --release` serves real
//! fan-outs with nothing else running.

use crate::upstream::{Upstream, UpstreamBody, from_fn, json_response};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// The demo upstreams as `(name, base URL, upstream)`. The base URLs use
/// made-up authorities: the host routes them in-process, and they could not
/// reach the network even if the routing table were wrong.
pub fn upstreams() -> Vec<(&'static str, &'static str, Arc<dyn Upstream>)> {
    vec![
        (
            "inventory",
            "http://inventory.demo",
            demo(20..40, inventory),
        ),
        ("pricing", "http://pricing.demo", demo(30..60, pricing)),
        ("reviews", "http://reviews.demo", demo(40..80, reviews)),
    ]
}

/// Serves the demo upstreams over real HTTP on `listener`, at
/// `/inventory/{id}`, `/pricing/{id}` and `/reviews/{id}`: base URL
/// `http://<addr>` for all three. This is how the component gets upstreams
/// under `wasmtime serve` or Spin, and what the benchmarks call.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let upstreams: Arc<Vec<(&'static str, Arc<dyn Upstream>)>> = Arc::new(
        upstreams()
            .into_iter()
            .map(|(name, _, upstream)| (name, upstream))
            .collect(),
    );
    crate::server::serve_http(listener, shutdown, Duration::from_secs(1), move |request| {
        let upstreams = upstreams.clone();
        async move {
            let name = request.uri().path().split('/').nth(1).unwrap_or_default();
            let Some((_, upstream)) = upstreams.iter().find(|(n, _)| *n == name) else {
                return crate::error_response(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "demo upstreams serve /inventory/{id}, /pricing/{id} and /reviews/{id}",
                );
            };
            let request =
                request.map(|body| body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
            match upstream.call(request, Default::default()).await {
                Ok(response) => response,
                Err(e) => {
                    crate::error_response(StatusCode::BAD_GATEWAY, "upstream_error", &e.to_string())
                }
            }
        }
    })
    .await
}

fn demo(latency_ms: Range<u64>, answer: fn(u64) -> serde_json::Value) -> Arc<dyn Upstream> {
    from_fn(move |request: Request<UpstreamBody>| {
        let latency = Duration::from_millis(fastrand::u64(latency_ms.clone()));
        // The product id is the last path segment; the guest validated it.
        let seed = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .map(|id| {
                let mut h = DefaultHasher::new();
                id.hash(&mut h);
                h.finish()
            })
            .unwrap_or_default();
        async move {
            tokio::time::sleep(latency).await;
            Ok(json_response(StatusCode::OK, &answer(seed)))
        }
    })
}

fn inventory(seed: u64) -> serde_json::Value {
    let quantity = seed % 40;
    json!({ "in_stock": quantity > 0, "quantity": quantity, "warehouse": "eu-west" })
}

fn pricing(seed: u64) -> serde_json::Value {
    let cents = 499 + (seed >> 8) % 20_000;
    json!({ "amount": cents as f64 / 100.0, "currency": "EUR" })
}

fn reviews(seed: u64) -> serde_json::Value {
    let count = (seed >> 16) % 500;
    let rating = 1.0 + ((seed >> 24) % 41) as f64 / 10.0;
    json!({ "rating": rating, "count": count })
}
