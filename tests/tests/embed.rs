//! The embedding example, run for real: an axum app that mounts fanout
//! under /api with an in-process upstream.

#[path = "../../host/examples/embed_axum.rs"]
mod embed_axum;

use anyhow::Result;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

async fn get(path: &str) -> Result<(StatusCode, Value)> {
    let request = http::Request::get(path).body(axum::body::Body::empty())?;
    let response = embed_axum::app()?.oneshot(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

#[tokio::test]
async fn axum_mounts_fanout_under_api() -> Result<()> {
    let (status, body) = get("/api/products/42").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "42");
    // The function upstream answered in-process.
    assert_eq!(body["reviews"]["source"], "in-process");
    assert_eq!(body["reviews"]["product"], "42");
    assert!(body["price"]["amount"].is_f64());

    // Fanout's own errors pass through the app unchanged.
    let (status, body) = get("/api/products/not%20valid").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_id");
    Ok(())
}
