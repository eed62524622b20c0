//! # fanout-host
//!
//! A wasmtime embedder that serves the fanout guest component: HTTP fan-out
//! aggregation with the fan-out policy inside a WebAssembly sandbox.
//!
//! Each request gets a fresh instance of a component that was compiled once
//! and pre-instantiated, taken from wasmtime's pooling allocator. Every
//! request is bounded by fuel, an epoch deadline, a memory cap and a
//! wall-clock deadline ([`Limits`]); a guest that breaks one gets a JSON
//! error answer naming the cause, and the host keeps serving.
//!
//! The guest's outgoing requests are routed by authority to [`Upstream`]s:
//! real HTTP on a pooled keep-alive client, or in-process Rust functions.
//!
//! ## Example
//!
//! Serve the built-in guest with one upstream answered in-process, and ask
//! it for a product:
//!
//! ```
//! use fanout_host::{Fanout, upstream};
//! use http::StatusCode;
//! use http_body_util::{BodyExt, Empty};
//! use serde_json::json;
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let fanout = Fanout::builder()
//!     // inventory and pricing: the built-in demo upstreams...
//!     .demo_upstreams()
//!     // ...and reviews from a Rust closure, with no network hop.
//!     .upstream("reviews", "http://reviews.internal", upstream::from_fn(|_req| async {
//!         Ok(upstream::json_response(StatusCode::OK, &json!({"rating": 5, "count": 1})))
//!     }))
//!     .build()?;
//!
//! let request = http::Request::get("/products/42")
//!     .header("host", "localhost")
//!     .body(Empty::<bytes::Bytes>::new())?;
//! let response = fanout.handle(request).await;
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! let body = response.into_body().collect().await?.to_bytes();
//! let product: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(product["reviews"]["rating"], 5);
//! # Ok(()) }
//! ```
//!
//! To serve it over HTTP, hand a listener to [`Fanout::serve`].

pub mod adapters;
pub mod admission;
pub mod cache;
pub mod config;
pub mod demo;
mod error;
pub mod guard;
pub mod limits;
pub mod metrics;
mod runtime;
mod server;
pub mod telemetry;
pub mod upstream;

pub use error::{Error, Failure, error_response};
pub use limits::Limits;
pub use server::{Admission, Fanout, FanoutBuilder, StatsSnapshot};
pub use upstream::Upstream;

/// Body of the answers [`Fanout::handle`] returns.
pub type ResponseBody =
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, wasmtime_wasi_http::Error>;

include!(concat!(env!("OUT_DIR"), "/components.rs"));
