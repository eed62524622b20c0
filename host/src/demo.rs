//! Built-in demo upstreams: inventory, pricing, reviews, orders and
//! customers answered in-process with realistic latencies, and the guest
//! routes that use them ([`guest_config`]), so `cargo run --release` serves
//! real fan-outs with nothing else running.

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
        ("orders", "http://orders.demo", simulated(20, 40)),
        ("customers", "http://customers.demo", simulated(10, 30)),
    ]
}

/// The guest configuration (`FANOUT_CONFIG`) of the demo: the product
/// route, and an order route that uses every part of the aggregation
/// model. `GET /orders/{id}` calls the order; then, as soon as it is in,
/// its customer (a value of the order's answer), each line's stock (one
/// call per distinct sku) and every line's price (one batch call for all
/// skus); each answer is cut to what the client needs.
pub fn guest_config() -> serde_json::Value {
    json!({"routes": [
        {"path": "/products/{id}", "upstreams": [
            {"name": "inventory", "url": "{base}/inventory/{id}", "field": "inventory",
             "required": true, "timeout_ms": 150,
             "retry": {"max_attempts": 3, "initial_backoff_ms": 10, "max_backoff_ms": 50}},
            {"name": "pricing", "url": "{base}/pricing/{id}", "field": "price", "required": true},
            {"name": "reviews", "url": "{base}/reviews/{id}", "field": "reviews", "required": false}
        ]},
        {"path": "/orders/{id}", "upstreams": [
            {"name": "orders", "url": "{base}/orders/{id}", "field": ".",
             "select": ["status", "placed_at", "lines"]},
            {"name": "customers", "url": "{base}/customers/{orders.customer_id}",
             "field": "customer", "select": ["name", "tier"], "required": false},
            {"name": "inventory", "url": "{base}/inventory/{each}", "each": "orders.lines[].sku",
             "field": "stock", "select": ["in_stock"], "required": false},
            {"name": "pricing", "url": "{base}/pricing", "each": "orders.lines[].sku",
             "batch": {"param": "ids", "max": 50, "key": "id"},
             "field": "prices", "select": ["amount", "currency"]}
        ]}
    ]})
}

/// The demo answer for a request path (and query): `/inventory/{id}`,
/// `/pricing/{id}`, `/reviews/{id}`, `/orders/{id}` and `/customers/{id}`
/// get plausible data derived from the id (the same id, the same data);
/// `/pricing?ids=a,b` a list of prices, each with its `id`; any other path
/// gets `{"id", "path"}`.
pub fn answer_for(path_and_query: &str) -> serde_json::Value {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let mut segments = path.trim_start_matches('/').split('/');
    let kind = segments.next().unwrap_or_default();
    let id = segments.next();
    let batch = query.split('&').find_map(|pair| pair.strip_prefix("ids="));
    match (kind, id, batch) {
        ("pricing", None, Some(ids)) => {
            let prices = ids.split(',').filter(|id| !id.is_empty()).map(|id| {
                let mut price = pricing(seed(id));
                price["id"] = json!(id);
                price
            });
            serde_json::Value::Array(prices.collect())
        }
        ("inventory", Some(id), _) => inventory(seed(id)),
        ("pricing", Some(id), _) => pricing(seed(id)),
        ("reviews", Some(id), _) => reviews(seed(id)),
        ("orders", Some(id), _) => order(id, seed(id)),
        ("customers", Some(id), _) => customer(id, seed(id)),
        _ => json!({ "id": id.unwrap_or_default(), "path": path }),
    }
}

fn seed(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Serves the demo upstreams over real HTTP on `listener`, at
/// `/inventory/{id}`, `/pricing/{id}` and so on: base URL `http://<addr>`
/// for all of them. This is how the component gets upstreams
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
        Default::default(),
        move |request, _| {
            let upstreams = upstreams.clone();
            async move {
                let name = request.uri().path().split('/').nth(1).unwrap_or_default();
                let Some((_, upstream)) = upstreams.iter().find(|(n, _)| *n == name) else {
                    return crate::response::error_response(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "demo upstreams serve /inventory/{id}, /pricing/{id}, /pricing?ids=a,b, \
                         /reviews/{id}, /orders/{id} and /customers/{id}",
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

/// 2 to 5 lines of 30 products, so an order may list one twice.
fn order(id: &str, seed: u64) -> serde_json::Value {
    let lines: Vec<serde_json::Value> = (0..2 + seed % 4)
        .map(|i| {
            let product = (seed >> (8 * i + 4)) % 30;
            json!({ "sku": format!("sku-{product}"), "qty": 1 + (seed >> (8 * i)) % 3 })
        })
        .collect();
    let status = ["placed", "packed", "shipped"][(seed % 3) as usize];
    json!({
        "id": id,
        "customer_id": format!("c-{}", seed % 500),
        "status": status,
        "placed_at": format!("2026-11-{:02}T10:{:02}:00Z", 1 + seed % 28, seed % 60),
        "lines": lines,
        "warehouse": "eu-west",
    })
}

fn customer(id: &str, seed: u64) -> serde_json::Value {
    let names = ["Ada", "Grace", "Alan", "Barbara", "Edsger", "Frances"];
    let tier = ["standard", "gold"][(seed >> 8) as usize % 2];
    json!({
        "id": id,
        "name": names[(seed % names.len() as u64) as usize],
        "tier": tier,
        "email": format!("{id}@example.com"),
    })
}

fn reviews(seed: u64) -> serde_json::Value {
    let count = (seed >> 16) % 500;
    let rating = 1.0 + ((seed >> 24) % 41) as f64 / 10.0;
    json!({ "rating": rating, "count": count })
}
