//! BENCHMARKS.md, the raw JSON and the latency plot.

use crate::driver::Backoff;
use crate::{CAPACITY_CLIENTS, Micro, Run, Sustained, Target};
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write;
use std::path::Path;

/// Everything one `fanout-bench all` measured.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Results {
    pub machine: Machine,
    pub commands: Vec<String>,
    pub latency: Vec<Run>,
    pub saturation: Vec<Run>,
    /// `fanout` overloaded, with clients that honour Retry-After and not.
    #[serde(default)]
    pub overload: Vec<Run>,
    pub sustained: Vec<Sustained>,
    pub micro: Option<Micro>,
    /// Open loop (constant arrival rate) at multiples of `fanout`'s
    /// saturation rate.
    #[serde(default)]
    pub open_loop: Vec<Run>,
    /// `fanout`'s saturation rate the open-loop rates are multiples of,
    /// measured in the same run.
    #[serde(default)]
    pub open_loop_capacity: Option<f64>,
    /// The long run against faulty upstreams.
    #[serde(default)]
    pub soak: Option<crate::Soak>,
    /// Hot keys: `fanout` making every call, coalescing, caching.
    #[serde(default)]
    pub hot_keys: Vec<Run>,
    /// Saturation with plain, HTTPS/1.1 and HTTPS/2 upstreams.
    #[serde(default)]
    pub https: Vec<Run>,
    /// Dependent calls and lists, by route shape.
    #[serde(default)]
    pub aggregation: Vec<Run>,
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub date: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let date = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            date,
        }
    }
}

pub fn one_line(run: &Run) -> String {
    let l = &run.load;
    format!(
        "{:<10} {:<18} c={:<4} rps {:>8.0}  2xx/s {:>8.0}  p50 {:>7.1} ms  p99 {:>7.1} ms  cpu {:.3} ms/req  statuses {:?} errors {:?}",
        run.scenario,
        run.target.name(),
        l.concurrency,
        l.rps,
        l.goodput,
        l.p50_ms,
        l.p99_ms,
        run.cpu_ms_per_request,
        l.statuses,
        l.errors
    )
}

