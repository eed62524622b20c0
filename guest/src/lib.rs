//! The fan-out policy of fanout, compiled to a `wasi:http/proxy` component.
//!
//! `GET /products/{id}` validates the id, calls the inventory, pricing and
//! reviews upstreams **concurrently** through `wasi:http/outgoing-handler`,
//! and merges their JSON answers into one document. Every error answer has the
//! shape `{"error": {"code", "message", "upstream"?}}`.
//!
//! Everything except [`component`] is plain Rust, unit-tested natively: only
//! that module touches WASI, so the policy can be tested with `cargo test` on
//! the host target.

pub mod api;
pub mod config;

#[cfg(target_arch = "wasm32")]
mod component;
