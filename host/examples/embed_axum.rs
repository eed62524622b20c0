//! Mount fanout inside an axum app.
//!
//! The app serves its own routes and mounts the aggregator under `/api`:
//! `GET /api/products/42` runs the fan-out component. The `reviews` upstream
//! is a Rust function in this process (no network hop); inventory and
//! pricing are the built-in demo upstreams.
//!
//! ```sh
//! cargo run --release -p fanout-host --example embed_axum
//! curl -s http://127.0.0.1:3000/api/products/42
//! ```

use anyhow::Result;
use axum::Router;
use axum::routing::get;
use fanout_host::{Fanout, adapters};
use http::StatusCode;
use serde_json::json;

/// The app: its own `/health`, and fanout under `/api`.
pub fn app() -> Result<Router> {
    let fanout = Fanout::builder()
        .demo_upstreams()
        .upstream(
            "reviews",
            "http://reviews.in-process",
            adapters::from_fn(|request| async move {
                let id = request
                    .uri()
                    .path()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let body =
                    json!({ "product": id, "rating": 4.8, "count": 1312, "source": "in-process" });
                Ok(adapters::json_response(StatusCode::OK, &body))
            }),
        )
        .build()?;
    Ok(Router::new()
        .route("/health", get(|| async { "ok" }))
        // nest_service strips the prefix: the guest sees /products/42.
        .nest_service("/api", fanout))
}

#[allow(dead_code)] // The integration test includes this file for `app` only.
#[tokio::main]
async fn main() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!(
        "try: curl -s http://{}/api/products/42",
        listener.local_addr()?
    );
    axum::serve(listener, app()?).await?;
    Ok(())
}