/// Median and spread of a value over the repeats of one (target, level).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stat(values: impl Iterator<Item = f64>) -> Stat {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return Stat {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    let mid = v.len() / 2;
    // With an even count, the mean of the middle two: the upper one alone
    // would report the best of two repeats' rps and the worst of their
    // latencies.
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    Stat {
        median,
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn group(runs: &[Run], target: Target, c: usize) -> Vec<&Run> {
    runs.iter()
        .filter(|r| r.target == target && r.load.concurrency == c)
        .collect()
}

fn cell(s: Stat, digits: usize) -> String {
    if s.median.is_nan() {
        return "n/a".into();
    }
    if (s.max - s.min).abs() < f64::EPSILON {
        return format!("{:.*}", digits, s.median);
    }
    format!(
        "{:.*} ({:.*}–{:.*})",
        digits, s.median, digits, s.min, digits, s.max
    )
}

fn levels(runs: &[Run]) -> Vec<usize> {
    let mut levels: Vec<usize> = runs.iter().map(|r| r.load.concurrency).collect();
    levels.sort();
    levels.dedup();
    levels
}

pub fn median_of(runs: &[Run], target: Target, c: usize, f: impl Fn(&Run) -> f64) -> f64 {
    stat(group(runs, target, c).into_iter().map(f)).median
}

fn table(out: &mut String, runs: &[Run]) {
    out.push_str("| target | c | rps | 2xx/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | CPU ms/req | non-2xx | no answer |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for target in Target::REPORTED {
        for c in levels(runs) {
            let g = group(runs, target, c);
            if g.is_empty() {
                continue;
            }
            let s = |f: &dyn Fn(&Run) -> f64| stat(g.iter().map(|r| f(r)));
            let non_2xx: u64 = g
                .iter()
                .flat_map(|r| r.load.statuses.iter())
                .filter(|(s, _)| !(200..300).contains(*s))
                .map(|(_, n)| n)
                .sum();
            let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
            for r in &g {
                for (k, v) in &r.load.statuses {
                    if !(200..300).contains(k) {
                        *statuses.entry(*k).or_default() += v;
                    }
                }
            }
            let errors: u64 = g.iter().flat_map(|r| r.load.errors.values()).sum();
            let _ = writeln!(
                out,
                "| {} | {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                target.name(),
                cell(s(&|r| r.load.rps), 0),
                cell(s(&|r| r.load.goodput), 0),
                cell(s(&|r| r.load.p50_ms), 1),
                cell(s(&|r| r.load.p90_ms), 1),
                cell(s(&|r| r.load.p99_ms), 1),
                cell(s(&|r| r.load.p999_ms), 1),
                cell(s(&|r| r.load.max_ms), 0),
                cell(s(&|r| r.cpu_ms_per_request), 3),
                if non_2xx == 0 {
                    "0".to_string()
                } else {
                    format!("{non_2xx} {statuses:?}")
                },
                errors
            );
        }
    }
}

/// Writes BENCHMARKS.md, `bench/results.json` and `bench/latency.svg`
/// under `root`.
pub fn write(root: &Path, results: &Results) -> Result<()> {
    std::fs::create_dir_all(root.join("bench"))?;
    std::fs::write(
        root.join("bench/results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    if !results.latency.is_empty() {
        plot(&root.join("bench/latency.svg"), &results.latency)?;
    }
    std::fs::write(root.join("BENCHMARKS.md"), markdown(results))?;
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

/// Whether every request of `run` was answered, each a 2xx or a 503.
fn answered_2xx_or_503(run: &Run) -> bool {
    run.load
        .statuses
        .keys()
        .all(|s| (200..300).contains(s) || *s == 503)
        && run.load.errors.is_empty()
}

fn only_503_or_not(only_503: bool) -> &'static str {
    if only_503 {
        "only 503"
    } else {
        "other statuses or no answer"
    }
}

/// A p99 in ms, or `none` when there was nothing to take it of (NaN).
fn ms_or(ms: f64, none: &str) -> String {
    if ms.is_nan() {
        none.to_string()
    } else {
        format!("{ms:.1} ms")
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// "met"/"missed", or "n/a" when the run did not measure it.
fn verdict(value: f64, ok: bool) -> &'static str {
    if value.is_nan() {
        "n/a (not measured)"
    } else {
        met(ok)
    }
}

pub fn markdown(r: &Results) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Measured {} on {} cores ({}), every target as its own process on loopback, \
         all in one run (a command below dated later re-measured its section then, \
         and the ratios that use it, on the machine it names if another): absolute \
         numbers vary from machine to machine, the ratios are the result. The machine is shared and noisy: each cell is the median of \
         the repeats, with the spread (min–max) in brackets. The load driver keeps \
         a fixed number of clients, each sending its next request as soon as the \
         last is answered, 503 or not, as wrk, hey, k6 and most retry loops do \
         (the overload section also shows clients that honour `Retry-After`).\n",
        m.date, m.cores, m.cpu_model
    );
    let _ = writeln!(out, "Reproduce with:\n\n```sh");
    for c in &r.commands {
        let _ = writeln!(out, "{c}");
    }
    let _ = writeln!(out, "```\n");
    let _ = writeln!(
        out,
        "Raw results: [`bench/results.json`](bench/results.json).\n"
    );
    for s in &r.skipped {
        let _ = writeln!(out, "> Skipped: {s}\n");
    }

    // Headline.
    let lat = &r.latency;
    let sat = &r.saturation;
    let good = |runs: &[Run], t, c| median_of(runs, t, c, |x| x.load.goodput);
    let sat_c = levels(sat).first().copied().unwrap_or(64);
    let fanout_sat = good(sat, Target::Fanout, sat_c);
    // Against the blocking baseline: the overload scenario's c=500 rows
    // (the same clients, side by side), else the latency scenario's.
    let hostile_over = with_backoff(&r.overload, Backoff::None);
    let blocking_runs: &[Run] = if group(&hostile_over, Target::Blocking, 500).is_empty() {
        lat
    } else {
        &hostile_over
    };
    let (fanout_beside_blocking, blocking_500) = (
        good(blocking_runs, Target::Fanout, 500),
        good(blocking_runs, Target::Blocking, 500),
    );
    let _ = writeln!(out, "## Headline\n");
    let _ = writeln!(out, "| ratio | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| `fanout` / `blocking` goodput at c=500 | {} |",
        ratio(fanout_beside_blocking, blocking_500)
    );
    let _ = writeln!(
        out,
        "| `fanout` / `fanout-sequential` goodput at c=50 | {} |",
        ratio(
            good(lat, Target::Fanout, 50),
            good(lat, Target::FanoutSequential, 50)
        )
    );
    let _ = writeln!(
        out,
        "| `fanout` / `wasmtime-serve` rps at saturation (c={sat_c}) | {} |",
        ratio(fanout_sat, good(sat, Target::WasmtimeServe, sat_c))
    );
    let _ = writeln!(
        out,
        "| `fanout` / `wasmtime-serve-reuse` rps at saturation (c={sat_c}) | {} |",
        ratio(fanout_sat, good(sat, Target::WasmtimeServeReuse, sat_c))
    );
    let _ = writeln!(
        out,
        "| `fanout` / `native` rps at saturation (c={sat_c}) | {} |",
        ratio(fanout_sat, good(sat, Target::Native, sat_c))
    );
    let _ = writeln!(
        out,
        "| `fanout` (instances reused) / `fanout-per-request` rps at saturation (c={sat_c}) | {} |",
        ratio(fanout_sat, good(sat, Target::FanoutPerRequest, sat_c))
    );
    let fanout_p3_sat = good(sat, Target::FanoutP3, sat_c);
    if !fanout_p3_sat.is_nan() {
        let _ = writeln!(
            out,
            "| `fanout-p3` (the `wasi:http@0.3` build) / `fanout` rps at saturation (c={sat_c}) | {} |",
            ratio(fanout_p3_sat, fanout_sat)
        );
        let _ = writeln!(
            out,
            "| `fanout-p3` / `wasmtime-serve-p3` rps at saturation (c={sat_c}) | {} |",
            ratio(fanout_p3_sat, good(sat, Target::WasmtimeServeP3, sat_c))
        );
    }
    let cpu_per_request = |t| {
        median_of(sat, t, sat_c, |x| {
            1e3 * x.target_cpu_s / (x.load.goodput * x.load.seconds)
        })
    };
    let _ = writeln!(
        out,
        "| telemetry on (JSON access log + OTLP export) / off, rps at saturation (c={sat_c}) | {} (CPU per request {:.3} ms on, {:.3} ms off) |",
        ratio(good(sat, Target::FanoutTelemetry, sat_c), fanout_sat),
        cpu_per_request(Target::FanoutTelemetry),
        cpu_per_request(Target::Fanout),
    );
    out.push('\n');

    // Goals.
    let p99 = |c| median_of(lat, Target::Fanout, c, |x| x.load.p99_ms);
    // Overload goals from the overload scenario, or from the latency
    // scenario's c=500: goodput with clients that re-send at once; the
    // speed of a 503 with clients that honour Retry-After (one that does
    // not gets its next 503 no sooner than Retry-After asked).
    let honouring = with_backoff(&r.overload, Backoff::RetryAfter);
    let hostile = &hostile_over;
    let over: &[Run] = if group(hostile, Target::Fanout, 500).is_empty() {
        lat
    } else {
        hostile
    };
    let goodput_500 = good(over, Target::Fanout, 500);
    let goodput_5000 = good(over, Target::Fanout, 5000);
    let ok_p99 = stat(
        group(over, Target::Fanout, 500)
            .iter()
            .filter_map(|x| x.load.ok_p99_ms),
    )
    .median;
    let fanout_500: Vec<&Run> = group(&honouring, Target::Fanout, 500);
    let non_2xx_p99 = stat(fanout_500.iter().filter_map(|x| x.load.non_2xx_p99_ms)).median;
    let only_503 = fanout_500.iter().all(|x| answered_2xx_or_503(x));
    let _ = writeln!(out, "## Goals\n");
    let _ = writeln!(out, "| goal | target | measured | |\n|---|---|---|---|");
    let _ = writeln!(
        out,
        "| `fanout` p99 at c=5, 50 ms upstreams | ≤ 53 ms | {:.1} ms | {} |",
        p99(5),
        met(p99(5) <= 53.0)
    );
    let _ = writeln!(
        out,
        "| `fanout` p99 at c=50 | ≤ 58 ms | {:.1} ms | {} |",
        p99(50),
        met(p99(50) <= 58.0)
    );
    for (c, goodput, goal) in [(500, goodput_500, 0.9), (5000, goodput_5000, 0.8)] {
        let frac = goodput / fanout_sat;
        let _ = writeln!(
            out,
            "| `fanout` goodput at c={c}, clients re-sending at once / its saturation rps | ≥ {:.0}% | {:.0}% ({goodput:.0} / {fanout_sat:.0}) | {} |",
            goal * 100.0,
            frac * 100.0,
            verdict(frac, frac >= goal)
        );
    }
    // #14's open-loop goal: at twice the saturation rate, goodput of at
    // least 90 % of it, and every other request a fast 503.
    if let Some(capacity) = r.open_loop_capacity {
        let at_2x = open_loop_at_2x(&r.open_loop, capacity, Target::Fanout);
        if !at_2x.is_empty() {
            let share = stat(at_2x.iter().map(|x| x.load.goodput / capacity)).median;
            let p99 = stat(at_2x.iter().filter_map(|x| x.load.non_2xx_p99_ms)).median;
            let only_503 = at_2x.iter().all(|x| answered_2xx_or_503(x));
            let _ = writeln!(
                out,
                "| `fanout` open loop at 2× its saturation rate: goodput / saturation, and the rest | ≥ 90%, only 503, p99 < 5 ms | {:.0}%, {}, p99 {} | {} |",
                share * 100.0,
                only_503_or_not(only_503),
                ms_or(p99, "n/a (none)"),
                met(share >= 0.9 && only_503 && (p99.is_nan() || p99 < 5.0))
            );
        }
    }
    let _ = writeln!(
        out,
        "| `fanout` non-2xx at c=500, clients honouring Retry-After, are fast 503s | only 503, p99 < 5 ms | {}, p99 {} | {} |",
        only_503_or_not(only_503),
        ms_or(non_2xx_p99, "n/a (none)"),
        if fanout_500.is_empty() {
            "n/a (not measured)"
        } else {
            met(only_503 && (non_2xx_p99.is_nan() || non_2xx_p99 < 5.0))
        }
    );
    let _ = writeln!(
        out,
        "| `fanout` 2xx at c=500 inside the budget + line | p99 ≤ 300 ms | {ok_p99:.1} ms | {} |",
        verdict(ok_p99, ok_p99 <= 300.0)
    );
    let vs_blocking = fanout_beside_blocking / blocking_500;
    let _ = writeln!(
        out,
        "| `fanout` / `blocking` goodput at c=500 | ≥ 30× | {vs_blocking:.1}× | {} |",
        met(vs_blocking >= 30.0)
    );
    let vs_ws = fanout_sat / good(sat, Target::WasmtimeServe, sat_c);
    let _ = writeln!(
        out,
        "| `fanout` / `wasmtime-serve` at saturation | ≥ 2× | {vs_ws:.2}× | {} |",
        verdict(vs_ws, vs_ws >= 2.0)
    );
    let vs_ws_reuse = fanout_sat / good(sat, Target::WasmtimeServeReuse, sat_c);
    let _ = writeln!(
        out,
        "| `fanout` / `wasmtime-serve-reuse` at saturation | ≥ 1.5× | {vs_ws_reuse:.2}× | {} |",
        verdict(vs_ws_reuse, vs_ws_reuse >= 1.5)
    );
    let vs_native = fanout_sat / good(sat, Target::Native, sat_c);
    let _ = writeln!(
        out,
        "| `fanout` / `native` at saturation | ≥ 0.5× (then 0.7×) | {vs_native:.2}× | {} |",
        met(vs_native >= 0.5)
    );
    for (c, within) in [(5, 1.0), (50, 2.0)] {
        let gap = p99(c) - median_of(lat, Target::Native, c, |x| x.load.p99_ms);
        let _ = writeln!(
            out,
            "| `fanout` p99 − `native` p99 at c={c} | ≤ {within} ms | {gap:.1} ms | {} |",
            verdict(gap, gap <= within)
        );
    }
    if let Some(micro) = &r.micro {
        let _ = writeln!(
            out,
            "| instantiation of a fresh instance | ≤ 20 µs | {:.1} µs | {} |",
            micro.instantiation_us,
            met(micro.instantiation_us <= 20.0)
        );
        let _ = writeln!(
            out,
            "| peak RSS per in-flight request at c=500 | ≤ 1 MiB | {:.0} KiB | {} |",
            micro.rss_per_in_flight_kib,
            met(micro.rss_per_in_flight_kib <= 1024.0)
        );
        let _ = writeln!(
            out,
            "| first answer after a restart, warm cache | ≤ 100 ms | {:.0} ms | {} |",
            micro.first_answer_cached_ms,
            met(micro.first_answer_cached_ms <= 100.0)
        );
    }
    out.push('\n');
    bounds_section(&mut out, r, sat_c);

    let _ = writeln!(out, "## Latency: three upstreams at 50 ms each\n");
    let _ = writeln!(
        out,
        "![p50 and p99 latency against concurrency](bench/latency.svg)\n"
    );
    table(&mut out, lat);
    let _ = writeln!(out);
    let _ = writeln!(out, "## Saturation: upstreams at 0 ms, c={sat_c}\n");
    table(&mut out, sat);
    let _ = writeln!(out);
    let per_request = good(sat, Target::FanoutPerRequest, sat_c);
    if !per_request.is_nan() {
        let cpu = |t| {
            median_of(sat, t, sat_c, |x| {
                1e3 * x.target_cpu_s / (x.load.goodput * x.load.seconds)
            })
        };
        let _ = writeln!(
            out,
            "**Instance reuse.** `fanout` reuses an instance for up to {} requests \
             (`instance_reuse`, the default); `fanout-per-request` gives each request a \
             fresh one (`--instance-reuse 1`). Reuse serves {} the requests at \
             saturation, at {:.3} against {:.3} ms of CPU a request: it skips the store's \
             set-up, instantiation, the guest's start-up (reading its configuration) and \
             the pool slot's reset. That is why reuse is the default. \
             `wasmtime-serve-reuse` is `wasmtime serve --max-instance-reuse-count 128`.\n",
            fanout_host::limits::DEFAULT_INSTANCE_REUSE,
            ratio(fanout_sat, per_request),
            cpu(Target::Fanout),
            cpu(Target::FanoutPerRequest),
        );
    }
    let p3 = good(sat, Target::FanoutP3, sat_c);
    if !p3.is_nan() {
        let cpu = |t| {
            median_of(sat, t, sat_c, |x| {
                1e3 * x.target_cpu_s / (x.load.goodput * x.load.seconds)
            })
        };
        let p99 = |t, c| median_of(lat, t, c, |x| x.load.p99_ms);
        let _ = writeln!(
            out,
            "**The `wasi:http@0.3` build.** `fanout-p3` serves the guest's 0.3 build \
             (`--wasi-http 0.3`), one request at a time per instance, reused as `fanout` \
             reuses its own: {} the requests of `fanout` at saturation, at {:.3} against \
             {:.3} ms of CPU a request; p99 at c=5 and c=50 {:.1} and {:.1} ms against \
             `fanout`'s {:.1} and {:.1}. `wasmtime-serve-p3` is `wasmtime serve -Sp3` on the \
             same build with its defaults for 0.3 (128 requests per instance, up to 16 at \
             once). {}\n",
            ratio(p3, fanout_sat),
            cpu(Target::FanoutP3),
            cpu(Target::Fanout),
            p99(Target::FanoutP3, 5),
            p99(Target::FanoutP3, 50),
            p99(Target::Fanout, 5),
            p99(Target::Fanout, 50),
            if fanout_sat >= p3 {
                "The 0.2 build stays the default: it is the faster here, and the one jco and \
                 Spin run."
            } else {
                "The 0.2 build stays the default although the 0.3 one is faster here: jco and \
                 Spin run only the 0.2 one, and the 0.3 API is not yet stable in wasmtime."
            },
        );
    }
    let shared = good(sat, Target::FanoutSharedThreads, sat_c);
    if !shared.is_nan() {
        let honour = |t| {
            let runs = group(&honouring, t, 500);
            (
                stat(runs.iter().filter_map(|x| x.load.non_2xx_p99_ms)).median,
                good(&honouring, t, 500),
            )
        };
        let ((split_p99, split_good), (shared_p99, shared_good)) =
            (honour(Target::Fanout), honour(Target::FanoutSharedThreads));
        let _ = writeln!(
            out,
            "**Threads.** `fanout` runs its guests on threads of their own, one per core, \
             and its connections on others, one per four cores (the binary's default: \
             `fanout_host::threads`); `fanout-shared-threads` runs both on one runtime \
             (`--guest-threads 0`). Apart, it serves {} the requests of one runtime at \
             saturation. At c=500 with clients honouring `Retry-After` (overload, below), \
             its 503s reach them in {} against {} (p99), for \
             {split_good:.0} against {shared_good:.0} answers a second: on one runtime a \
             new request waits behind guest work before the host reads it.\n",
            ratio(fanout_sat, shared),
            ms_or(split_p99, "no 503s"),
            ms_or(shared_p99, "no 503s"),
        );
    }
    if !r.overload.is_empty() {
        let sat_cpu = median_of(sat, Target::Fanout, sat_c, |x| x.cpu_ms_per_request);
        overload_section(&mut out, &r.overload, fanout_sat, sat_cpu);
    }
    for s in &r.sustained {
        let per10: Vec<String> = s.rps_per_10s.iter().map(|v| format!("{v:.0}")).collect();
        let _ = writeln!(
            out,
            "Sustained {} s, `{}`: rps per 10 s: {}; TIME_WAIT sockets at the end: {}.\n",
            s.run.load.seconds,
            s.target.name(),
            per10.join(", "),
            s.time_wait_sockets
        );
    }
    let upstream_cpu: Vec<String> = lat
        .iter()
        .chain(sat.iter())
        .map(|x| format!("{:.0}%", 100.0 * x.upstream_cpu_s / x.load.seconds))
        .collect();
    if let Some(max) = lat
        .iter()
        .chain(sat.iter())
        .map(|x| 100.0 * x.upstream_cpu_s / x.load.seconds)
        .max_by(|a, b| a.total_cmp(b))
    {
        let _ = writeln!(
            out,
            "The upstream simulator used at most {max:.0}% of one core in any window \
             ({} windows), so it was not the bottleneck.\n",
            upstream_cpu.len()
        );
    }
    if let Some(m) = &r.micro {
        let _ = writeln!(out, "## Micro\n");
        let _ = writeln!(out, "| what | value |\n|---|---|");
        let _ = writeln!(
            out,
            "| instantiation of a fresh instance (`--instance-reuse 1`) | {:.1} µs |",
            m.instantiation_us
        );
        if m.instantiation_per_request_reused_us > 0.0 {
            let _ = writeln!(
                out,
                "| instantiation's share of a request, instances reused (the default) | {:.2} µs |",
                m.instantiation_per_request_reused_us
            );
        }
        let _ = writeln!(out, "| fuel per request | {} |", m.fuel_per_request);
        let _ = writeln!(
            out,
            "| whole request in-process (`Fanout::handle`, upstreams answering at once) | {:.0} µs |",
            m.in_process_request_us
        );
        if m.in_process_request_no_fuel_us > 0.0 {
            let _ = writeln!(
                out,
                "| the same without fuel metering (`--fuel 0`), alternating rounds | {:.0} µs ({:+.1}%); instantiation {:.1} µs |",
                m.in_process_request_no_fuel_us,
                100.0 * (m.in_process_request_no_fuel_us / m.in_process_request_us - 1.0),
                m.instantiation_no_fuel_us
            );
        }
        let _ = writeln!(
            out,
            "| peak RSS idle / with 500 in flight | {:.1} MiB / {:.1} MiB |",
            m.peak_rss_idle_mib, m.peak_rss_at_500_mib
        );
        let _ = writeln!(
            out,
            "| peak RSS per in-flight request | {:.0} KiB ({} answered 200 of the 500-in-flight window) |",
            m.rss_per_in_flight_kib, m.in_flight_ok
        );
        let _ = writeln!(
            out,
            "| process start to first answer, compiling at start | {:.0} ms |",
            m.first_answer_cold_ms
        );
        let _ = writeln!(
            out,
            "| process start to first answer, compiled component cached on disk | {:.0} ms |",
            m.first_answer_cached_ms
        );
        out.push('\n');
    }
    if let (Some(capacity), false) = (r.open_loop_capacity, r.open_loop.is_empty()) {
        open_loop_section(&mut out, capacity, &r.open_loop);
    }
    if let Some(soak) = &r.soak {
        soak_section(&mut out, soak);
    }
    if !r.hot_keys.is_empty() {
        hot_keys_section(&mut out, &r.hot_keys);
    }
    if !r.https.is_empty() {
        https_section(&mut out, &r.https);
    }
    if !r.aggregation.is_empty() {
        aggregation_section(&mut out, &r.aggregation);
    }
    out
}

fn https_section(out: &mut String, runs: &[Run]) {
    let _ = writeln!(
        out,
        "## HTTPS upstreams: saturation, upstreams at 0 ms, c=64\n"
    );
    let _ = writeln!(
        out,
        "`fanout` with its three upstreams over plain HTTP/1.1, over HTTPS with \
         HTTP/1.1, and over HTTPS with HTTP/2 (ALPN), alternating window by window \
         (rustls on ring, a CA made for the run and trusted with `ca_file`). \
         *Connections* are the target's open connections to the upstream server at \
         the end of the window: its pool. Medians (and ranges) over the repeats.\n"
    );
    let _ = writeln!(
        out,
        "| upstreams | 2xx/s | p50 ms | p99 ms | CPU ms/req | connections | 2xx/s against plain |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let plain = stat(
        runs.iter()
            .filter(|r| r.target == Target::Fanout)
            .map(|r| r.load.goodput),
    )
    .median;
    for (target, label) in [
        (Target::Fanout, "HTTP/1.1"),
        (Target::FanoutHttps1, "HTTPS, HTTP/1.1"),
        (Target::FanoutHttps2, "HTTPS, HTTP/2"),
    ] {
        let g: Vec<&Run> = runs.iter().filter(|r| r.target == target).collect();
        if g.is_empty() {
            continue;
        }
        let s = |f: &dyn Fn(&Run) -> f64| stat(g.iter().map(|r| f(r)));
        let rps = s(&|r| r.load.goodput);
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} | {} |",
            cell(rps, 0),
            cell(s(&|r| r.load.p50_ms), 1),
            cell(s(&|r| r.load.p99_ms), 1),
            cell(s(&|r| r.cpu_ms_per_request), 3),
            cell(s(&|r| r.upstream_connections.unwrap_or(0) as f64), 0),
            ratio(rps.median, plain),
        );
    }
    out.push('\n');
}

