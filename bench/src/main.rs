//! `fanout-bench`: run the benchmarks and write BENCHMARKS.md.
//!
//! ```sh
//! cargo run -p fanout-bench --release -- all       # everything, ~16 minutes
//! cargo run -p fanout-bench --release -- latency   # one scenario
//! ```

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fanout_bench::report::{self, Machine, Results};
use fanout_bench::{Harness, Target, servers, targets};
use fanout_host::threads::ThreadLayout;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// mimalloc rather than the system allocator: at saturation glibc's malloc
/// and free were a sixth of the host's CPU, and musl's (the static image)
/// is slower still.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    about = "fanout's benchmarks: blocking against concurrent, fanout against wasmtime serve and native"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Warm-up before each measured window, in seconds.
    #[arg(long, global = true, default_value_t = 2.0)]
    warmup: f64,
    /// Measured window, in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    duration: f64,
    /// Runs of each window; the report gives the median and the spread.
    #[arg(long, global = true, default_value_t = 3)]
    repeats: usize,
    /// Where BENCHMARKS.md and bench/ go.
    #[arg(long, global = true, default_value = ".")]
    out: PathBuf,
    /// Only these targets (comma-separated), e.g. `fanout,native`.
    #[arg(long, global = true, value_delimiter = ',')]
    targets: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario, then BENCHMARKS.md, bench/results.json and bench/latency.svg.
    All {
        /// Length of the sustained saturation runs, in seconds.
        #[arg(long, default_value_t = 120)]
        sustained: u64,
    },
    /// 50 ms upstreams at 5, 50 and 500 in flight, every target.
    Latency {
        /// Only these levels of requests in flight (comma-separated), e.g.
        /// `500,5000` for overload.
        #[arg(long, value_delimiter = ',')]
        levels: Vec<usize>,
    },
    /// 0 ms upstreams at 64 in flight: fanout, native, wasmtime-serve.
    Saturation,
    /// Instantiation, fuel, memory per request, time to first answer.
    Micro,
    /// Hot keys: 90 % of requests on ten products at c=500, `fanout` with
    /// every call made, coalescing, and a 1 s cache, side by side.
    HotKeys,
    /// The aggregation model's latency: a dependent call against the
    /// sequential pattern, a 100-element list by batch against per id.
    Aggregation,
    /// Saturation with the upstreams over HTTP, HTTPS/1.1 and HTTPS/2,
    /// side by side, with the connections each keeps open.
    Https,
    /// `fanout` at 500 and 5000 in flight with 50 ms upstreams, with
    /// clients that honour Retry-After and with clients that do not.
    Overload,
    /// Writes BENCHMARKS.md again from bench/results.json, measuring
    /// nothing (after a change to the report's layout).
    Report,
    /// Open loop: `fanout`'s saturation rate measured first, then a
    /// constant arrival rate of 1x, 2x and 10x it (and 2x for `native` and
    /// `wasmtime-serve`), with 50 ms upstreams.
    OpenLoop,
    /// `fanout` at c=500 for a long window against faulty upstreams, with
    /// clients that hang up mid-request: answers by code, RSS and open file
    /// descriptors at the start and the end.
    Soak {
        /// Length of the window, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Drives any URL with the benchmarks' closed-loop clients for the
    /// window (after the warm-up) and prints what they saw as JSON: to
    /// look at one server under one load, outside the scenarios.
    Load {
        /// The URL every client asks for.
        url: String,
        /// Clients, each with a connection of its own.
        #[arg(long, short, default_value_t = 500)]
        concurrency: usize,
        /// Honour `Retry-After` on a 503, as a well-behaved client does
        /// (by default the next request goes at once, as wrk's does).
        #[arg(long)]
        honour_retry_after: bool,
        /// Open loop instead: this many requests a second whatever the
        /// server does, over pooled connections (`--concurrency` and
        /// `--honour-retry-after` then do not apply).
        #[arg(long, conflicts_with_all = ["concurrency", "honour_retry_after"])]
        rate: Option<f64>,
    },
    #[command(hide = true)]
    ServeUpstreams {
        #[arg(long, default_value_t = 50)]
        delay_ms: u64,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Misbehave on a share of calls (503, bad JSON, hang, slow).
        #[arg(long)]
        faults: bool,
        /// Serve HTTPS with a CA made now, its certificate written to
        /// DIR/ca.pem.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
    },
    #[command(hide = true)]
    ServeBlocking {
        #[arg(long)]
        upstream: String,
        #[arg(long, default_value_t = 16)]
        workers: usize,
    },
    #[command(hide = true)]
    ServeNative {
        #[arg(long)]
        upstream: String,
    },
    #[command(hide = true)]
    ServeFanout {
        #[arg(long)]
        upstream: String,
        #[arg(long)]
        sequential: bool,
        /// Fixed admission instead of the adaptive default.
        #[arg(long)]
        fixed: bool,
        /// Run the guests on this many threads of their own; 0 runs them
        /// on the connections' threads (default: as the `fanout` binary
        /// lays its threads out, see `fanout_host::threads`).
        #[arg(long)]
        guest_threads: Option<usize>,
        /// Steps of nice the guest threads run below the connections'
        /// (`--guest-nice`; default: as the `fanout` binary, 0).
        #[arg(long)]
        guest_nice: Option<u8>,
        /// FANOUT_CONFIG JSON.
        #[arg(long)]
        guest_config: Option<String>,
        #[arg(long)]
        max_instances: Option<u32>,
        /// Compiled-component cache directory.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Telemetry as the `fanout` binary has it when an operator turns
        /// everything on: JSON access logs on stdout and OTLP span export,
        /// here to the upstream server, which also acts as a collector.
        #[arg(long)]
        telemetry: bool,
        /// Coalesce identical upstream GETs (off: each request makes its
        /// own calls, as the other aggregators do).
        #[arg(long)]
        coalesce: bool,
        /// Also store upstream answers this long (implies --coalesce).
        #[arg(long)]
        cache_ttl_ms: Option<u64>,
        /// The upstreams are HTTPS: trust this CA (PEM).
        #[arg(long)]
        upstream_ca: Option<PathBuf>,
        /// HTTP/2 to the upstreams: auto (ALPN), always, never.
        #[arg(long, default_value = "auto")]
        http2: String,
        /// One instance, no line, no pacing: every request but the one
        /// running is shed at once (the cost of a shed).
        #[arg(long)]
        shed_all: bool,
        /// Requests per instance (`Limits::instance_reuse`).
        #[arg(long)]
        instance_reuse: Option<u32>,
        /// Serve the guest's `wasi:http@0.3` build.
        #[arg(long)]
        p3: bool,
        /// Serve the admin endpoints (`/metrics`, `/healthz`, `/readyz`)
        /// here as well, to watch the admission limit and the sheds during
        /// a window; the address is printed as `admin on ADDR`.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
}

const LEVELS: [usize; 3] = [5, 50, 500];
const SATURATION_C: usize = 64;

fn main() -> Result<()> {
    let args = Args::parse();
    // `fanout` as the binary runs it: its connections on a runtime of
    // their own, the guests on another.
    let threads = match &args.command {
        Command::ServeFanout {
            guest_threads,
            guest_nice,
            ..
        } => Some(ThreadLayout::from_flags(None, *guest_threads, *guest_nice)),
        _ => None,
    };
    let runtime = match threads {
        Some(threads) => threads.connection_runtime()?,
        None => tokio::runtime::Runtime::new()?,
    };
    match args.command {
        Command::ServeBlocking { upstream, workers } => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            servers::announce(listener.local_addr()?);
            servers::blocking(listener, upstream, workers)
        }
        Command::ServeUpstreams {
            delay_ms,
            listen,
            faults,
            tls_dir,
        } => runtime.block_on(async {
            let tls = tls_dir.as_deref().map(servers::tls_acceptor).transpose()?;
            let listener = tokio::net::TcpListener::bind(listen).await?;
            servers::announce(listener.local_addr()?);
            servers::upstreams(listener, Duration::from_millis(delay_ms), faults, tls).await
        }),
        Command::ServeNative { upstream } => runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            servers::announce(listener.local_addr()?);
            servers::native(listener, upstream).await
        }),
        Command::ServeFanout {
            upstream,
            sequential,
            fixed,
            guest_threads: _,
            guest_nice: _,
            guest_config,
            max_instances,
            cache_dir,
            telemetry,
            coalesce,
            cache_ttl_ms,
            upstream_ca,
            http2,
            shed_all,
            instance_reuse,
            p3,
            admin,
        } => runtime.block_on(async {
            let _otlp = if telemetry {
                Some(servers::telemetry(&upstream)?)
            } else {
                // Quiet unless asked: RUST_LOG=warn shows what the host
                // saw (an open circuit, a guest failure) on stderr.
                if std::env::var_os("RUST_LOG").is_some() {
                    use std::io::IsTerminal;
                    tracing_subscriber::fmt()
                        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                        .with_writer(std::io::stderr)
                        // Sent to a file or a pipe, no colour codes.
                        .with_ansi(std::io::stderr().is_terminal())
                        .try_init()
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                None
            };
            let config = match (sequential, guest_config) {
                (_, Some(json)) => Some(json),
                (true, None) => Some(r#"{"mode": "sequential"}"#.to_string()),
                (false, None) => None,
            };
            // Compiled before it says it listens: "listening" means ready.
            let fanout = servers::fanout(servers::FanoutSetup {
                upstream,
                guest_config: config,
                max_instances,
                cache_dir,
                fixed,
                guest_threads: threads.and_then(|threads| threads.guest_threads),
                guest_nice: threads.map_or(0, |threads| threads.guest_nice),
                identical: match (cache_ttl_ms, coalesce) {
                    (Some(ms), _) => servers::Identical::Cache {
                        ttl: Duration::from_millis(ms),
                    },
                    (None, true) => servers::Identical::Coalesce,
                    (None, false) => servers::Identical::CallEach,
                },
                tls: upstream_ca.map(|ca| (ca, http2)),
                shed_all,
                instance_reuse,
                p3,
            })?;
            if let Some(admin) = admin {
                let admin = tokio::net::TcpListener::bind(admin).await?;
                println!("admin on {}", admin.local_addr()?);
                let fanout = fanout.clone();
                tokio::spawn(
                    async move { fanout.serve_admin(admin, std::future::pending()).await },
                );
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            servers::announce(listener.local_addr()?);
            if shed_all {
                return servers::fanout_unpaced(listener, fanout).await;
            }
            fanout.serve(listener, std::future::pending()).await?;
            Ok(())
        }),
        Command::Load {
            url,
            concurrency,
            honour_retry_after,
            rate,
        } => runtime.block_on(async {
            use fanout_bench::driver::{self, Backoff};
            let (warmup, measure) = (
                Duration::from_secs_f64(args.warmup),
                Duration::from_secs_f64(args.duration),
            );
            if let Some(rate) = rate {
                let result = fanout_bench::open_loop::run(&url, rate, warmup, measure).await;
                println!("{}", serde_json::to_string_pretty(&result)?);
                return Ok(());
            }
            let backoff = if honour_retry_after {
                Backoff::RetryAfter
            } else {
                Backoff::None
            };
            let result = driver::run(
                driver::Urls::one(&url),
                concurrency,
                warmup,
                measure,
                "load",
                backoff,
            )
            .await;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }),
        command => runtime.block_on(bench(
            command,
            &args.out,
            &args.targets,
            Harness {
                exe: std::env::current_exe()?,
                warmup: Duration::from_secs_f64(args.warmup),
                measure: Duration::from_secs_f64(args.duration),
                repeats: args.repeats,
                wasmtime: targets::wasmtime(),
                // Clients as they are in the wild: the next request at once, 503 or
                // not. Clients that honour Retry-After are the overload
                // scenario's second row.
                backoff: fanout_bench::driver::Backoff::None,
            },
        )),
    }
}

async fn bench(command: Command, out: &std::path::Path, only: &[String], h: Harness) -> Result<()> {
    let command_is_all = matches!(command, Command::All { .. });
    let chosen = |targets: &[Target]| -> Vec<Target> {
        targets
            .iter()
            .copied()
            .filter(|t| only.is_empty() || only.iter().any(|o| o == t.name()))
            .collect()
    };
    let mut results = Results {
        machine: Machine::read(),
        ..Results::default()
    };
    if h.wasmtime.is_none() {
        results.skipped.push(
            "`wasmtime-serve`: wasmtime 48.0.8 is not on PATH \
             (`cargo install wasmtime-cli --version 48.0.8 --locked`)"
                .into(),
        );
    }
    let common = format!(
        "--warmup {} --duration {} --repeats {}",
        h.warmup.as_secs_f64(),
        h.measure.as_secs_f64(),
        h.repeats
    );
    let saturation_targets = chosen(&[
        Target::Fanout,
        Target::FanoutPerRequest,
        Target::FanoutP3,
        Target::FanoutTelemetry,
        Target::FanoutSharedThreads,
        Target::Native,
        Target::WasmtimeServe,
        Target::WasmtimeServeReuse,
        Target::WasmtimeServeP3,
    ]);
    let all_targets = chosen(&Target::ALL);
    match command {
        Command::All { sustained } => {
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- all {common} --sustained {sustained}"
            ));
            results.micro = Some(h.micro().await.context("micro")?);
            results.latency = h
                .latency(&all_targets, &LEVELS, Duration::from_millis(50))
                .await?;
            results.saturation = h.saturation(&saturation_targets, SATURATION_C).await?;
            if only.is_empty() || only.iter().any(|o| o == "fanout") {
                results.overload = h.overload(&[]).await?;
                let capacity =
                    report::median_of(&results.saturation, Target::Fanout, SATURATION_C, |r| {
                        r.load.goodput
                    });
                if capacity > 0.0 {
                    results.open_loop_capacity = Some(capacity);
                    results.open_loop = h.open_loop(capacity).await?;
                }
                results.hot_keys = h.hot_keys().await?;
                results.https = h.https_saturation().await?;
                results.aggregation = h.aggregation().await?;
            }
            for target in chosen(&[Target::Fanout, Target::WasmtimeServe]) {
                if let Some(s) = h
                    .sustained(target, SATURATION_C, Duration::from_secs(sustained))
                    .await?
                {
                    eprintln!(
                        "sustained {}: {:?} rps per 10 s",
                        target.name(),
                        s.rps_per_10s
                    );
                    results.sustained.push(s);
                }
            }
        }
        Command::Latency { levels } => {
            // Refresh the latency rows of an existing report; the other
            // sections stay as they were measured.
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            let levels = if levels.is_empty() {
                LEVELS.to_vec()
            } else {
                levels
            };
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- latency {common} --levels {}",
                levels
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            // Named targets may include the fanout variants the full run
            // shows elsewhere (e.g. `fanout-shared-threads` at c=500).
            let targets = if only.is_empty() {
                all_targets
            } else {
                chosen(&Target::REPORTED)
            };
            let measured = h
                .latency(&targets, &levels, Duration::from_millis(50))
                .await?;
            // Rows of the levels not measured now stay (c=500 for a run at
            // 5 and 50); the levels measured now are all from this run.
            results
                .latency
                .retain(|run| !levels.contains(&run.load.concurrency));
            results.latency.extend(measured);
        }
        Command::Saturation => {
            // Refresh the saturation rows of an existing report: the
            // overload and open-loop sections measure against them.
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- saturation {common}"
            ));
            results.saturation = h.saturation(&saturation_targets, SATURATION_C).await?;
        }
        Command::Report => {
            let text = std::fs::read_to_string(out.join("bench/results.json"))
                .context("bench/results.json")?;
            results = serde_json::from_str(&text).context("bench/results.json")?;
            report::write(out, &results)?;
            println!("{}", report::markdown(&results));
            return Ok(());
        }
        Command::Overload => {
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- overload {common}"
            ));
            results.overload = h.overload(only).await?;
        }
        Command::OpenLoop => {
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- open-loop {common}"
            ));
            let saturation = Harness {
                repeats: 1,
                ..h.clone()
            }
            .saturation(&[Target::Fanout], SATURATION_C)
            .await?;
            let capacity = saturation
                .first()
                .map(|run| run.load.goodput)
                .context("fanout's saturation")?;
            results.open_loop_capacity = Some(capacity);
            results.open_loop = h.open_loop(capacity).await?;
        }
        Command::HotKeys => {
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- hot-keys {common}"
            ));
            results.hot_keys = h.hot_keys().await?;
        }
        Command::Https => {
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- https {common}"
            ));
            results.https = h.https_saturation().await?;
        }
        Command::Aggregation => {
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- aggregation {common}"
            ));
            results.aggregation = h.aggregation().await?;
        }
        Command::Soak { seconds } => {
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results.commands.push(format!(
                "cargo run -p fanout-bench --release -- soak --warmup {} --seconds {seconds}",
                h.warmup.as_secs_f64()
            ));
            results.soak = Some(h.soak(Duration::from_secs(seconds)).await?);
        }
        Command::Micro => {
            // Refresh the micro figures of an existing report, if there is
            // one, rather than replace the whole report with them.
            if let Ok(text) = std::fs::read_to_string(out.join("bench/results.json")) {
                results = serde_json::from_str(&text).context("bench/results.json")?;
            }
            results
                .commands
                .push("cargo run -p fanout-bench --release -- micro".into());
            results.micro = Some(h.micro().await?);
        }
        _ => unreachable!("serve commands are handled in main"),
    }
    // A section measured apart from `all`: say when beside its command, and
    // on what, if not on the machine the report's header names.
    // An earlier run of the same command is superseded: its figures are gone.
    if !command_is_all && let Some(last) = results.commands.pop() {
        let now = report::Machine::read();
        let on = if now.cpu_model == results.machine.cpu_model {
            String::new()
        } else {
            format!(" on {} cores ({})", now.cores, now.cpu_model)
        };
        results
            .commands
            .retain(|earlier| earlier.split("   #").next() != Some(last.as_str()));
        results
            .commands
            .push(format!("{last}   # {}{on}", now.date));
    }
    report::write(out, &results)?;
    println!("{}", report::markdown(&results));
    Ok(())
}
