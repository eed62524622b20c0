//! fanout's benchmark harness: what concurrency buys, measured side by side
//! in one run on one machine.
//!
//! Targets, each its own process on loopback, in front of the same upstream
//! simulator process:
//!
//! | target | what it is |
//! |---|---|
//! | `blocking` | thread-per-request (16 sync workers, WSGI style), upstreams called one after another with a blocking client |
//! | `fanout-sequential` | the fanout host, the guest configured to call upstreams one after another |
//! | `fanout` | the fanout host with the concurrent guest |
//! | `native` | the same aggregation in tokio + hyper, no wasm |
//! | `wasmtime-serve` | `wasmtime serve -Scli` running the same component (when installed) |

pub mod driver;
pub mod open_loop;
pub mod report;
pub mod servers;
pub mod targets;

use anyhow::Result;
use driver::LoadResult;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use targets::Process;

/// Knobs of a benchmark run.
#[derive(Debug, Clone)]
pub struct Harness {
    /// The `fanout-bench` executable, which runs every target as a subcommand.
    pub exe: PathBuf,
    pub warmup: Duration,
    pub measure: Duration,
    pub repeats: usize,
    pub wasmtime: Option<PathBuf>,
    /// What the simulated clients do after a 503 with `Retry-After`.
    pub backoff: driver::Backoff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Blocking,
    FanoutSequential,
    Fanout,
    /// `fanout` with fixed admission instead of the adaptive default
    /// (measured under overload).
    FanoutFixed,
    /// `fanout` with the guests on the connections' threads
    /// (`--guest-threads 0`, the layout before the split).
    FanoutSharedThreads,
    /// `fanout` with its telemetry on: JSON access logs and OTLP span
    /// export (measured at saturation, beside `fanout`).
    FanoutTelemetry,
    /// `fanout` coalescing identical upstream GETs (hot keys).
    FanoutCoalesce,
    /// `fanout` coalescing and caching upstream answers for 1 s (hot keys).
    FanoutCache,
    /// `fanout` with HTTPS upstreams, HTTP/1.1 (TLS saturation).
    FanoutHttps1,
    /// `fanout` with HTTPS upstreams, HTTP/2 by ALPN (TLS saturation).
    FanoutHttps2,
    /// `fanout` with one instance and no pacing, so that nearly every
    /// request is a shed answered at once: what a shed costs (overload).
    FanoutShedAll,
    /// `fanout` with a fresh instance per request (`--instance-reuse 1`),
    /// beside the default that reuses them.
    FanoutPerRequest,
    /// `fanout` serving the guest's `wasi:http@0.3` build (`--p3`).
    FanoutP3,
    Native,
    WasmtimeServe,
    /// `wasmtime serve --max-instance-reuse-count 128`: the peer with
    /// instance reuse.
    WasmtimeServeReuse,
    /// `wasmtime serve -Sp3` serving the `wasi:http@0.3` build with its
    /// defaults for it (128 requests per instance, 16 at once).
    WasmtimeServeP3,
}

impl Target {
    pub const ALL: [Target; 9] = [
        Target::Blocking,
        Target::FanoutSequential,
        Target::Fanout,
        Target::FanoutPerRequest,
        Target::FanoutP3,
        Target::Native,
        Target::WasmtimeServe,
        Target::WasmtimeServeReuse,
        Target::WasmtimeServeP3,
    ];

    /// Every target a report may show, in table order.
    pub const REPORTED: [Target; 12] = [
        Target::Blocking,
        Target::FanoutSequential,
        Target::Fanout,
        Target::FanoutPerRequest,
        Target::FanoutP3,
        Target::FanoutFixed,
        Target::FanoutSharedThreads,
        Target::FanoutTelemetry,
        Target::Native,
        Target::WasmtimeServe,
        Target::WasmtimeServeReuse,
        Target::WasmtimeServeP3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Blocking => "blocking",
            Target::FanoutSequential => "fanout-sequential",
            Target::Fanout => "fanout",
            Target::FanoutFixed => "fanout-fixed",
            Target::FanoutSharedThreads => "fanout-shared-threads",
            Target::FanoutTelemetry => "fanout-telemetry",
            Target::FanoutCoalesce => "fanout-coalesce",
            Target::FanoutCache => "fanout-cache",
            Target::FanoutHttps1 => "fanout-https-h1",
            Target::FanoutHttps2 => "fanout-https-h2",
            Target::FanoutShedAll => "fanout-shed-all",
            Target::FanoutPerRequest => "fanout-per-request",
            Target::FanoutP3 => "fanout-p3",
            Target::Native => "native",
            Target::WasmtimeServe => "wasmtime-serve",
            Target::WasmtimeServeReuse => "wasmtime-serve-reuse",
            Target::WasmtimeServeP3 => "wasmtime-serve-p3",
        }
    }
}

/// What a measured window is: scenario, load, upstream delay, repeat.
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    pub scenario: &'a str,
    pub concurrency: usize,
    pub delay: Duration,
    pub repeat: usize,
}

