//! The fan-out policy of fanout, compiled to a `wasi:http/proxy` component.
//!
//! `GET /products/{id}` validates the id, calls the inventory, pricing and
//! reviews upstreams **concurrently** through `wasi:http/outgoing-handler`,
//! and merges their JSON answers into one document; `GET /products?ids=a,b`
//! does the same for up to 100 ids. Routes and upstreams are data
//! ([`config`]); the policy is in the guest so that it holds on any host:
//!
//! - a deadline budget per request (200 ms by default, lowered by the client
//!   with `x-request-timeout-ms`), and per-attempt timeouts cut to it;
//! - retries of idempotent GETs on connection errors, 502/503/504 and
//!   timeouts, with exponential backoff and full jitter ([`retry`]);
//! - at most `max_in_flight` upstream calls at once per request;
//! - partial answers when an optional upstream fails (`"degraded"`).
//!
//! Every error answer has the shape `{"error": {"code", "message",
//! "upstream"?}}`.
//!
//! Other routes are data too: a path may have several variables
//! (`/users/{user}/orders/{order}`) and an upstream's URL may use them, the
//! client's query parameters ([`template`]) and values of other upstreams'
//! answers, which makes it wait for those (and only those). An upstream may
//! be called once per element of a list, or once per chunk of it when it
//! takes many ids in one call; identical calls are made once; answers are
//! cut and reshaped before they are merged ([`shape`]).
//!
//! The modules, in the order a request meets them: [`protocol`] (names shared
//! with hosts), [`config`] (with [`template`]), [`api`] (routes, validation,
//! budget), [`fanout`] (with [`shape`])
//! (the calls, with [`retry`]), [`merge`], [`errors`] (the one error shape).
//!
//! Everything except `component` is plain Rust, unit-tested natively with a
//! fake clock and a scripted transport: only that module touches WASI. It
//! uses the `wasip2` bindings directly for HTTP (wstd's request and response
//! conversions were about a third of a request's fuel, and its client
//! writes a GET's empty body after sending it, which a host may already have
//! dropped) and wstd's reactor to wait.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod errors;
pub mod fanout;
pub mod merge;
pub mod protocol;
pub mod retry;
pub mod serve;
pub mod shape;
pub mod template;
pub mod trace;

#[cfg(all(target_arch = "wasm32", feature = "p2"))]
mod component;
