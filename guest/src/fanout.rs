//! The orchestration: call every upstream of every requested item, within
//! the request's budget, at most `max_in_flight` at once, retrying what is
//! worth retrying, and merge.
//!
//! It is written against [`Env`] (clock, sleep, randomness, one attempt), so
//! the same code runs in the component on WASI and in unit tests on a fake
//! clock with a scripted transport.

use crate::config::{Config, Mode, Route, RouteUpstream};
use crate::errors::UpstreamFailure;
use crate::merge::{self, Item};
use crate::template::Params;
use crate::trace::TraceContext;
use futures_util::stream::{FuturesUnordered, StreamExt};
use graph::Graph;
use serde_json::Value;
use std::future::Future;
use std::time::Duration;

/// A retry starts only if at least this much of the budget is left after its
/// backoff: an attempt with less could not finish, and would only add load to
/// an upstream that is already failing.
pub const MIN_RETRY_BUDGET: Duration = Duration::from_millis(10);

/// One attempt at one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt<'a> {
    /// The upstream's logical name.
    pub upstream: &'a str,
    /// The URL to call.
    pub url: String,
    /// 1 for the first attempt.
    pub number: u32,
    /// The attempt gives up after this long (and reports a timeout).
    pub timeout: Duration,
    /// W3C `traceparent` to send: the request's trace, a span of its own.
    pub traceparent: String,
    /// The header to tell the upstream `timeout` in, if any.
    pub budget_header: Option<&'a str>,
    /// The client's headers to copy onto the call, by name.
    pub forward: &'a [String],
}

/// What the orchestration needs from its surroundings.
pub trait Env {
    /// Time since an arbitrary origin; monotonic.
    fn now(&self) -> Duration;
    /// Waits `duration`.
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()>;
    /// 64 random bits, for backoff jitter.
    fn random(&self) -> u64;
    /// Performs one attempt, bounded by `attempt.timeout`. Dropping the
    /// future must cancel the request.
    fn attempt(&self, attempt: Attempt<'_>)
    -> impl Future<Output = Result<Value, UpstreamFailure>>;
}

/// The time a request may take, as an absolute deadline on [`Env::now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    deadline: Duration,
}

impl Budget {
    /// A budget of `budget` from `now`.
    pub fn starting_at(now: Duration, budget: Duration) -> Budget {
        Budget {
            deadline: now + budget,
        }
    }

    /// What is left of the budget at `now`.
    pub fn remaining(&self, now: Duration) -> Duration {
        self.deadline.saturating_sub(now)
    }

    /// An attempt waits for the smaller of the upstream's own timeout and
    /// what is left of the budget.
    pub fn attempt_timeout(&self, now: Duration, upstream_timeout: Duration) -> Duration {
        upstream_timeout.min(self.remaining(now))
    }
}

/// Calls one upstream at `url`, retrying per its policy, within `budget`.
/// The first attempt is timed from `now`, the clock as the caller just
/// read it: each read is a host call.
pub async fn call<E: Env>(
    env: &E,
    upstream: &RouteUpstream,
    url: String,
    budget: Budget,
    trace: &TraceContext,
    budget_header: Option<&str>,
    now: Duration,
) -> Result<Value, UpstreamFailure> {
    let mut number = 1;
    let mut previous: Option<UpstreamFailure> = None;
    let mut now = now;
    loop {
        let timeout = budget.attempt_timeout(now, upstream.timeout);
        if timeout.is_zero() {
            return Err(UpstreamFailure::Timeout);
        }
        let failure = match env
            .attempt(Attempt {
                upstream: &upstream.name,
                url: url.clone(),
                number,
                timeout,
                traceparent: trace.child_header(env.random()),
                budget_header,
                forward: &upstream.forward_headers,
            })
            .await
        {
            Ok(value) => return Ok(value),
            // A retry the host refused (its retry budget is spent) says
            // nothing new: report what made us retry.
            Err(UpstreamFailure::Shed(_)) if previous.is_some() => {
                return Err(previous.unwrap_or(UpstreamFailure::Timeout));
            }
            Err(failure) => failure,
        };
        if number >= upstream.retry.max_attempts || !failure.is_retryable() {
            return Err(failure);
        }
        let mut backoff = upstream.retry.backoff(number, env.random());
        // Never sooner than the upstream asked.
        if let UpstreamFailure::Throttled { retry_after, .. } = &failure {
            backoff = backoff.max(*retry_after);
        }
        if budget.remaining(env.now()) < backoff.saturating_add(MIN_RETRY_BUDGET) {
            return Err(failure);
        }
        env.sleep(backoff).await;
        now = env.now();
        number += 1;
        previous = Some(failure);
    }
}