/// The 2xx answers of a window (at least 1, to divide by).
fn answered_2xx(r: &Run) -> f64 {
    r.load
        .statuses
        .iter()
        .filter(|(k, _)| (200..300).contains(*k))
        .map(|(_, v)| *v)
        .sum::<u64>()
        .max(1) as f64
}

fn aggregation_section(out: &mut String, runs: &[Run]) {
    let _ = writeln!(
        out,
        "## Aggregation: dependent calls and lists, upstreams at 50 ms, c=10\n"
    );
    let _ = writeln!(
        out,
        "Closed-loop clients at c=10; one `fanout` per route, alternating window by \
         window. A dependent call: C's URL reads A's answer (`{{inventory.warehouse}}`), \
         B reads nothing; each upstream answers in 50 ms, so C can start at 50 ms and \
         the answer come at 100 ms, where calling the three one after another takes \
         150. A list: an upstream answers 100 ids (50 ms), then their prices are \
         fetched from a batch-capable upstream (`batch = {{ param = \"ids\", max = 50 }}`: \
         two calls), or one call per id. *Calls* are the upstream calls per answer. \
         Medians (and ranges) over the repeats.\n"
    );
    let _ = writeln!(
        out,
        "| route | 2xx/s | p50 ms | p99 ms | calls per answer | CPU ms/req |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut labels: Vec<&str> = Vec::new();
    for run in runs {
        if !labels.contains(&run.scenario.as_str()) {
            labels.push(&run.scenario);
        }
    }
    for label in labels {
        let g: Vec<&Run> = runs.iter().filter(|r| r.scenario == label).collect();
        let s = |f: &dyn Fn(&Run) -> f64| stat(g.iter().map(|r| f(r)));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            label.trim_start_matches("aggregation: "),
            cell(s(&|r| r.load.goodput), 0),
            cell(s(&|r| r.load.p50_ms), 1),
            cell(s(&|r| r.load.p99_ms), 1),
            cell(
                s(&|r| r.upstream_calls.unwrap_or(0) as f64 / answered_2xx(r)),
                1
            ),
            cell(s(&|r| r.cpu_ms_per_request), 3),
        );
    }
    out.push('\n');
}

