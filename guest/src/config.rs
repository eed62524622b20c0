//! The guest's configuration: routes and their upstreams described as data,
//! read from the environment.
//!
//! Environment variables are the one channel that every host sets the same
//! way: the fanout host, `wasmtime serve --env` and Spin's component
//! `environment`.
//!
//! | variable | meaning |
//! |---|---|
//! | `FANOUT_CONFIG` | optional JSON, see [`RawConfig`]; the built-in default reproduces the product example |
//! | `FANOUT_UPSTREAM_<NAME>` | base URL of upstream `<name>` (upper-cased), substituted for `{base}` |
//! | `FANOUT_DEADLINE_MS` | optional: overrides `deadline_ms` |

use crate::protocol::{ENV_CONFIG, ENV_DEADLINE_MS, ENV_UPSTREAM_PREFIX};
use crate::retry::RetryPolicy;
use crate::shape::{JsonPath, Shape};
use crate::template::{Params, PathTemplate, UrlTemplate};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Budget for a whole request unless configured otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(200);
/// The largest budget a client may ask for with `x-request-timeout-ms`
/// unless configured otherwise.
pub const DEFAULT_MAX_DEADLINE: Duration = Duration::from_millis(1000);
/// Largest budget the configuration itself may set: beyond, the host's own
/// wall-clock limit would cut requests first.
pub const MAX_DEADLINE: Duration = Duration::from_secs(60);
/// Upstream calls in flight at once for one incoming request.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Per-attempt timeout of an upstream unless configured otherwise.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(150);
/// Most ids one batch request may ask for.
pub const MAX_BATCH_IDS: usize = 100;
/// Elements of a list an upstream is called for (`each`), unless its
/// `max_items` says otherwise.
pub const DEFAULT_MAX_ITEMS: usize = 100;
/// The most `max_items` may be.
pub const MAX_ITEMS: usize = 1000;
/// Upstream calls one request may make in all (after de-duplication):
/// with about 36k fuel a call, the host's default fuel holds this many.
pub const MAX_CALLS: usize = 1000;
/// Ids one call of a batch-capable upstream carries, unless its `batch.max`
/// says otherwise.
pub const DEFAULT_BATCH_MAX: usize = 50;
/// The largest answer unless a route's `max_body_kib` says otherwise.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

/// How the upstreams of one item are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// All at once: an item costs its slowest upstream.
    #[default]
    Concurrent,
    /// One after another: an item costs the sum. The blocking anti-pattern,
    /// kept for the benchmarks' comparison.
    Sequential,
}

/// `FANOUT_CONFIG` as written. Every field has a default.
///
/// ```json
/// {
///   "deadline_ms": 200, "max_deadline_ms": 1000, "max_in_flight": 16, "mode": "concurrent",
///   "routes": [{
///     "path": "/products/{id}",
///     "upstreams": [
///       {"name": "inventory", "url": "{base}/inventory/{id}", "field": "inventory",
///        "required": true, "timeout_ms": 150,
///        "retry": {"max_attempts": 3, "initial_backoff_ms": 10, "max_backoff_ms": 50}}
///     ]
///   }]
/// }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The default budget of a request, in milliseconds (200).
    pub deadline_ms: Option<u64>,
    /// The largest budget a client may ask for, in milliseconds (1000).
    pub max_deadline_ms: Option<u64>,
    /// Upstream calls in flight at once for one request (16).
    pub max_in_flight: Option<usize>,
    /// How an item's upstreams are called (`concurrent`).
    pub mode: Option<Mode>,
    /// The routes; the product example by default.
    pub routes: Option<Vec<RawRoute>>,
    /// The header that tells each upstream attempt how long it has, in
    /// milliseconds (`x-request-timeout-ms`, which fanout itself reads, so
    /// that the budget shrinks along a chain of aggregators); `""` sends
    /// none.
    pub budget_header: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// One route as written.
