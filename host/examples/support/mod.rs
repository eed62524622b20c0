//! What the measuring examples share: the product route with upstreams
//! that answer at once, in-process, so that a request's time is the wasm
//! path's own (no sockets, no upstream latency).

use anyhow::Result;
use bytes::Bytes;
use fanout_host::{Fanout, FanoutBuilder, adapters};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};

/// `builder` with the product route's three upstreams, each answering a
/// fixed JSON body at once.
pub fn instant_upstreams(builder: FanoutBuilder) -> FanoutBuilder {
    let instant = |body: serde_json::Value| {
        adapters::from_fn(move |_request| {
            let body = body.clone();
            async move { Ok(adapters::json_response(StatusCode::OK, &body)) }
        })
    };
    builder
        .upstream(
            "inventory",
            "http://inventory.local",
            instant(serde_json::json!({"in_stock": true, "quantity": 3})),
        )
        .upstream(
            "pricing",
            "http://pricing.local",
            instant(serde_json::json!({"amount": 12.5, "currency": "EUR"})),
        )
        .upstream(
            "reviews",
            "http://reviews.local",
            instant(serde_json::json!({"rating": 4.2, "count": 17})),
        )
}

/// One `GET /products/42` through `Fanout::handle`, its body read to the
/// end; an error unless it answered 200.
pub async fn product_request(fanout: &Fanout) -> Result<()> {
    let request = http::Request::get("/products/42")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    let response = fanout.handle(request).await;
    anyhow::ensure!(
        response.status() == StatusCode::OK,
        "answered {}",
        response.status()
    );
    response.into_body().collect().await?;
    Ok(())
}
