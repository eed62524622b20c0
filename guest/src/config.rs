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
/// with about 45k fuel a call, the host's default fuel holds this many.
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
    /// Whether its answer is merged into the item itself (`field = "."`).
    pub fn merges_into_item(&self) -> bool {
        self.field == "."
    }
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

fn validate_route(
    index: usize,
    raw: RawRoute,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Route, ConfigError> {
    let route_key = || format!("{ENV_CONFIG}.routes[{index}]");
    let path = PathTemplate::parse(&raw.path)
        .map_err(|why| error(format!("{}.path", route_key()), why))?;
    let vars: Vec<&str> = path.vars().collect();
    if raw.upstreams.is_empty() {
        return Err(error(
            format!("{}.upstreams", route_key()),
            "a route needs at least one upstream",
        ));
    }
    let names: Vec<String> = raw.upstreams.iter().map(|u| u.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut upstreams: Vec<RouteUpstream> = Vec::new();
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        let key = || format!("{}.upstreams[{i}]", route_key());
        if u.name.is_empty()
            || !u
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(error(
                format!("{}.name", key()),
                format!("`{}`: names are made of A-Z, a-z, 0-9 and '_'", u.name),
            ));
        }
        if ["each", "query", "base"].contains(&u.name.as_str()) {
            return Err(error(
                format!("{}.name", key()),
                format!("`{}` is reserved in URL templates", u.name),
            ));
        }
        let field = u.field.unwrap_or_else(|| u.name.clone());
        if ["degraded", "error"].contains(&field.as_str()) || vars.contains(&field.as_str()) {
            return Err(error(
                format!("{}.field", key()),
                format!("`{field}` is reserved (degraded, error and the path's variables)"),
            ));
        }
        if field != "." && upstreams.iter().any(|other| other.field == field) {
            return Err(error(
                format!("{}.field", key()),
                format!("`{field}` is filled twice"),
            ));
        }
        let env = format!("{ENV_UPSTREAM_PREFIX}{}", u.name.to_ascii_uppercase());
        let base = match lookup(&env) {
            Some(raw) => Some(parse_base_url(&raw).map_err(|reason| error(&env, reason))?),
            None if u.url.contains("{base}") => {
                return Err(error(
                    &env,
                    format!("not set: the base URL of upstream `{}`", u.name),
                ));
            }
            None => None,
        };
        let url = UrlTemplate::parse(&u.url, base.as_deref(), &vars, &names)
            .map_err(|why| error(format!("{}.url", key()), why))?;
        let timeout = duration(
            u.timeout_ms,
            DEFAULT_ATTEMPT_TIMEOUT,
            || format!("{}.timeout_ms", key()),
            MAX_DEADLINE,
        )?;
        let retry = u.retry.unwrap_or_default();
        retry
            .validate()
            .map_err(|reason| error(format!("{}.retry", key()), reason))?;
        let forward_headers = u.forward_headers.unwrap_or_default();
        if forward_headers.len() > MAX_FORWARDED {
            return Err(error(
                format!("{}.forward_headers", key()),
                format!("at most {MAX_FORWARDED} names"),
            ));
        }
        for (j, name) in forward_headers.iter().enumerate() {
            forwardable(name)
                .map_err(|reason| error(format!("{}.forward_headers[{j}]", key()), reason))?;
        }
        let each = match &u.each {
            None => None,
            Some(raw) => {
                let each_key = || format!("{}.each", key());
                let path = JsonPath::parse(raw, 1).map_err(|why| error(each_key(), why))?;
                let (name, rest) = path
                    .split_first()
                    .filter(|(_, rest)| !rest.steps().is_empty())
                    .ok_or_else(|| {
                        error(
                            each_key(),
                            format!("`{raw}` must name an upstream, then a list: `order.lines[]`"),
                        )
                    })?;
                let source = names.iter().position(|n| *n == name).ok_or_else(|| {
                    error(
                        each_key(),
                        format!(
                            "`{name}` is not an upstream of the route ({})",
                            names.join(", ")
                        ),
                    )
                })?;
                if !rest.has_list() {
                    return Err(error(
                        each_key(),
                        format!("`{raw}` has no list: mark it with [] (`order.lines[].sku`)"),
                    ));
                }
                Some((source, rest))
            }
        };
        let max_items = u.max_items.unwrap_or(DEFAULT_MAX_ITEMS);
        if !(1..=MAX_ITEMS).contains(&max_items) {
            return Err(error(
                format!("{}.max_items", key()),
                format!("{max_items} is outside 1..={MAX_ITEMS}"),
            ));
        }
        let batch = match u.batch {
            None => None,
            Some(raw) => {
                let batch_key = |k: &str| format!("{}.batch.{k}", key());
                let param_ok = !raw.param.is_empty()
                    && raw.param.len() <= 64
                    && raw
                        .param
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !param_ok {
                    return Err(error(
                        batch_key("param"),
                        format!("`{}` is not a query parameter's name", raw.param),
                    ));
                }
                let max = raw.max.unwrap_or(DEFAULT_BATCH_MAX);
                if !(1..=MAX_BATCH_IDS).contains(&max) {
                    return Err(error(
                        batch_key("max"),
                        format!("{max} is outside 1..={MAX_BATCH_IDS}"),
                    ));
                }
                let key_path = JsonPath::parse(raw.key.as_deref().unwrap_or("id"), 0)
                    .map_err(|why| error(batch_key("key"), why))?;
                Some(Batch {
                    param: raw.param,
                    max,
                    key: key_path,
                })
            }
        };
        match (&each, &batch, url.uses_each()) {
            (None, Some(_), _) => {
                return Err(error(
                    format!("{}.batch", key()),
                    "a batch needs `each`: the list whose values it sends",
                ));
            }
            (None, None, true) => {
                return Err(error(
                    format!("{}.url", key()),
                    format!("`{}` uses {{each}}, but the upstream has no `each`", u.url),
                ));
            }
            (Some(_), None, false) => {
                return Err(error(
                    format!("{}.url", key()),
                    format!(
                        "`{}` has no {{each}}: every element would make the same call",
                        u.url
                    ),
                ));
            }
            (Some(_), Some(_), true) => {
                return Err(error(
                    format!("{}.url", key()),
                    format!(
                        "`{}` uses {{each}}, but a batch sends the values in `?param=`",
                        u.url
                    ),
                ));
            }
            _ => {}
        }
        if field == "." && each.is_some() {
            return Err(error(
                format!("{}.field", key()),
                "a list cannot be merged into the item: give it a field",
            ));
        }
        let mut depends_on = url.depends_on();
        if let Some((source, _)) = &each
            && !depends_on.contains(source)
        {
            depends_on.push(*source);
        }
        let path_list = |k: &str, raw: &str, lists: usize| {
            JsonPath::parse(raw, lists).map_err(|why| error(format!("{}.{k}", key()), why))
        };
        let select = u
            .select
            .unwrap_or_default()
            .iter()
            .map(|p| path_list("select", p, 1))
            .collect::<Result<Vec<_>, _>>()?;
        let rename = u
            .rename
            .unwrap_or_default()
            .iter()
            .map(|(from, to)| Ok((path_list("rename", from, 0)?, path_list("rename", to, 0)?)))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        upstreams.push(RouteUpstream {
            name: u.name,
            field,
            required: u.required.unwrap_or(true),
            timeout,
            retry,
            forward_headers,
            url,
            depends_on,
            each,
            max_items,
            batch,
            shape: Shape { select, rename },
        });
    }
    // The most calls one item can make: a request fails a call past
    // MAX_CALLS anyway, but a route that would always reach it is a
    // mistake to name at start.
    let most: usize = upstreams
        .iter()
        .map(|u| match (&u.each, &u.batch) {
            (None, _) => 1,
            (Some(_), None) => u.max_items,
            (Some(_), Some(batch)) => u.max_items.div_ceil(batch.max),
        })
        .sum();
    if most > MAX_CALLS {
        return Err(error(
            format!("{}.upstreams", route_key()),
            format!(
                "an item may make {most} calls (one per upstream, max_items per list, \
                 one per batch of a list); at most {MAX_CALLS} are allowed"
            ),
        ));
    }
    if let Some(cycle) = find_cycle(&upstreams) {
        let names: Vec<&str> = cycle.iter().map(|&i| upstreams[i].name.as_str()).collect();
        return Err(error(
            format!("{}.upstreams[{}].url", route_key(), cycle[0]),
            format!("the upstreams depend on each other: {}", names.join(" -> ")),
        ));
    }
    let mut query: Vec<(String, bool)> = Vec::new();
    for (name, default) in upstreams.iter().flat_map(|u| u.url.query_params()) {
        match query.iter_mut().find(|(n, _)| n == name) {
            Some((_, required)) => *required |= default.is_none(),
            None => query.push((name.to_string(), default.is_none())),
        }
    }
    let max_body = match raw.max_body_kib {
        None => DEFAULT_MAX_BODY,
        Some(kib @ 1..=65536) => (kib as usize) << 10,
        Some(kib) => {
            return Err(error(
                format!("{}.max_body_kib", route_key()),
                format!("{kib} is outside 1..=65536"),
            ));
        }
    };
    Ok(Route {
        path,
        upstreams,
        query,
        max_body,
    })
}