pub struct RawRoute {
    /// A path template, `/products/{id}` or `/users/{user}/orders/{order}`:
    /// literal segments and whole-segment variables. One ending in a
    /// variable also answers its batch form, `/products?ids=a,b`.
    pub path: String,
    /// The upstreams each item of the route calls.
    pub upstreams: Vec<RawUpstream>,
    /// The largest answer, in KiB (4096); beyond, a 502 `answer_too_large`.
    pub max_body_kib: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
/// One upstream of a route as written.
pub struct RawUpstream {
    /// Its logical name: `FANOUT_UPSTREAM_<NAME>` gives its base URL.
    pub name: String,
    /// URL template: `{base}` (the upstream's base URL) first, then the
    /// route's path variables (`{id}`) and the client's query parameters
    /// (`{query.currency}`, or with a default `{query.currency:EUR}`), each
    /// percent-encoded where it lands.
    pub url: String,
    /// Field of the answer it fills; defaults to `name`. `"."` merges its
    /// (object) answer into the item itself.
    pub field: Option<String>,
    /// A required upstream's failure fails the item; an optional one's
    /// leaves its field null and names it in `degraded`. Default: true.
    pub required: Option<bool>,
    /// Per-attempt timeout in milliseconds (150).
    pub timeout_ms: Option<u64>,
    /// How failed attempts are retried.
    pub retry: Option<RetryPolicy>,
    /// Client request headers copied to this upstream's calls, and no
    /// others (`["accept-language", "authorization"]`).
    pub forward_headers: Option<Vec<String>>,
    /// Call it once per element of a list in another upstream's answer
    /// (`"order.lines[].sku"`); `{each}` in `url` is the element's value
    /// (or `{each.sku}` with `"order.lines[]"`). Its field is then a list
    /// in the same order.
    pub each: Option<String>,
    /// The most elements `each` may have (100); more fail the upstream.
    pub max_items: Option<usize>,
    /// It answers many ids in one call: see [`RawBatch`].
    pub batch: Option<RawBatch>,
    /// Keep only these paths of its answer (`["price.amount", "lines[].sku"]`).
    pub select: Option<Vec<String>>,
    /// Then move values: `{"price.amount": "amount"}`.
    pub rename: Option<BTreeMap<String, String>>,
}

/// A batch-capable upstream: instead of one call per element of `each`,
/// one call per `max` distinct values, `?<param>=a,b,c` appended to its
/// URL. Its answer is a list of objects, each naming its id at `key`, or
/// an object keyed by id; an id it leaves out is that element's 404.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    /// The query parameter carrying the ids.
    pub param: String,
    /// Ids per call (50).
    pub max: Option<usize>,
    /// Where each object of a list answer has its id (`id`).
    pub key: Option<String>,
}

/// A validated [`RawBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The query parameter carrying the ids.
    pub param: String,
    /// Ids per call.
    pub max: usize,
    /// Where each object of a list answer has its id.
    pub key: JsonPath,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Its path template.
    pub path: PathTemplate,
    /// The upstreams each item calls, in configuration order.
    pub upstreams: Vec<RouteUpstream>,
    /// The query parameters its upstreams use, each once; `true` if one of
    /// them has no default (so a request without it is a 400).
    pub query: Vec<(String, bool)>,
    /// The largest answer, in bytes.
    pub max_body: usize,
}

/// A validated upstream of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUpstream {
    /// Its logical name: `FANOUT_UPSTREAM_<NAME>` gives its base URL.
    pub name: String,
    /// The answer's field it fills.
    pub field: String,
    /// Whether its failure fails the item (else the item degrades).
    pub required: bool,
    /// Per-attempt timeout, cut to the remaining budget.
    pub timeout: Duration,
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// Client request headers copied to its calls (lower-case names).
    pub forward_headers: Vec<String>,
    /// The URL template, `{base}` already substituted.
    pub url: UrlTemplate,
    /// The upstreams of the route whose answers it needs first, by index.
    pub depends_on: Vec<usize>,
    /// The list it is called for, once per element: upstream index and the
    /// path in its answer.
    pub each: Option<(usize, JsonPath)>,
    /// The most elements `each` may have.
    pub max_items: usize,
    /// How it takes many ids in one call, if it does.
    pub batch: Option<Batch>,
    /// How its answer is reshaped before it is merged.
    pub shape: Shape,
}

impl RouteUpstream {
    /// The URL to call for an item's `params` (already checked).
    pub fn url(&self, params: &Params) -> String {
        self.url.render(params)
    }
}

/// Everything the guest needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The default budget of a request.
    pub deadline: Duration,
    /// The largest budget a client may ask for.
    pub max_deadline: Duration,
    /// Upstream calls in flight at once for one request.
    pub max_in_flight: usize,
    /// How an item's upstreams are called.
    pub mode: Mode,
    /// The routes, in configuration order; no two answer the same paths.
    pub routes: Vec<Route>,
    /// The header carrying each attempt's budget to the upstream, if any.
    pub budget_header: Option<String>,
}