fn hot_keys_section(out: &mut String, runs: &[Run]) {
    let _ = writeln!(
        out,
        "## Hot keys: 90 % of requests on ten products, upstreams at 50 ms, c=500\n"
    );
    let _ = writeln!(
        out,
        "Closed-loop clients that re-send at once; 90 % of their requests ask for \
         one of ten products, the rest for one of a million. `fanout` makes every \
         call (the other rows' setting), then coalesces identical calls in flight \
         (the default for `http` upstreams), then also caches answers for 1 s \
         (`cache = {{ ttl_ms = 1000 }}`); a fresh process, so a cold cache, for each \
         window, the three alternating. Each product request needs three upstream \
         calls when nothing is shared. Medians (and ranges) over the repeats.\n"
    );
    let _ = writeln!(
        out,
        "| target | 2xx/s | 2xx p99 ms | upstream calls per request sent | per 2xx answer | 503s | CPU ms/req |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let targets = [Target::Fanout, Target::FanoutCoalesce, Target::FanoutCache];
    let mut goodput = Vec::new();
    let mut per_answer = Vec::new();
    for target in targets {
        let g: Vec<&Run> = runs.iter().filter(|r| r.target == target).collect();
        if g.is_empty() {
            continue;
        }
        let s = |f: &dyn Fn(&Run) -> f64| stat(g.iter().map(|r| f(r)));
        let calls = |r: &Run| r.upstream_calls.unwrap_or(0) as f64;
        let sent = |r: &Run| r.load.statuses.values().sum::<u64>().max(1) as f64;
        let g2xx = s(&|r| r.load.goodput);
        let per_ok = s(&|r| calls(r) / answered_2xx(r));
        goodput.push((target, g2xx.median));
        per_answer.push((target, per_ok.median));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            target.name(),
            cell(g2xx, 0),
            cell(stat(g.iter().filter_map(|r| r.load.ok_p99_ms)), 1),
            cell(s(&|r| calls(r) / sent(r)), 3),
            cell(per_ok, 3),
            g.iter()
                .map(|r| r.load.statuses.get(&503).copied().unwrap_or(0))
                .sum::<u64>(),
            cell(s(&|r| r.cpu_ms_per_request), 3),
        );
    }
    let of = |list: &[(Target, f64)], t: Target| {
        list.iter()
            .find(|(x, _)| *x == t)
            .map_or(f64::NAN, |(_, v)| *v)
    };
    let _ = writeln!(
        out,
        "\nCache on against every call made: {} the 2xx/s, {} the upstream calls per answer; \
         coalescing alone: {} the 2xx/s, {} the calls per answer.\n",
        ratio(
            of(&goodput, Target::FanoutCache),
            of(&goodput, Target::Fanout)
        ),
        ratio(
            of(&per_answer, Target::FanoutCache),
            of(&per_answer, Target::Fanout)
        ),
        ratio(
            of(&goodput, Target::FanoutCoalesce),
            of(&goodput, Target::Fanout)
        ),
        ratio(
            of(&per_answer, Target::FanoutCoalesce),
            of(&per_answer, Target::Fanout)
        ),
    );
}

