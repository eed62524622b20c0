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

mod support;

use anyhow::{Context, Result};
use fanout_host::Fanout;
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
    let mut builds = Vec::new();
    for path in &paths {
        let fanout = support::instant_upstreams(Fanout::builder().component_path(path))
            .build()
            .with_context(|| format!("loading {path}"))?;
        builds.push(fanout);
    }
    // Warm: instances made, caches filled.
    for fanout in &builds {
        for _ in 0..3 * PER_ROUND {
            support::product_request(fanout).await?;
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
                support::product_request(&builds[i]).await?;
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