/// One measured window.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Run {
    pub scenario: String,
    pub target: Target,
    pub repeat: usize,
    pub upstream_delay_ms: u64,
    pub load: LoadResult,
    /// CPU seconds the target used in the window.
    pub target_cpu_s: f64,
    pub upstream_cpu_s: f64,
    /// CPU milliseconds per answered request, target only.
    pub cpu_ms_per_request: f64,
    /// Calls the upstreams had in the window (hot keys only).
    #[serde(default)]
    pub upstream_calls: Option<u64>,
    /// Connections from the target to the upstreams open at the end of
    /// the window (TLS saturation only).
    #[serde(default)]
    pub upstream_connections: Option<u64>,
}

impl Harness {
    /// Starts the upstream simulator with a fixed `delay`.
    pub async fn upstreams(&self, delay: Duration) -> Result<Process> {
        Process::start(
            "upstreams",
            &self.exe,
            &[
                "serve-upstreams".into(),
                "--delay-ms".into(),
                delay.as_millis().to_string(),
            ],
        )
        .await
    }

    /// Starts `target` in front of `upstreams`; `None` if it cannot run here
    /// (wasmtime not installed).
    pub async fn start(&self, target: Target, upstreams: &Process) -> Result<Option<Process>> {
        let base = upstreams.base.clone();
        let own = |sub: &str, extra: &[&str]| {
            let mut args = vec![sub.to_string(), "--upstream".into(), base.clone()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };
        let process = match target {
            Target::Blocking => {
                Process::start(target.name(), &self.exe, &own("serve-blocking", &[])).await?
            }
            Target::Native => {
                Process::start(target.name(), &self.exe, &own("serve-native", &[])).await?
            }
            Target::Fanout
            | Target::FanoutSequential
            | Target::FanoutFixed
            | Target::FanoutSharedThreads
            | Target::FanoutTelemetry
            | Target::FanoutCoalesce
            | Target::FanoutCache
            | Target::FanoutHttps1
            | Target::FanoutHttps2
            | Target::FanoutShedAll
            | Target::FanoutPerRequest
            | Target::FanoutP3 => {
                let variant: &[&str] = match target {
                    Target::FanoutShedAll => &["--shed-all"],
                    Target::FanoutPerRequest => &["--instance-reuse", "1"],
                    Target::FanoutP3 => &["--p3"],
                    Target::FanoutSequential => &["--sequential"],
                    Target::FanoutFixed => &["--fixed"],
                    Target::FanoutSharedThreads => &["--guest-threads", "0"],
                    Target::FanoutTelemetry => &["--telemetry"],
                    Target::FanoutCoalesce => &["--coalesce"],
                    Target::FanoutCache => &["--cache-ttl-ms", "1000"],
                    // `https_saturation` starts these with their CA.
                    Target::FanoutHttps1 | Target::FanoutHttps2 => {
                        anyhow::bail!("{} needs https_saturation", target.name())
                    }
                    _ => &[],
                };
                Process::start(target.name(), &self.exe, &own("serve-fanout", variant)).await?
            }
            Target::WasmtimeServe | Target::WasmtimeServeReuse | Target::WasmtimeServeP3 => {
                let Some(wasmtime) = &self.wasmtime else {
                    return Ok(None);
                };
                let mut args: Vec<String> = ["serve", "-Scli", "--addr", "127.0.0.1:0"]
                    .map(String::from)
                    .to_vec();
                if target == Target::WasmtimeServeReuse {
                    args.push("--max-instance-reuse-count=128".into());
                }
                if target == Target::WasmtimeServeP3 {
                    args.extend(["-Wcomponent-model-async".into(), "-Sp3".into()]);
                }
                for name in ["INVENTORY", "PRICING", "REVIEWS"] {
                    args.push("--env".into());
                    args.push(format!("FANOUT_UPSTREAM_{name}={base}"));
                }
                args.push(if target == Target::WasmtimeServeP3 {
                    fanout_host::GUEST_P3_COMPONENT_PATH.into()
                } else {
                    fanout_host::GUEST_COMPONENT_PATH.into()
                });
                Process::start(target.name(), wasmtime, &args).await?
            }
        };
        Ok(Some(process))
    }

    /// One closed-loop window of `urls`, with CPU accounting and the calls
    /// the upstream server had in it (counted from the end of the warm-up).
    async fn measure_counting_calls(
        &self,
        window: Window<'_>,
        target: Target,
        process: &Process,
        upstreams: &Process,
        urls: driver::Urls,
        label: &str,
    ) -> Result<Run> {
        let calls_url = format!("{}/calls", upstreams.base);
        let at_start = {
            let (url, warmup) = (calls_url.clone(), self.warmup);
            tokio::spawn(async move {
                tokio::time::sleep(warmup).await;
                driver::get_number(&url).await
            })
        };
        let load = driver::run(
            urls,
            window.concurrency,
            self.warmup,
            self.measure,
            label,
            self.backoff,
        );
        let mut run = self.account(window, target, process, upstreams, load).await;
        let end = driver::get_number(&calls_url).await?;
        let start = at_start.await??;
        run.upstream_calls = Some(end.saturating_sub(start));
        Ok(run)
    }

    /// One closed-loop window against `target`, with CPU accounting.
    pub async fn measure(
        &self,
        window: Window<'_>,
        target: Target,
        process: &Process,
        upstreams: &Process,
    ) -> Run {
        let Window {
            scenario,
            concurrency,
            repeat,
            ..
        } = window;
        let url = format!("{}/products/42", process.base);
        let label = format!(
            "{scenario} {} c={concurrency} #{}",
            target.name(),
            repeat + 1
        );
        let load = driver::run(
            driver::Urls::one(&url),
            concurrency,
            self.warmup,
            self.measure,
            &label,
            self.backoff,
        );
        self.account(window, target, process, upstreams, load).await
    }

    /// One open-loop window against `target`: `rate` requests a second.
    pub async fn measure_open(
        &self,
        window: Window<'_>,
        rate: f64,
        target: Target,
        process: &Process,
        upstreams: &Process,
    ) -> Run {
        let url = format!("{}/products/42", process.base);
        eprintln!(
            "{} {} at {rate:.0}/s #{}",
            window.scenario,
            target.name(),
            window.repeat + 1
        );
        let load = open_loop::run(&url, rate, self.warmup, self.measure);
        self.account(window, target, process, upstreams, load).await
    }

    /// Runs `load` and reads the CPU the target and the upstreams used in
    /// its measured window.
    async fn account(
        &self,
        window: Window<'_>,
        target: Target,
        process: &Process,
        upstreams: &Process,
        load: impl std::future::Future<Output = LoadResult>,
    ) -> Run {
        let Window {
            scenario,
            delay,
            repeat,
            ..
        } = window;
        // CPU is read when the measured window opens and when it closes.
        let at_start = {
            let (t, u) = (process.pid(), upstreams.pid());
            let warmup = self.warmup;
            tokio::spawn(async move {
                tokio::time::sleep(warmup).await;
                (Instant::now(), t.map(cpu_of), u.map(cpu_of))
            })
        };
        let load = load.await;
        let (_, t0, u0) = at_start.await.unwrap_or((Instant::now(), None, None));
        let target_cpu = process.cpu().saturating_sub(t0.unwrap_or_default());
        let upstream_cpu = upstreams.cpu().saturating_sub(u0.unwrap_or_default());
        let answered = load.statuses.values().sum::<u64>().max(1);
        Run {
            scenario: scenario.into(),
            target,
            repeat,
            upstream_delay_ms: delay.as_millis() as u64,
            cpu_ms_per_request: target_cpu.as_secs_f64() * 1e3 / answered as f64,
            target_cpu_s: target_cpu.as_secs_f64(),
            upstream_cpu_s: upstream_cpu.as_secs_f64(),
            upstream_calls: None,
            upstream_connections: None,
            load,
        }
    }

    /// Open loop with 50 ms upstreams: `fanout` at 1x, 2x and 10x
    /// `capacity` (its own saturation rate), `native` and `wasmtime-serve`
    /// at 2x. 10x last: it leaves the most sockets in TIME_WAIT.
    pub async fn open_loop(&self, capacity: f64) -> Result<Vec<Run>> {
        let delay = Duration::from_millis(50);
        let plan = [
            (Target::Fanout, 1.0),
            (Target::Fanout, 2.0),
            (Target::Native, 2.0),
            (Target::WasmtimeServe, 2.0),
            (Target::Fanout, 10.0),
        ];
        let upstreams = self.upstreams(delay).await?;
        let mut runs = Vec::new();
        for (target, times) in plan {
            let Some(process) = self.start(target, &upstreams).await? else {
                continue;
            };
            for repeat in 0..self.repeats {
                let window = Window {
                    scenario: "open-loop",
                    concurrency: 0,
                    delay,
                    repeat,
                };
                // Each run may open thousands of connections: let the
                // previous ones' TIME_WAIT drain so that the client has
                // ports left.
                for _ in 0..60 {
                    if targets::time_wait_sockets() < 5_000 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let run = self
                    .measure_open(window, capacity * times, target, &process, &upstreams)
                    .await;
                eprintln!("{}", report::one_line(&run));
                runs.push(run);
            }
            process.stop().await;
        }
        upstreams.stop().await;
        Ok(runs)
    }

    /// `latency`: 50 ms upstreams, at 5, 50 and 500 requests in flight.
    pub async fn latency(
        &self,
        targets: &[Target],
        levels: &[usize],
        delay: Duration,
    ) -> Result<Vec<Run>> {
        let upstreams = self.upstreams(delay).await?;
        // Every target up at once (idle ones take no CPU), and the repeats
        // taken in turns across them: the machine's slow stretches fall on
        // all targets alike, not on whichever ran then.
        let mut processes = Vec::new();
        for &target in targets {
            match self.start(target, &upstreams).await? {
                Some(process) => processes.push((target, process)),
                None => eprintln!("skipped {}: wasmtime 48.0.8 is not on PATH", target.name()),
            }
        }
        let mut runs = Vec::new();
        for repeat in 0..self.repeats {
            for &c in levels {
                for (target, process) in &processes {
                    let window = Window {
                        scenario: "latency",
                        concurrency: c,
                        delay,
                        repeat,
                    };
                    let run = self.measure(window, *target, process, &upstreams).await;
                    eprintln!("{}", report::one_line(&run));
                    runs.push(run);
                }
            }
        }
        for (_, process) in processes {
            process.stop().await;
        }
        upstreams.stop().await;
        Ok(runs)
    }

    /// `saturation`: 0 ms upstreams and enough requests in flight to load
    /// the CPUs.
    pub async fn saturation(&self, targets: &[Target], concurrency: usize) -> Result<Vec<Run>> {
        self.latency_named("saturation", targets, &[concurrency], Duration::ZERO)
            .await
    }

    /// Overload with 50 ms upstreams: `fanout` at c=500 and c=5000 (and at
    /// each of [`CAPACITY_CLIENTS`], for its capacity with these upstreams), with
    /// clients that honour `Retry-After` and with clients that do not; and
    /// at c=500 (honouring) its two variants, fixed admission and guests on
    /// threads of their own.
    /// `only` keeps the rows of those targets (all when empty).
    pub async fn overload(&self, only: &[String]) -> Result<Vec<Run>> {
        use driver::Backoff::{None as Hostile, RetryAfter};
        // Clients that re-send at once first (wrk, hey, k6 and most retry
        // loops), then clients that honour Retry-After.
        let capacity = CAPACITY_CLIENTS.map(|c| (Target::Fanout, c, Hostile));
        let plan = [
            (Target::Fanout, 500, Hostile),
            (Target::Fanout, 5000, Hostile),
            (Target::Native, 500, Hostile),
            (Target::Blocking, 500, Hostile),
            (Target::WasmtimeServe, 500, Hostile),
            (Target::FanoutFixed, 500, Hostile),
            (Target::Fanout, 500, RetryAfter),
            (Target::Fanout, 5000, RetryAfter),
            (Target::FanoutSharedThreads, 500, RetryAfter),
            // What one shed costs, for the CPU share the rows above spend
            // on theirs.
            (Target::FanoutShedAll, 64, Hostile),
        ];
        let mut runs = Vec::new();
        // The most `fanout` serves with these upstreams first: enough
        // clients to keep the cores busy, few enough that little is shed.
        for (target, level, backoff) in capacity.into_iter().chain(plan) {
            if !only.is_empty() && !only.iter().any(|o| o == target.name()) {
                continue;
            }
            let h = Harness {
                backoff,
                ..self.clone()
            };
            runs.extend(
                h.latency_named("overload", &[target], &[level], Duration::from_millis(50))
                    .await?,
            );
        }
        Ok(runs)
    }

    /// Hot keys: 50 ms upstreams, c=500 clients that re-send at once, 90 %
    /// of the requests on ten products. `fanout` making every call, then
    /// coalescing identical ones, then caching answers for 1 s, alternating
    /// window by window; each window starts a fresh process (a cold cache).
    pub async fn hot_keys(&self) -> Result<Vec<Run>> {
        const C: usize = 500;
        let delay = Duration::from_millis(50);
        let upstreams = self.upstreams(delay).await?;
        let mut runs = Vec::new();
        for repeat in 0..self.repeats {
            for target in [Target::Fanout, Target::FanoutCoalesce, Target::FanoutCache] {
                let Some(process) = self.start(target, &upstreams).await? else {
                    continue;
                };
                let window = Window {
                    scenario: "hot-keys",
                    concurrency: C,
                    delay,
                    repeat,
                };
                let label = format!("hot-keys {} c={C} #{}", target.name(), repeat + 1);
                let urls = driver::Urls::HotKeys {
                    base: process.base.clone(),
                };
                let run = self
                    .measure_counting_calls(window, target, &process, &upstreams, urls, &label)
                    .await?;
                eprintln!("{}", report::one_line(&run));
                runs.push(run);
                process.stop().await;
            }
        }
        upstreams.stop().await;
        Ok(runs)
    }

    /// The aggregation model's latency: closed-loop clients at c=10 against
    /// upstreams at 50 ms, one `fanout` per route shape, alternating window
    /// by window. A dependent call (A, then C reading A's answer, with B
    /// alongside) against the same three called one after another; a
    /// 100-element list priced by a batch-capable upstream against one call
    /// per element, at the default fan-out cap (16) and at 100. Each row
    /// also counts the upstream calls per answer.
    pub async fn aggregation(&self) -> Result<Vec<Run>> {
        const C: usize = 10;
        let delay = Duration::from_millis(50);
        let upstreams = self.upstreams(delay).await?;
        let patient = |upstream: serde_json::Value| {
            let mut upstream = upstream;
            upstream["timeout_ms"] = serde_json::json!(1400);
            upstream
        };
        let graph = |mode: &str| {
            serde_json::json!({"deadline_ms": 1500, "max_deadline_ms": 1500, "mode": mode,
                "routes": [{"path": "/graph/{id}", "upstreams": [
                    patient(serde_json::json!({"name": "inventory", "url": "{base}/inventory/{id}"})),
                    patient(serde_json::json!({"name": "pricing", "url": "{base}/pricing/{id}"})),
                    patient(serde_json::json!({"name": "reviews",
                        "url": "{base}/reviews/{inventory.warehouse}"}))]}]})
        };
        let list = |pricing: serde_json::Value, max_in_flight: usize| {
            serde_json::json!({"deadline_ms": 1500, "max_deadline_ms": 1500,
                "max_in_flight": max_in_flight,
                "routes": [{"path": "/bulk/{id}", "upstreams": [
                    patient(serde_json::json!({"name": "inventory", "url": "{base}/lists/{id}",
                        "field": "list", "select": ["n"]})),
                    patient(pricing)]}]})
        };
        let per_id = serde_json::json!({"name": "pricing", "url": "{base}/pricing/{each}",
            "each": "inventory.ids[]", "field": "prices"});
        let batched = serde_json::json!({"name": "pricing", "url": "{base}/pricing",
            "each": "inventory.ids[]", "field": "prices",
            "batch": {"param": "ids", "max": 50}});
        let rows: [(&str, &str, serde_json::Value); 5] = [
            (
                "A then C, B alongside (dependent call)",
                "/graph/42",
                graph("concurrent"),
            ),
            (
                "A, B, C one after another (sequential)",
                "/graph/42",
                graph("sequential"),
            ),
            (
                "list of 100, batch upstream (50 ids a call)",
                "/bulk/100",
                list(batched, 16),
            ),
            (
                "list of 100, a call per id, 16 in flight",
                "/bulk/100",
                list(per_id.clone(), 16),
            ),
            (
                "list of 100, a call per id, 100 in flight",
                "/bulk/100",
                list(per_id, 100),
            ),
        ];
        let mut runs = Vec::new();
        for repeat in 0..self.repeats {
            for (label, path, config) in &rows {
                let args = vec![
                    "serve-fanout".to_string(),
                    "--upstream".into(),
                    upstreams.base.clone(),
                    "--guest-config".into(),
                    config.to_string(),
                ];
                let process = Process::start("fanout", &self.exe, &args).await?;
                let status = driver::get_once(&format!("{}{path}", process.base)).await?;
                anyhow::ensure!(status == 200, "{label}: {path} answered {status}");
                let window = Window {
                    scenario: "aggregation",
                    concurrency: C,
                    delay,
                    repeat,
                };
                let name = format!("aggregation {label} #{}", repeat + 1);
                let urls = driver::Urls::one(&format!("{}{path}", process.base));
                let mut run = self
                    .measure_counting_calls(
                        window,
                        Target::Fanout,
                        &process,
                        &upstreams,
                        urls,
                        &name,
                    )
                    .await?;
                run.scenario = format!("aggregation: {label}");
                eprintln!("{}", report::one_line(&run));
                runs.push(run);
                process.stop().await;
            }
        }
        upstreams.stop().await;
        Ok(runs)
    }

    /// Saturation (0 ms upstreams, c=64) with the upstreams over plain
    /// HTTP/1.1, HTTPS with HTTP/1.1, and HTTPS with HTTP/2, alternating;
    /// each window also counts the target's open connections to them.
    pub async fn https_saturation(&self) -> Result<Vec<Run>> {
        const C: usize = 64;
        let dir = std::env::temp_dir().join(format!("fanout-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let plain = self.upstreams(Duration::ZERO).await?;
        let tls = Process::start(
            "upstreams-tls",
            &self.exe,
            &[
                "serve-upstreams".into(),
                "--delay-ms".into(),
                "0".into(),
                "--tls-dir".into(),
                dir.display().to_string(),
            ],
        )
        .await?;
        let tls_port: u16 = tls.base.rsplit(':').next().unwrap_or("0").parse()?;
        let plain_port: u16 = plain.base.rsplit(':').next().unwrap_or("0").parse()?;
        let ca = dir.join("ca.pem").display().to_string();
        let mut runs = Vec::new();
        for repeat in 0..self.repeats {
            for target in [Target::Fanout, Target::FanoutHttps1, Target::FanoutHttps2] {
                let (upstreams, port, extra): (&Process, u16, Vec<String>) = match target {
                    Target::Fanout => (&plain, plain_port, vec![]),
                    _ => (
                        &tls,
                        tls_port,
                        vec![
                            "--upstream-ca".into(),
                            ca.clone(),
                            "--http2".into(),
                            if target == Target::FanoutHttps2 {
                                "auto"
                            } else {
                                "never"
                            }
                            .into(),
                        ],
                    ),
                };
                let base = format!("https://localhost:{tls_port}");
                let mut args = vec![
                    "serve-fanout".to_string(),
                    "--upstream".into(),
                    if target == Target::Fanout {
                        plain.base.clone()
                    } else {
                        base
                    },
                ];
                args.extend(extra);
                let process = Process::start(target.name(), &self.exe, &args).await?;
                let window = Window {
                    scenario: "https-saturation",
                    concurrency: C,
                    delay: Duration::ZERO,
                    repeat,
                };
                let mut run = self.measure(window, target, &process, upstreams).await;
                run.upstream_connections = Some(targets::established_to(port) as u64);
                eprintln!(
                    "{} ({} upstream connections open)",
                    report::one_line(&run),
                    run.upstream_connections.unwrap_or(0)
                );
                runs.push(run);
                process.stop().await;
            }
        }
        tls.stop().await;
        plain.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(runs)
    }

    async fn latency_named(
        &self,
        scenario: &str,
        targets: &[Target],
        levels: &[usize],
        delay: Duration,
    ) -> Result<Vec<Run>> {
        let mut runs = self.latency(targets, levels, delay).await?;
        for run in &mut runs {
            run.scenario = scenario.into();
        }
        Ok(runs)
    }

    /// A long saturation run: rps over time and the TIME_WAIT sockets it
    /// leaves.
    pub async fn sustained(
        &self,
        target: Target,
        concurrency: usize,
        length: Duration,
    ) -> Result<Option<Sustained>> {
        let upstreams = self.upstreams(Duration::ZERO).await?;
        let Some(process) = self.start(target, &upstreams).await? else {
            upstreams.stop().await;
            return Ok(None);
        };
        let long = Harness {
            measure: length,
            ..self.clone()
        };
        let window = Window {
            scenario: "sustained",
            concurrency,
            delay: Duration::ZERO,
            repeat: 0,
        };
        let run = long.measure(window, target, &process, &upstreams).await;
        let time_wait = targets::time_wait_sockets();
        process.stop().await;
        upstreams.stop().await;
        let per_10s = run
            .load
            .rps_per_second
            .chunks(10)
            .map(|c| c.iter().sum::<u64>() as f64 / c.len() as f64)
            .collect();
        Ok(Some(Sustained {
            target,
            rps_per_10s: per_10s,
            time_wait_sockets: time_wait,
            run,
        }))
    }
}

fn cpu_of(pid: u32) -> Duration {
    targets::cpu_time_of(pid)
}

/// Clients at which the overload scenario measures `fanout`'s capacity
/// with 50 ms upstreams; the most answers any of them gets is the
/// capacity. Closed-loop clients get at most one answer each per ~55 ms,
/// so the fewest that keep both cores busy depend on the machine: 150 did
/// at 2,000 answers a second, and got only as many as they could ask for
/// (150 / 54 ms) on a machine that answered 5,000. A few more than needed
/// cost little: admission sheds what the cores cannot finish in time.
pub const CAPACITY_CLIENTS: [usize; 3] = [150, 300, 600];

/// Clients of the soak that hang up mid-request, each in a loop.
pub const SOAK_QUITTERS: usize = 20;
/// How far into a request a quitter hangs up: before any answer (the
/// upstreams take 50 ms).
const SOAK_QUIT_AFTER: Duration = Duration::from_millis(20);
/// Clients of the soak that re-send at once.
pub const SOAK_CONCURRENCY: usize = 500;

/// The long run against faulty upstreams.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Soak {
    pub seconds: f64,
    pub load: LoadResult,
    /// Requests whose client hung up 20 ms in.
    pub hangups: u64,
    /// Resident memory when the measured window opened and when it closed
    /// (the last sample taken under load).
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
    /// Resident memory once the load's clients had all been answered and
    /// gone: the host gives back what the crowd took.
    #[serde(default)]
    pub rss_after_bytes: u64,
    /// RSS every 10 s of the window, from its start.
    #[serde(default)]
    pub rss_per_10s: Vec<u64>,
    /// Open file descriptors before any load (after one request), when
    /// the window opened, and once the load stopped and the upstream
    /// pool's idle connections have been reaped (62 s later).
    #[serde(default)]
    pub fds_idle: usize,
    pub fds_start: usize,
    pub fds_end: usize,
}

impl Harness {
    /// `soak`: `fanout` at c=500 (re-sending clients) for `length`, against
    /// upstreams that fail 10 % of calls in four ways, while 20 more
    /// clients hang up 20 ms into each of their requests.
    pub async fn soak(&self, length: Duration) -> Result<Soak> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let upstreams = Process::start(
            "upstreams",
            &self.exe,
            &["serve-upstreams", "--delay-ms", "50", "--faults"].map(String::from),
        )
        .await?;
        let Some(process) = self.start(Target::Fanout, &upstreams).await? else {
            anyhow::bail!("fanout did not start");
        };
        let url = format!("{}/products/42", process.base);
        driver::get_once(&url).await?;
        let fds_idle = process.open_fds();
        let addr = process
            .base
            .trim_start_matches("http://")
            .parse::<std::net::SocketAddr>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let hangups = Arc::new(AtomicU64::new(0));
        let quitters: Vec<_> = (0..SOAK_QUITTERS)
            .map(|_| {
                let (stop, hangups) = (stop.clone(), hangups.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                            tokio::time::sleep(SOAK_QUIT_AFTER).await;
                            continue;
                        };
                        let head = b"GET /products/42 HTTP/1.1\r\nhost: fanout\r\n\r\n";
                        if stream.write_all(head).await.is_ok() {
                            tokio::time::sleep(SOAK_QUIT_AFTER).await;
                            hangups.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let at_start = {
            let (pid, warmup) = (process.pid(), self.warmup);
            let fds = move || {
                pid.and_then(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
                    .map(|dir| dir.count())
                    .unwrap_or(0)
            };
            tokio::spawn(async move {
                tokio::time::sleep(warmup).await;
                (pid.map(targets::rss_of).unwrap_or(0), fds())
            })
        };
        let sampler = {
            let (pid, warmup) = (process.pid(), self.warmup);
            let samples = (length.as_secs() / 10) as usize;
            tokio::spawn(async move {
                tokio::time::sleep(warmup).await;
                let mut rss = Vec::new();
                for _ in 0..samples {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    rss.push(pid.map(targets::rss_of).unwrap_or(0));
                }
                rss
            })
        };
        let load = driver::run(
            driver::Urls::one(&url),
            SOAK_CONCURRENCY,
            self.warmup,
            length,
            "soak fanout c=500",
            driver::Backoff::None,
        )
        .await;
        // Read here, the clients are gone and the host has given back what
        // they took (30 MiB of 180 once on the AMD box): the window's end
        // is its last sample, taken under load.
        let rss_after = process.rss();
        stop.store(true, Ordering::Relaxed);
        for quitter in quitters {
            let _ = quitter.await;
        }
        let (rss_start, fds_start) = at_start.await.unwrap_or_default();
        let rss_per_10s = sampler.await.unwrap_or_default();
        let rss_end = rss_per_10s.last().copied().unwrap_or(rss_after);
        // Once the clients are gone and the upstream pool's idle
        // connections have timed out, what is open should be what was open
        // before the load. hyper-util's pool reaps idle connections on a
        // timer of the idle timeout's period: up to two periods.
        let idle = fanout_host::adapters::DEFAULT_IDLE_TIMEOUT * 2 + Duration::from_secs(2);
        tokio::time::sleep(idle).await;
        let fds_end = process.open_fds();
        process.stop().await;
        upstreams.stop().await;
        Ok(Soak {
            seconds: length.as_secs_f64(),
            load,
            hangups: hangups.load(Ordering::Relaxed),
            rss_start_bytes: rss_start,
            rss_end_bytes: rss_end,
            rss_after_bytes: rss_after,
            rss_per_10s,
            fds_idle,
            fds_start,
            fds_end,
        })
    }
}

/// A long run's shape over time.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Sustained {
    pub target: Target,
    pub rps_per_10s: Vec<f64>,
    pub time_wait_sockets: usize,
    pub run: Run,
}

/// `micro`: per-request costs of the host.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
#[serde(default)]
pub struct Micro {
    /// Making a fresh instance (a host that makes one per request).
    pub instantiation_us: f64,
    /// Instantiation's share of a request in the default mode (instances
    /// reused).
    pub instantiation_per_request_reused_us: f64,
    pub fuel_per_request: u64,
    pub in_process_request_us: f64,
    /// The same whole request with an engine built without fuel metering,
    /// measured alternately with the one above.
    pub in_process_request_no_fuel_us: f64,
    pub instantiation_no_fuel_us: f64,
    pub peak_rss_idle_mib: f64,
    pub peak_rss_at_500_mib: f64,
    pub rss_per_in_flight_kib: f64,
    pub in_flight_ok: u64,
    pub first_answer_cold_ms: f64,
    pub first_answer_cached_ms: f64,
}

impl Harness {
    pub async fn micro(&self) -> Result<Micro> {
        let mut micro = Micro::default();
        // Instantiation and fuel: in this process, upstreams answering at once.
        let instant = || {
            fanout_host::adapters::from_fn(|request| async move {
                let body = fanout_host::demo::answer_for(
                    request.uri().path_and_query().map_or("/", |p| p.as_str()),
                );
                Ok(fanout_host::adapters::json_response(
                    http::StatusCode::OK,
                    &body,
                ))
            })
        };
        let build = |fuel: Option<u64>, instance_reuse: u32| {
            fanout_host::Fanout::builder()
                .limits(fanout_host::Limits {
                    fuel,
                    instance_reuse,
                    ..Default::default()
                })
                .upstream("inventory", "http://inventory.local", instant())
                .upstream("pricing", "http://pricing.local", instant())
                .upstream("reviews", "http://reviews.local", instant())
                .build()
        };
        let reuse = fanout_host::limits::DEFAULT_INSTANCE_REUSE;
        let metered = build(Some(fanout_host::limits::DEFAULT_FUEL), reuse)?;
        let unmetered = build(None, reuse)?;
        // Reused instances are rarely made, and then cold: a fresh instance
        // for each request measures what making one costs.
        let fresh = build(Some(fanout_host::limits::DEFAULT_FUEL), 1)?;
        let fresh_unmetered = build(None, 1)?;
        let one = |fanout: &fanout_host::Fanout| {
            let fanout = fanout.clone();
            async move {
                let request = http::Request::get("/products/42")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("request");
                use http_body_util::BodyExt;
                let response = fanout.handle(request).await;
                let _ = response.into_body().collect().await;
            }
        };
        for _ in 0..200 {
            for fanout in [&metered, &unmetered, &fresh, &fresh_unmetered] {
                one(fanout).await;
            }
        }
        let before = metered.stats();
        let (fresh_before, fresh_before_nf) = (fresh.stats(), fresh_unmetered.stats());
        // Alternating rounds, so that both see the same machine.
        const N: u32 = 3000;
        const ROUND: u32 = 100;
        let (mut with_fuel, mut without) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..N / ROUND {
            for (fanout, total) in [(&metered, &mut with_fuel), (&unmetered, &mut without)] {
                let started = Instant::now();
                for _ in 0..ROUND {
                    one(fanout).await;
                }
                *total += started.elapsed();
            }
        }
        let after = metered.stats();
        for _ in 0..N / ROUND {
            for fanout in [&fresh, &fresh_unmetered] {
                for _ in 0..ROUND {
                    one(fanout).await;
                }
            }
        }
        let (fresh_after, fresh_after_nf) = (fresh.stats(), fresh_unmetered.stats());
        let per_instance = |a: &fanout_host::StatsSnapshot, b: &fanout_host::StatsSnapshot| {
            let n = (a.instantiations - b.instantiations).max(1);
            (a.instantiate_time - b.instantiate_time).as_secs_f64() * 1e6 / n as f64
        };
        micro.instantiation_us = per_instance(&fresh_after, &fresh_before);
        micro.instantiation_no_fuel_us = per_instance(&fresh_after_nf, &fresh_before_nf);
        // Per request, not per instance: with reuse, one instance serves
        // many.
        let requests = (after.requests - before.requests).max(1);
        micro.instantiation_per_request_reused_us =
            (after.instantiate_time - before.instantiate_time).as_secs_f64() * 1e6
                / requests as f64;
        micro.fuel_per_request = (after.fuel_consumed - before.fuel_consumed) / requests;
        micro.in_process_request_us = with_fuel.as_secs_f64() * 1e6 / N as f64;
        micro.in_process_request_no_fuel_us = without.as_secs_f64() * 1e6 / N as f64;

        // Time to the first answer, compiling the component at start.
        let upstreams = self.upstreams(Duration::from_millis(1000)).await?;
        let started = Instant::now();
        // Slow upstreams and a budget to match, so that 500 requests stay in
        // flight (and in instances) at once.
        let config = r#"{"deadline_ms": 1500, "max_deadline_ms": 1500, "routes": [{
            "path": "/products/{id}", "upstreams": [
            {"name": "inventory", "url": "{base}/inventory/{id}", "timeout_ms": 1400},
            {"name": "pricing", "url": "{base}/pricing/{id}", "field": "price", "timeout_ms": 1400},
            {"name": "reviews", "url": "{base}/reviews/{id}", "required": false, "timeout_ms": 1400}]}]}"#;
        let process = Process::start(
            "fanout",
            &self.exe,
            &[
                "serve-fanout".into(),
                "--upstream".into(),
                upstreams.base.clone(),
                "--guest-config".into(),
                config.into(),
                "--max-instances".into(),
                "1024".into(),
                // All 500 in instances at once, not in a line.
                "--fixed".into(),
            ],
        )
        .await?;
        let url = format!("{}/products/42", process.base);
        let status = driver::get_once(&url).await?;
        anyhow::ensure!(status == 200, "first answer: HTTP {status}");
        let _ = started;
        micro.peak_rss_idle_mib = process.peak_rss() as f64 / 1048576.0;
        // 500 requests held in flight by 1 s upstreams.
        let load = driver::run(
            driver::Urls::one(&url),
            500,
            Duration::ZERO,
            Duration::from_secs(3),
            "500 in flight",
            driver::Backoff::RetryAfter,
        )
        .await;
        micro.in_flight_ok = load.statuses.get(&200).copied().unwrap_or(0);
        micro.peak_rss_at_500_mib = process.peak_rss() as f64 / 1048576.0;
        micro.rss_per_in_flight_kib =
            (micro.peak_rss_at_500_mib - micro.peak_rss_idle_mib) * 1024.0 / 500.0;
        process.stop().await;

        upstreams.stop().await;
        // Time to the first answer: compiling, then from a warm cache, with
        // upstreams that answer at once.
        let upstreams = self.upstreams(Duration::ZERO).await?;
        let cache = std::env::temp_dir().join(format!("fanout-bench-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        for cached in [false, true] {
            let started = Instant::now();
            let process = Process::start(
                "fanout",
                &self.exe,
                &[
                    "serve-fanout".into(),
                    "--upstream".into(),
                    upstreams.base.clone(),
                    "--cache-dir".into(),
                    cache.display().to_string(),
                ],
            )
            .await?;
            let status = driver::get_once(&format!("{}/products/42", process.base)).await?;
            anyhow::ensure!(status == 200, "first answer: HTTP {status}");
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if cached {
                micro.first_answer_cached_ms = ms;
            } else {
                micro.first_answer_cold_ms = ms;
            }
            process.stop().await;
        }
        let _ = std::fs::remove_dir_all(&cache);
        upstreams.stop().await;
        Ok(micro)
    }
}