/// A cycle among the upstreams' dependencies, as the indices along it
/// (first repeated at the end), if there is one.
fn find_cycle(upstreams: &[RouteUpstream]) -> Option<Vec<usize>> {
    // Depth-first, colouring: 0 unvisited, 1 on the current path, 2 done.
    fn visit(
        at: usize,
        upstreams: &[RouteUpstream],
        colour: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[at] = 1;
        path.push(at);
        for &next in &upstreams[at].depends_on {
            if colour[next] == 1 {
                let start = path.iter().position(|&i| i == next).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(next);
                return Some(cycle);
            }
            if colour[next] == 0
                && let Some(cycle) = visit(next, upstreams, colour, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        colour[at] = 2;
        None
    }
    let mut colour = vec![0u8; upstreams.len()];
    (0..upstreams.len()).find_map(|start| match colour[start] {
        0 => visit(start, upstreams, &mut colour, &mut Vec::new()),
        _ => None,
    })
}

/// Accepts `http://authority[/prefix]` or `https://...`, no query or fragment.
/// Names an upstream may list in `forward_headers`, at most.
pub const MAX_FORWARDED: usize = 32;

/// Whether a client header may be forwarded: a lower-case name that is not
/// about the connection (hop-by-hop), not one the guest or the host sets
/// itself (trace context, the budget, the host's hints), and not the
/// message's framing.
fn forwardable(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(format!("`{name}` is not a lower-case header name"));
    }
    const NEVER: [&str; 14] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "traceparent",
        "tracestate",
        crate::protocol::TIMEOUT_HEADER,
    ];
    if NEVER.contains(&name) || name.starts_with(crate::protocol::HINT_PREFIX) {
        return Err(format!(
            "`{name}` is about the connection or set by fanout itself: it is never forwarded"
        ));
    }
    Ok(())
}

fn parse_base_url(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let rest = raw
        .strip_prefix("http://")
        .or_else(|| raw.strip_prefix("https://"))
        .ok_or_else(|| format!("`{raw}` must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("`{raw}` has no host"));
    }
    if raw.contains(['?', '#', ' ', '{', '}']) {
        return Err(format!(
            "`{raw}` must not contain a query, a fragment, braces or spaces"
        ));
    }
    Ok(raw.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests;