fn open_loop_section(out: &mut String, capacity: f64, runs: &[Run]) {
    let _ = writeln!(
        out,
        "## Open loop: upstreams at 50 ms, a constant arrival rate\n"
    );
    let _ = writeln!(
        out,
        "Requests arrive at a fixed rate whatever the server does (as wrk2 or k6's \
         constant-arrival-rate send them), over a shared pool of keep-alive \
         connections; each latency counts from when the request was due, so a \
         slow server cannot hide its queue (no coordinated omission). The rates \
         are multiples of `fanout`'s own saturation rate measured in the same run: \
         {capacity:.0} rps. Goal at 2x: goodput at least 90 % of that, every non-2xx \
         a 503 answered in under 5 ms.\n"
    );
    let _ = writeln!(
        out,
        "| target | offered | 2xx/s | goodput / capacity | 2xx p99 | non-2xx (by code) | non-2xx p99 | not answered | peak in flight | CPU ms/request |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for run in runs {
        let l = &run.load;
        let offered = l.offered_rps.unwrap_or_default();
        let codes: Vec<String> = l
            .statuses
            .iter()
            .filter(|(code, _)| !(200..300).contains(*code))
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        let errors: u64 = l.errors.values().sum();
        let ms = |v: Option<f64>| {
            v.map(|v| format!("{v:.1} ms"))
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            out,
            "| {} | {:.0}/s ({:.0}x) | {:.0} | {:.0} % | {} | {} | {} | {} | {} | {:.3} |",
            run.target.name(),
            offered,
            offered / capacity,
            l.goodput,
            l.goodput / capacity * 100.0,
            ms(l.ok_p99_ms),
            if codes.is_empty() {
                "–".into()
            } else {
                codes.join(", ")
            },
            ms(l.non_2xx_p99_ms),
            errors,
            l.concurrency,
            run.cpu_ms_per_request
        );
    }
    out.push('\n');
}

