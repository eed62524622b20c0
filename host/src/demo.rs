//! Built-in demo upstreams: inventory, pricing and reviews answered
//! in-process with realistic latencies, so `cargo run --release` serves real
//! fan-outs with nothing else running.

use crate::adapters::{Latency, SimulatedUpstream};
use crate::upstream::Upstream;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// The demo upstreams as `(name, base URL, upstream)`. The base URLs use
/// made-up authorities: the host routes them in-process, and they could not
/// reach the network even if the routing table were wrong.
pub fn upstreams() -> Vec<(&'static str, &'static str, Arc<dyn Upstream>)> {
    let ms = Duration::from_millis;
    let simulated = |min: u64, max: u64| -> Arc<dyn Upstream> {
        Arc::new(SimulatedUpstream::new(
            Latency::Uniform {
                min: ms(min),
                max: ms(max),
            },
            answer_for,
        ))
    };
    vec![
        ("inventory", "http://inventory.demo", simulated(20, 40)),
        ("pricing", "http://pricing.demo", simulated(30, 60)),
        ("reviews", "http://reviews.demo", simulated(40, 80)),
    ]
}

/// The demo answer for a request path: `/inventory/{id}`, `/pricing/{id}`
/// or `/reviews/{id}` get plausible data derived from the id (the same id,
/// the same data); any other path gets `{"id", "path"}`.
pub fn answer_for(path: &str) -> serde_json::Value {
    let mut segments = path.trim_start_matches('/').split('/');
    let kind = segments.next().unwrap_or_default();
    let id = path.rsplit('/').next().unwrap_or_default();
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    let seed = h.finish();
    match kind {
        "inventory" => inventory(seed),
        "pricing" => pricing(seed),
        "reviews" => reviews(seed),
        _ => json!({ "id": id, "path": path }),
    }
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
    crate::http_server::serve_http(
        listener,
        shutdown,
        Duration::from_secs(1),
        crate::limits::ConnectionLimits::default(),
        move |request, _| {
            let upstreams = upstreams.clone();
            async move {
                let name = request.uri().path().split('/').nth(1).unwrap_or_default();
                let Some((_, upstream)) = upstreams.iter().find(|(n, _)| *n == name) else {
                    return crate::response::error_response(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "demo upstreams serve /inventory/{id}, /pricing/{id} and /reviews/{id}",
                    );
                };
                let request = request
                    .map(|body| body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
                match upstream.call(request, Default::default()).await {
                    Ok(response) => response,
                    Err(e) => crate::response::error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        &e.to_string(),
                    ),
                }
            }
        },
    )
    .await
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