/// A configuration the guest cannot work with: it names the key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key at fault (`FANOUT_CONFIG.routes[0].path`).
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn error(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The built-in route: the product example. Inventory and pricing are
/// required, reviews are optional.
pub fn default_routes() -> Vec<RawRoute> {
    let upstream = |name: &str, path: &str, field: &str, required: bool| RawUpstream {
        name: name.into(),
        url: format!("{{base}}/{path}/{{id}}"),
        field: Some(field.into()),
        required: Some(required),
        ..RawUpstream::default()
    };
    vec![RawRoute {
        path: "/products/{id}".into(),
        upstreams: vec![
            upstream("inventory", "inventory", "inventory", true),
            upstream("pricing", "pricing", "price", true),
            upstream("reviews", "reviews", "reviews", false),
        ],
        max_body_kib: None,
    }]
}

impl Config {
    /// Reads and validates the configuration through `lookup` (the
    /// environment in the component; a map in tests; the host's own
    /// settings when it validates them before listening).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw = match lookup(ENV_CONFIG) {
            None => RawConfig::default(),
            Some(json) => serde_json::from_str::<RawConfig>(&json)
                .map_err(|e| error(ENV_CONFIG, format!("invalid JSON: {e}")))?,
        };
        let deadline_env = lookup(ENV_DEADLINE_MS);
        let from_env = deadline_env.is_some();
        let deadline_ms = match deadline_env {
            Some(ms) => Some(ms.trim().parse::<u64>().map_err(|_| {
                error(
                    ENV_DEADLINE_MS,
                    format!("`{ms}` is not a whole number of milliseconds"),
                )
            })?),
            None => raw.deadline_ms,
        };
        let key_deadline = || match from_env {
            true => ENV_DEADLINE_MS.to_string(),
            false => format!("{ENV_CONFIG}.deadline_ms"),
        };
        let deadline = duration(deadline_ms, DEFAULT_DEADLINE, key_deadline, MAX_DEADLINE)?;
        let max_deadline = duration(
            raw.max_deadline_ms,
            DEFAULT_MAX_DEADLINE.max(deadline),
            || format!("{ENV_CONFIG}.max_deadline_ms"),
            MAX_DEADLINE,
        )?;
        if max_deadline < deadline {
            return Err(error(
                format!("{ENV_CONFIG}.max_deadline_ms"),
                format!(
                    "{} ms is below deadline_ms ({} ms)",
                    max_deadline.as_millis(),
                    deadline.as_millis()
                ),
            ));
        }
        let max_in_flight = raw.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if !(1..=1024).contains(&max_in_flight) {
            return Err(error(
                format!("{ENV_CONFIG}.max_in_flight"),
                format!("{max_in_flight} is outside 1..=1024"),
            ));
        }
        let budget_header = match raw.budget_header.as_deref() {
            None => Some(crate::protocol::TIMEOUT_HEADER.to_string()),
            Some("") => None,
            Some(name) => {
                let valid = name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                let reserved = [
                    "host",
                    "traceparent",
                    "tracestate",
                    "accept",
                    "content-length",
                ]
                .contains(&name)
                    || name.starts_with(crate::protocol::HINT_PREFIX);
                if !valid || reserved {
                    return Err(error(
                        format!("{ENV_CONFIG}.budget_header"),
                        format!("`{name}` is not a lower-case header name of its own"),
                    ));
                }
                Some(name.to_string())
            }
        };
        let routes = raw
            .routes
            .unwrap_or_else(default_routes)
            .into_iter()
            .enumerate()
            .map(|(i, route)| validate_route(i, route, &lookup))
            .collect::<Result<Vec<_>, _>>()?;
        if routes.is_empty() {
            return Err(error(format!("{ENV_CONFIG}.routes"), "no routes"));
        }
        for (i, route) in routes.iter().enumerate() {
            for (j, earlier) in routes[..i].iter().enumerate() {
                let theirs = earlier.path.shapes();
                if route.path.shapes().iter().any(|s| theirs.contains(s)) {
                    return Err(error(
                        format!("{ENV_CONFIG}.routes[{i}].path"),
                        format!(
                            "`{}` answers the same paths as `{}` (routes[{j}])",
                            route.path.as_str(),
                            earlier.path.as_str()
                        ),
                    ));
                }
            }
        }
        Ok(Config {
            deadline,
            max_deadline,
            max_in_flight,
            mode: raw.mode.unwrap_or_default(),
            routes,
            budget_header,
        })
    }

    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|key| std::env::var(key).ok())
    }

    /// The route of path template `path` (`/products/{id}`).
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.path.as_str() == path)
    }

    /// Names of every upstream the routes use, each once.
    pub fn upstream_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for upstream in self.routes.iter().flat_map(|r| &r.upstreams) {
            if !names.contains(&upstream.name.as_str()) {
                names.push(&upstream.name);
            }
        }
        names
    }
}

/// `key` names the setting in an error. It and the other error keys here
/// are built only on error: the guest reads its configuration on every
/// request, and formatting them up front was a fifth of that cost in fuel.
fn duration(
    ms: Option<u64>,
    default: Duration,
    key: impl FnOnce() -> String,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let Some(ms) = ms else { return Ok(default) };
    let d = Duration::from_millis(ms);
    if ms == 0 || d > max {
        return Err(error(
            key(),
            format!("{ms} ms is outside 1..={} ms", max.as_millis()),
        ));
    }
    Ok(d)
}

mod route;
#[cfg(test)]
mod tests;

pub use route::MAX_FORWARDED;
use route::validate_route;