fn soak_section(out: &mut String, s: &crate::Soak) {
    let l = &s.load;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let growth = |from: u64, to: u64| (to as f64 / from.max(1) as f64 - 1.0) * 100.0;
    let half = s.rss_per_10s.get(s.rss_per_10s.len() / 2).copied();
    let _ = writeln!(
        out,
        "## Soak: {:.0} s at c={}, faulty upstreams, clients that hang up\n",
        s.seconds, l.concurrency
    );
    let _ = writeln!(
        out,
        "`fanout` (defaults) with {} clients that re-send at once, against upstreams \
         at 50 ms of which 10 % of calls fail (5 % 503, 2 % not JSON, 2 % 5 s late, \
         1 % 300 ms late), while {} more clients hang up 20 ms into every request \
         ({} hang-ups in all). Goal: RSS growth under 5 % once the pool is warm \
         (the instances' memories are touched as the load ramps up, then RSS is \
         flat: see every 10 s), and no file descriptor left behind.\n",
        l.concurrency,
        crate::SOAK_QUITTERS,
        s.hangups
    );
    let _ = writeln!(out, "| measure | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| requests answered | {} ({:.0}/s) |",
        l.requests, l.rps
    );
    let _ = writeln!(out, "| 2xx per second | {:.0} |", l.goodput);
    let codes: Vec<String> = l
        .statuses
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect();
    let _ = writeln!(out, "| answers by status | {} |", codes.join(", "));
    if !l.errors.is_empty() {
        let errors: Vec<String> = l.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        let _ = writeln!(out, "| no answer | {} |", errors.join(", "));
    }
    let _ = writeln!(
        out,
        "| 2xx p99 / all p99 | {:.1} ms / {:.1} ms |",
        l.ok_p99_ms.unwrap_or(f64::NAN),
        l.p99_ms
    );
    let _ = writeln!(
        out,
        "| RSS at the start / end of the window | {:.1} MiB / {:.1} MiB ({:+.1} %) |",
        mib(s.rss_start_bytes),
        mib(s.rss_end_bytes),
        growth(s.rss_start_bytes, s.rss_end_bytes)
    );
    if let Some(half) = half {
        let _ = writeln!(
            out,
            "| RSS growth over the second half of the window | {:+.1} % |",
            growth(half, s.rss_end_bytes)
        );
    }
    if s.rss_after_bytes > 0 {
        let _ = writeln!(
            out,
            "| RSS once the clients were answered and gone | {:.1} MiB |",
            mib(s.rss_after_bytes)
        );
    }
    let per_10s: Vec<String> = s
        .rss_per_10s
        .iter()
        .map(|b| format!("{:.1}", mib(*b)))
        .collect();
    let _ = writeln!(out, "| RSS every 10 s (MiB) | {} |", per_10s.join(", "));
    let _ = writeln!(
        out,
        "| open file descriptors: before the load / under it / 62 s after it (idle upstream connections reaped) | {} / {} / {} |\n",
        s.fds_idle, s.fds_start, s.fds_end
    );
}

