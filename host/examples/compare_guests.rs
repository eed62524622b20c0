//! Compares builds of a guest side by side, in one process: each serves
//! product requests through `Fanout::handle` with in-process upstreams that
//! answer at once, in rounds of 100 that take turns (the order flipped each
//! round), so that every build sees the same machine. Prints time and fuel
//! per request for each.
//!
//! ```sh
//! cp target/wasm-components/wasm32-wasip2/wasm/fanout_guest.wasm /tmp/before.wasm
//! # change the guest, build it again (`cargo build` does), then:
//! cargo run --release -p fanout-host --example compare_guests -- \
//!     /tmp/before.wasm target/wasm-components/wasm32-wasip2/wasm/fanout_guest.wasm
//! ```
//!
//! Why not `wrk` against two servers: on a shared two-core machine their
//! rounds differ by ±15 % from one minute to the next, more than most guest
//! changes are worth; here the spread is a few per cent. Fuel, which counts
//! the guest's wasm operators, is exact, but is not time: an allocator that
//! ran 3 % more operators took as long. This prints numbers; it asserts
//! nothing.

use anyhow::{Context, Result};
use bytes::Bytes;
use fanout_host::{Fanout, adapters};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use std::time::{Duration, Instant};

/// Rounds each build runs, and requests in a round.
const ROUNDS: usize = 60;
const PER_ROUND: u32 = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        !paths.is_empty(),
        "usage: compare_guests COMPONENT.wasm [COMPONENT.wasm ...]"
    );
    let instant = |body: serde_json::Value| {
        adapters::from_fn(move |_request| {
            let body = body.clone();
            async move { Ok(adapters::json_response(StatusCode::OK, &body)) }
        })
    };
    let mut builds = Vec::new();
    for path in &paths {
        let fanout = Fanout::builder()
            .component_path(path)
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
            .build()
            .with_context(|| format!("loading {path}"))?;
        builds.push(fanout);
    }
    let one = |fanout: Fanout| async move {
        let request = http::Request::get("/products/42")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let response = fanout.handle(request).await;
        anyhow::ensure!(
            response.status() == StatusCode::OK,
            "answered {}",
            response.status()
        );
        response.into_body().collect().await?;
        Ok(())
    };
    // Warm: instances made, caches filled.
    for fanout in &builds {
        for _ in 0..3 * PER_ROUND {
            one(fanout.clone()).await?;
        }
    }
    let before: Vec<_> = builds.iter().map(Fanout::stats).collect();
    let mut rounds = vec![Vec::with_capacity(ROUNDS); builds.len()];
    for round in 0..ROUNDS {
        for k in 0..builds.len() {
            let i = if round % 2 == 0 {
                k
            } else {
                builds.len() - 1 - k
            };
            let started = Instant::now();
            for _ in 0..PER_ROUND {
                one(builds[i].clone()).await?;
            }
            rounds[i].push(started.elapsed() / PER_ROUND);
        }
    }
    for ((path, fanout), (mut times, before)) in paths
        .iter()
        .zip(&builds)
        .zip(rounds.into_iter().zip(before))
    {
        let after = fanout.stats();
        let requests = (after.requests - before.requests).max(1);
        let fuel = (after.fuel_consumed - before.fuel_consumed) / requests;
        let mean = times.iter().sum::<Duration>() / times.len() as u32;
        times.sort();
        println!(
            "{path}: {:.1} µs a request (rounds: median {:.1}, {:.1}–{:.1}), {fuel} fuel",
            micros(mean),
            micros(times[times.len() / 2]),
            micros(times[0]),
            micros(times[times.len() - 1]),
        );
    }
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