/// The result of one fan-out: the merged items, in the order asked for,
/// and how long each upstream took (first call started to last call ended),
/// in route order.
#[derive(Debug)]
pub struct Gathered {
    /// The merged items, in the order asked for.
    pub items: Vec<Item>,
    /// Each upstream's time, for `Server-Timing`.
    pub timings: Vec<(String, Duration)>,
    /// How many distinct calls were made.
    pub calls: usize,
}

/// Fans out for every item of `items` on `route` and merges each. The
/// answer keeps their order. Each upstream of an item is called as soon as
/// the answers it reads are in; identical calls are made once; at most
/// `config.max_in_flight` calls run at once across the whole request, in
/// the order they became possible (one at a time, in that order, in
/// `sequential` mode).
pub async fn fan_out<E: Env>(
    env: &E,
    config: &Config,
    route: &Route,
    items: &[Params],
    budget: Budget,
    trace: &TraceContext,
) -> Gathered {
    let cap = match config.mode {
        Mode::Concurrent => config.max_in_flight,
        Mode::Sequential => 1,
    };
    let start = |id: usize, node: usize, url: String| {
        let upstream = &route.upstreams[node];
        async move {
            let started = env.now();
            let header = config.budget_header.as_deref();
            let result = call(env, upstream, url, budget, trace, header, started).await;
            (id, node, started, env.now(), result)
        }
    };
    let mut graph = Graph::new(route, items);
    let mut running = FuturesUnordered::new();
    let mut spans: Vec<Option<(Duration, Duration)>> = vec![None; route.upstreams.len()];
    loop {
        while running.len() < cap {
            let Some((id, call)) = graph.next_call() else {
                break;
            };
            running.push(start(id, call.node, call.url.clone()));
        }
        let Some((id, node, started, ended, result)) = running.next().await else {
            break;
        };
        let span = spans[node].get_or_insert((started, ended));
        span.0 = span.0.min(started);
        span.1 = span.1.max(ended);
        graph.deliver(id, result);
    }
    let timings = route
        .upstreams
        .iter()
        .zip(spans)
        .filter_map(|(u, span)| span.map(|(a, b)| (u.name.clone(), b.saturating_sub(a))))
        .collect();
    let items = items
        .iter()
        .enumerate()
        .map(|(i, params)| merge::merge(&params.path, graph.outcomes(i)))
        .collect();
    Gathered {
        items,
        timings,
        calls: graph.calls_made(),
    }
}

/// The `Server-Timing` header: one entry per upstream, then the total, in
/// milliseconds, so a browser's dev tools show the fan-out.
pub fn server_timing(timings: &[(String, Duration)], total: Duration) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(32 * (timings.len() + 1));
    let entries = timings
        .iter()
        .map(|(name, d)| (name.as_str(), d))
        .chain(std::iter::once(("total", &total)));
    for (i, (name, d)) in entries.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        // Milliseconds to a tenth, in integers: float formatting costs the
        // guest several times more fuel, on every request.
        let tenths = (d.as_micros() + 50) / 100;
        let _ = write!(out, "{name};dur={}.{}", tenths / 10, tenths % 10);
    }
    out
}

#[cfg(test)]
mod fake;
mod graph;
#[cfg(test)]
mod tests;
