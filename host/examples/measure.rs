//! Per-request cost of the host, with in-process upstreams that answer at
//! once: instantiation time, fuel, and end-to-end time through
//! `Fanout::handle` (no sockets, so the numbers are the wasm path's own);
//! then the cost of each guardrail layer, per upstream call.
//!
//! ```sh
//! cargo run --release -p fanout-host --example measure -- 5000
//! ```
//!
//! This prints numbers; it asserts nothing. The benchmark harness compares
//! targets side by side.

mod support;

use anyhow::Result;
use bytes::Bytes;
use fanout_host::guard::{CircuitBreakerConfig, Guardrails, RetryBudgetConfig};
use fanout_host::outbound::{UpstreamHandle, default_send_request};
use fanout_host::upstream::Call;
use fanout_host::{Fanout, adapters};
use http::StatusCode;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> Result<()> {
    let requests: u32 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(2000);
    let fanout = support::instant_upstreams(Fanout::builder()).build()?;

    // Warm up: first instantiations fault in the pool's memory.
    for _ in 0..100 {
        support::product_request(&fanout).await?;
    }
    let before = fanout.stats();
    let started = Instant::now();
    for _ in 0..requests {
        support::product_request(&fanout).await?;
    }
    let elapsed = started.elapsed();
    let after = fanout.stats();
    // Instances are reused (`Limits::instance_reuse`): instantiation is
    // per instance made, fuel per request.
    let n = (after.instantiations - before.instantiations).max(1) as u32;
    let instantiate = (after.instantiate_time - before.instantiate_time) / n;
    let fuel = (after.fuel_consumed - before.fuel_consumed) / u64::from(requests.max(1));
    println!("requests:             {requests} sequential, in-process upstreams");
    println!(
        "instantiation:        {:.1} µs per instance ({n} made)",
        micros(instantiate)
    );
    println!("fuel:                 {fuel} per request");
    println!(
        "end to end (handle):  {:.1} µs per request",
        micros(elapsed / requests)
    );
    println!(
        "throughput:           {:.0} requests/s on one task",
        requests as f64 / elapsed.as_secs_f64()
    );

    guardrail_overhead().await;
    Ok(())
}

/// Calls an in-process upstream through each guardrail stack, many times,
/// and prints the time per call with and without each layer.
async fn guardrail_overhead() {
    const CALLS: u32 = 200_000;
    let answer = adapters::from_fn(|_req| async {
        Ok(adapters::json_response(
            StatusCode::OK,
            &serde_json::json!({}),
        ))
    });
    let limit = Guardrails {
        max_concurrency: Some(1024),
        ..Guardrails::default()
    };
    let breaker = Guardrails {
        circuit_breaker: Some(CircuitBreakerConfig::default()),
        ..limit.clone()
    };
    let all = Guardrails {
        retry_budget: Some(RetryBudgetConfig::default()),
        ..breaker.clone()
    };
    let stacks = [
        ("no guardrails", Guardrails::default()),
        ("+ concurrency limit and load shed", limit),
        ("+ circuit breaker", breaker),
        ("+ retry budget (all three)", all),
    ];
    println!("\nguardrails, per upstream call ({CALLS} calls each, in-process upstream):");
    let mut baseline = None;
    for (label, guardrails) in stacks {
        let handle = UpstreamHandle::new(
            "u".into(),
            "http://u.local".into(),
            answer.clone(),
            &guardrails,
            false,
        )
        .expect("a valid upstream");
        let call = || Call {
            request: http::Request::get("http://u.local/x")
                .body(fanout_host::full_body(Bytes::new()))
                .expect("valid request"),
            options: Default::default(),
            attempt: 1,
        };
        for _ in 0..10_000 {
            default_send_request(&handle, call()).await.expect("answer");
        }
        let started = Instant::now();
        for _ in 0..CALLS {
            default_send_request(&handle, call()).await.expect("answer");
        }
        let per_call = started.elapsed() / CALLS;
        let base = *baseline.get_or_insert(per_call);
        println!(
            "  {label:<36} {:>6.2} µs  (+{:.2} µs)",
            micros(per_call),
            micros(per_call.saturating_sub(base))
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
