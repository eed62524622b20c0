//! # fanout-host
//!
//! A wasmtime embedder that serves the fanout guest component: HTTP fan-out
//! aggregation with the fan-out policy inside a WebAssembly sandbox.
//!
//! A component is compiled once and pre-instantiated; its instances, from
//! wasmtime's pooling allocator, serve requests one after another (up to
//! [`Limits::instance_reuse`], and an instance that failed is never
//! reused). Every request is bounded by fuel, an epoch deadline, a memory
//! cap and a wall-clock deadline ([`Limits`]); a guest that breaks one gets
//! a JSON error answer naming the cause, and the host keeps serving.
//!
//! The guest's outgoing requests are routed (by the upstream name the guest
//! hints and the authority it calls) to [`Upstream`]s: real HTTP on a
//! pooled keep-alive client, or in-process Rust functions.
//!
//! ## Example
//!
//! Serve the built-in guest with one upstream answered in-process, and ask
//! it for a product:
//!
//! ```
//! use fanout_host::{Fanout, adapters};
//! use http::StatusCode;
//! use http_body_util::{BodyExt, Empty};
//! use serde_json::json;
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let fanout = Fanout::builder()
//!     // inventory and pricing: the built-in demo upstreams...
//!     .demo_upstreams()
//!     // ...and reviews from a Rust closure, with no network hop.
//!     .upstream("reviews", "http://reviews.internal", adapters::from_fn(|_req| async {
//!         Ok(adapters::json_response(StatusCode::OK, &json!({"rating": 5, "count": 1})))
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
//!
//! ## Where things are
//!
//! A request flows one way through the modules: `http_server` accepts it,
//! [`Fanout`] wraps it in its span and access log, `instance` admits it
//! ([`admission`]) and runs the guest in a fresh store, `body` guards the
//! answer's body. Each upstream call the guest makes flows through
//! [`outbound`] (hints, routing, attempt records), [`guard`] (the
//! upstream's guardrails) and one of the [`adapters`]. [`error`](Error)
//! maps every failure to its client answer and every transport error to its
//! `wasi:http` code. ARCHITECTURE.md at the repository's root has the
//! numbered steps.

#![warn(missing_docs)]

pub mod adapters;
mod admin;
pub mod admission;
mod body;
mod builder;
mod builtin_guest;
pub mod cache;
pub mod config;
pub mod demo;
mod error;
mod fanout;
pub mod guard;
mod guest_output;
mod guest_runtime;
mod guest_world;
mod http_server;
mod instance;
mod lag;
pub mod limits;
pub mod metrics;
pub mod outbound;
mod outgoing_handler;
mod response;
pub mod response_cache;
mod runtime;
mod shed_lines;
mod stats;
pub mod stdout_log;
mod store;
pub mod telemetry;
pub mod threads;
mod units;
pub mod upstream;
mod worker;

pub use admission::RETRY_AFTER;
pub use builder::{AdmissionMode, FanoutBuilder};
pub use builtin_guest::{
    GUEST_COMPONENT, GUEST_COMPONENT_PATH, GUEST_P3_COMPONENT, GUEST_P3_COMPONENT_PATH,
};
pub use error::{
    DnsFailure, Error, Failure, client_error_code, error_code_name, guarded_error_code,
};
pub use fanout::Fanout;
pub use guest_world::WasiHttpVersion;
pub use limits::Limits;
pub use response::{ResponseBody, error_response, full_body};
pub use runtime::GuestProfiler;
pub use stats::StatsSnapshot;
pub use upstream::Upstream;