fn plot(path: &Path, runs: &[Run]) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_ms = runs.iter().map(|r| r.load.p99_ms).fold(100.0f64, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency against concurrency (50 ms upstreams): p50 solid, p99 dashed",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((3f64..800f64).log_scale(), (10f64..max_ms).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("requests in flight")
        .y_desc("latency (ms)")
        .draw()?;
    let colours = [
        RED,
        BLUE,
        GREEN,
        CYAN,
        MAGENTA,
        BLACK,
        RGBColor(230, 140, 0),
        RGBColor(120, 60, 200),
        RGBColor(110, 110, 110),
        RGBColor(0, 130, 120),
        RGBColor(200, 0, 120),
        RGBColor(150, 120, 40),
    ];
    for (target, colour) in Target::REPORTED.iter().zip(colours) {
        let points = |f: fn(&Run) -> f64| -> Vec<(f64, f64)> {
            levels(runs)
                .into_iter()
                .filter(|c| !group(runs, *target, *c).is_empty())
                .map(|c| (c as f64, median_of(runs, *target, c, f).max(10.0)))
                .collect()
        };
        let p50 = points(|r| r.load.p50_ms);
        if p50.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(p50.clone(), colour.stroke_width(2)))?
            .label(target.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart.draw_series(p50.iter().map(|p| Circle::new(*p, 3, colour.filled())))?;
        chart.draw_series(DashedLineSeries::new(
            points(|r| r.load.p99_ms),
            6,
            4,
            colour.stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The overload windows whose clients treat a 503 as `backoff` says.
fn with_backoff(runs: &[Run], backoff: Backoff) -> Vec<Run> {
    runs.iter()
        .filter(|x| x.load.backoff == backoff)
        .cloned()
        .collect()
}

/// `target`'s open-loop windows at twice `capacity`, the saturation rate
/// the open loop's rates are multiples of.
fn open_loop_at_2x(runs: &[Run], capacity: f64, target: Target) -> Vec<&Run> {
    runs.iter()
        .filter(|x| {
            x.target == target
                && x.load
                    .offered_rps
                    .is_some_and(|o| (o / capacity).round() == 2.0)
        })
        .collect()
}

/// What bounds the goals that are hard to meet on this kind of machine,
/// from the run's own figures: what a change would have to move.
fn bounds_section(out: &mut String, r: &Results, sat_c: usize) {
    let (lat, sat) = (&r.latency, &r.saturation);
    let cpu = |runs: &[Run], t, c| median_of(runs, t, c, |x| x.cpu_ms_per_request);
    let hostile = with_backoff(&r.overload, Backoff::None);
    let mut lines = Vec::new();
    let (fanout_cpu, native_cpu) = (
        cpu(sat, Target::Fanout, sat_c),
        cpu(sat, Target::Native, sat_c),
    );
    if fanout_cpu > 0.0 && native_cpu > 0.0 {
        lines.push(format!(
            "- **`fanout` / `native` at saturation**: CPU per request, {fanout_cpu:.3} against \
             {native_cpu:.3} ms ({:.2}×; the rates' ratio is higher because the load driver \
             and the upstream simulator, on the same two cores, take more of them the \
             faster the target answers). The difference is the guest and the `wasi:http` \
             glue between it and the host (each upstream call is about thirty host calls), \
             spread thin: no host function stood above a few per cent of a profile \
             (`bench/profile/README.md`).",
            native_cpu / fanout_cpu
        ));
    }
    let sat_good = median_of(sat, Target::Fanout, sat_c, |x| x.load.goodput);
    if let Some((best, capacity, capacity_cpu)) = fanout_capacity(&hostile) {
        let sat_cpu = cpu(sat, Target::Fanout, sat_c);
        let share =
            |c| 100.0 * fanout_overload(&hostile, c, &|x| x.load.goodput).median / capacity.median;
        lines.push(format!(
            "- **Goodput at c=500 and c=5000 against saturation**: the saturation rate has \
             0 ms upstreams. With the overload rows' 50 ms upstreams, the most `fanout` \
             answers is {:.0} 2xx/s (c={best}), {:.0} % of saturation, at {:.3} ms of CPU a \
             request against {sat_cpu:.3}: a request that waits costs more (its answers \
             come one by one, each a round of polling), and that is the ceiling of both \
             ratios. Against it the c=500 and c=5000 rows get {:.0} % and {:.0} %.",
            capacity.median,
            100.0 * capacity.median / sat_good,
            capacity_cpu.median,
            share(500),
            share(5000),
        ));
        if let Some(open) = r.open_loop_capacity {
            let at_2x = |t| {
                stat(
                    open_loop_at_2x(&r.open_loop, open, t)
                        .iter()
                        .map(|x| x.load.goodput),
                )
                .median
            };
            let (fanout_2x, native_2x) = (at_2x(Target::Fanout), at_2x(Target::Native));
            if !fanout_2x.is_nan() {
                lines.push(format!(
                    "- **Open loop at 2×**: the same ceiling, and the load driver sending \
                     {:.0} requests a second on the same two cores: `fanout` answers \
                     {fanout_2x:.0} 2xx/s, {:.0} % of that capacity; `native`, \
                     beside the same driver, {native_2x:.0}.",
                    2.0 * open,
                    100.0 * fanout_2x / capacity.median,
                ));
            }
        }
    }
    let p50_gap = median_of(lat, Target::Fanout, 5, |x| x.load.p50_ms)
        - median_of(lat, Target::Native, 5, |x| x.load.p50_ms);
    if let (false, Some(micro)) = (p50_gap.is_nan(), &r.micro) {
        lines.push(format!(
            "- **p99 at c=5 against `native`**: the gap is there at the median too \
             ({p50_gap:.1} ms at p50). A request's own work, {:.0} µs in one process \
             with upstreams answering at once, runs before and after the upstreams' \
             wait, handed from the connection thread to a guest thread and back, each \
             hand-over a wake-up of a sleeping thread.",
            micro.in_process_request_us
        ));
        lines.push(format!(
            "- **Instantiation of a fresh instance**: only `--instance-reuse 1` pays it \
             on every request; reused, as by default, it is {:.2} µs of a request.",
            micro.instantiation_per_request_reused_us
        ));
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "**What bounds the hard goals**, in this run's figures:\n"
    );
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    out.push('\n');
}

/// A `fanout` overload row's value over its repeats: clients that re-send
/// at once, `c` of them.
fn fanout_overload(runs: &[Run], c: usize, f: &dyn Fn(&Run) -> f64) -> Stat {
    stat(
        runs.iter()
            .filter(|x| {
                x.target == Target::Fanout
                    && x.load.concurrency == c
                    && x.load.backoff == Backoff::None
            })
            .map(f),
    )
}

/// `fanout`'s capacity with the overload scenario's 50 ms upstreams: the
/// level of [`CAPACITY_CLIENTS`] that got the most 2xx, its 2xx a second
/// and its CPU per request.
fn fanout_capacity(runs: &[Run]) -> Option<(usize, Stat, Stat)> {
    // A results file from before some of the levels has fewer (NaN
    // medians lose every comparison).
    let goodput = |c| fanout_overload(runs, c, &|r| r.load.goodput).median;
    let best = CAPACITY_CLIENTS
        .into_iter()
        .filter(|&c| goodput(c) > 0.0)
        .max_by(|&a, &b| goodput(a).total_cmp(&goodput(b)))?;
    Some((
        best,
        fanout_overload(runs, best, &|r| r.load.goodput),
        fanout_overload(runs, best, &|r| r.cpu_ms_per_request),
    ))
}

/// What `fanout` serves with 50 ms upstreams when the load just fits
/// (the most of [`CAPACITY_CLIENTS`]), beside its saturation rate (0 ms upstreams) and
/// the c=500 and c=5000 rows: how much of the gap to saturation is
/// admission's and how much the waiting requests' own cost.
fn capacity_paragraph(out: &mut String, runs: &[Run], saturation: f64, saturation_cpu: f64) {
    let Some((best, capacity, cpu)) = fanout_capacity(runs) else {
        return;
    };
    if saturation.is_nan() || saturation <= 0.0 {
        return;
    }
    let share =
        |c: usize| 100.0 * fanout_overload(runs, c, &|r| r.load.goodput).median / capacity.median;
    let tried = CAPACITY_CLIENTS.map(|c| c.to_string()).join(", ");
    let _ = writeln!(
        out,
        "\nWith these upstreams `fanout` serves at most {} 2xx/s, at \
         c={best} (of c={tried}: enough clients to keep the cores busy, few \
         enough that little is shed), {:.0} % of its saturation rate with 0 ms upstreams, at {} ms \
         of CPU a request against {saturation_cpu:.3} at saturation (why a \
         request that waits can cost more: `bench/profile/README.md`). \
         Against that capacity, the c=500 and c=5000 rows that re-send at \
         once get {:.0} % and {:.0} %.",
        cell(capacity, 0),
        100.0 * capacity.median / saturation,
        cell(cpu, 3),
        share(500),
        share(5000),
    );
}

/// The overload table: each (target, c, backoff) window's median.
fn overload_section(out: &mut String, runs: &[Run], saturation: f64, saturation_cpu: f64) {
    // What one shed costs: `fanout-shed-all` sheds nearly every request at
    // once. CPU milliseconds.
    let shed_cost = stat(
        runs.iter()
            .filter(|x| x.target == Target::FanoutShedAll)
            .map(|x| x.cpu_ms_per_request),
    );
    let _ = writeln!(
        out,
        "## Overload: upstreams at 50 ms, far more clients than capacity\n"
    );
    let _ = writeln!(
        out,
        "Closed-loop clients; *honour* means a client that gets a 503 with \
         `Retry-After: 1` waits that second before its next request, as a \
         well-behaved client does; *ignore* means it sends the next request at once. \
         Goodput is against `fanout`'s own saturation rps ({saturation:.0}). \
         *CPU on sheds* is the share of the target's CPU its 503s took, at \
         what one costs (below).\n"
    );
    let _ = writeln!(
        out,
        "| target | c | Retry-After | rps | 2xx/s | goodput / saturation | 2xx p99 ms | non-2xx p99 ms | 503s | other non-2xx | no answer | backoffs | CPU ms/req | CPU on sheds |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut keys: Vec<(Target, usize, Backoff)> = Vec::new();
    for x in runs.iter().filter(|x| x.target != Target::FanoutShedAll) {
        let key = (x.target, x.load.concurrency, x.load.backoff);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (target, c, backoff) in keys {
        let g: Vec<&Run> = runs
            .iter()
            .filter(|x| x.target == target && x.load.concurrency == c && x.load.backoff == backoff)
            .collect();
        let s = |f: &dyn Fn(&Run) -> f64| stat(g.iter().map(|r| f(r)));
        let opt = |f: &dyn Fn(&Run) -> Option<f64>| stat(g.iter().filter_map(|r| f(r)));
        let count = |f: &dyn Fn(&Run) -> u64| g.iter().map(|r| f(r)).sum::<u64>();
        let goodput = s(&|r| r.load.goodput);
        // 503s a second times their cost, over the CPU the target used.
        let on_sheds = s(&|r| {
            let sheds = r.load.statuses.get(&503).copied().unwrap_or(0) as f64;
            let cpu_ms = r.cpu_ms_per_request * r.load.rps * r.load.seconds;
            if cpu_ms > 0.0 {
                100.0 * sheds * shed_cost.median / cpu_ms
            } else {
                0.0
            }
        });
        let _ = writeln!(
            out,
            "| {} | {c} | {} | {} | {} | {:.0}% | {} | {} | {} | {} | {} | {} | {} | {} |",
            target.name(),
            match backoff {
                Backoff::RetryAfter => "honour",
                Backoff::None => "ignore",
            },
            cell(s(&|r| r.load.rps), 0),
            cell(goodput, 0),
            100.0 * goodput.median / saturation,
            cell(opt(&|r| r.load.ok_p99_ms), 1),
            cell(opt(&|r| r.load.non_2xx_p99_ms), 1),
            count(&|r| r.load.statuses.get(&503).copied().unwrap_or(0)),
            count(&|r| {
                r.load
                    .statuses
                    .iter()
                    .filter(|(k, _)| !(200..300).contains(*k) && **k != 503)
                    .map(|(_, v)| v)
                    .sum()
            }),
            count(&|r| r.load.errors.values().sum()),
            count(&|r| r.load.backoffs),
            cell(s(&|r| r.cpu_ms_per_request), 3),
            if shed_cost.median > 0.0 {
                format!("{:.0}%", on_sheds.median)
            } else {
                "n/a".into()
            },
        );
    }
    if shed_cost.median > 0.0 {
        let _ = writeln!(
            out,
            "\nOne shed costs {:.1} µs of CPU: `fanout-shed-all` (one instance, no line, \
             no pacing) at c=64, where nearly every request is a 503 answered at once.",
            shed_cost.median * 1e3
        );
    }
    capacity_paragraph(out, runs, saturation, saturation_cpu);
    let _ = writeln!(
        out,
        "\nAn *ignore* client's 503s, once the sheds its host's answers earned \
         are spent, are held on its connection (from the host's first probe on, \
         about a second into the load, whatever is left of those: it has seen \
         the clients re-send at once): a second after its last, longer \
         when many are held against few answers (held clients come back, all \
         together, no faster than the host answers; 5 s at most). The *ignore* \
         rows' non-2xx p99 is that hold."
    );
    out.push('\n');
}
