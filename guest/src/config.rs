//! The guest's configuration, read from its environment.
//!
//! Environment variables are the one configuration channel that every host
//! sets the same way: the fanout host, `wasmtime serve --env` and Spin's
//! component `environment`.

use std::fmt;
use std::time::Duration;

/// Budget for a whole request when `FANOUT_DEADLINE_MS` is not set.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(200);
/// Largest budget the configuration may ask for. A higher value is a mistake
/// (the host's own wall-clock limit would cut the request first).
pub const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// Environment variable holding the request budget in milliseconds.
pub const ENV_DEADLINE_MS: &str = "FANOUT_DEADLINE_MS";

/// One upstream of the product route: who it is and which field it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// Logical name, used in errors and in the base-URL variable's name.
    pub name: &'static str,
    /// Field of the merged answer that this upstream's JSON fills.
    pub field: &'static str,
    /// Path under the base URL; `{id}` is replaced by the product id.
    pub path: &'static str,
    /// Environment variable holding the base URL, e.g. `http://pricing:8080`.
    pub env: &'static str,
}

/// The upstreams of `GET /products/{id}`, in the order of the answer.
pub const PRODUCT_UPSTREAMS: [UpstreamSpec; 3] = [
    UpstreamSpec {
        name: "inventory",
        field: "inventory",
        path: "/inventory/{id}",
        env: "FANOUT_UPSTREAM_INVENTORY",
    },
    UpstreamSpec {
        name: "pricing",
        field: "price",
        path: "/pricing/{id}",
        env: "FANOUT_UPSTREAM_PRICING",
    },
    UpstreamSpec {
        name: "reviews",
        field: "reviews",
        path: "/reviews/{id}",
        env: "FANOUT_UPSTREAM_REVIEWS",
    },
];

/// An upstream with its base URL resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub spec: UpstreamSpec,
    /// Base URL without a trailing slash.
    pub base: String,
}

impl Upstream {
    /// The URL to call for product `id` (already validated by the caller).
    pub fn url(&self, id: &str) -> String {
        format!("{}{}", self.base, self.spec.path.replace("{id}", id))
    }
}

/// Everything the guest needs for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub deadline: Duration,
    pub upstreams: Vec<Upstream>,
}

/// A configuration the guest cannot work with. It names the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the configuration through `lookup` (the environment, in the
    /// component; a map, in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let deadline = match lookup(ENV_DEADLINE_MS) {
            None => DEFAULT_DEADLINE,
            Some(raw) => parse_deadline(&raw).map_err(|reason| ConfigError {
                key: ENV_DEADLINE_MS,
                reason,
            })?,
        };
        let upstreams = PRODUCT_UPSTREAMS
            .iter()
            .map(|spec| {
                let raw = lookup(spec.env).ok_or_else(|| ConfigError {
                    key: spec.env,
                    reason: format!("not set: the base URL of upstream `{}`", spec.name),
                })?;
                let base = parse_base_url(&raw).map_err(|reason| ConfigError {
                    key: spec.env,
                    reason,
                })?;
                Ok(Upstream { spec: *spec, base })
            })
            .collect::<Result<_, _>>()?;
        Ok(Config {
            deadline,
            upstreams,
        })
    }

    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|key| std::env::var(key).ok())
    }
}

fn parse_deadline(raw: &str) -> Result<Duration, String> {
    let ms: u64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("`{raw}` is not a whole number of milliseconds"))?;
    let deadline = Duration::from_millis(ms);
    if ms == 0 || deadline > MAX_DEADLINE {
        return Err(format!(
            "{ms} ms is outside 1..={} ms",
            MAX_DEADLINE.as_millis()
        ));
    }
    Ok(deadline)
}

/// Accepts `http://authority[/prefix]` or `https://...`, no query or fragment.
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
    if raw.contains(['?', '#', ' ']) {
        return Err(format!(
            "`{raw}` must not contain a query, a fragment or spaces"
        ));
    }
    Ok(raw.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const BASES: [(&str, &str); 3] = [
        ("FANOUT_UPSTREAM_INVENTORY", "http://inventory.local/"),
        ("FANOUT_UPSTREAM_PRICING", "http://127.0.0.1:9001/v1"),
        ("FANOUT_UPSTREAM_REVIEWS", "https://reviews.example"),
    ];

    #[test]
    fn reads_bases_and_default_deadline() {
        let config = Config::from_lookup(lookup(&BASES)).unwrap();
        assert_eq!(config.deadline, DEFAULT_DEADLINE);
        let urls: Vec<String> = config.upstreams.iter().map(|u| u.url("42")).collect();
        assert_eq!(
            urls,
            [
                "http://inventory.local/inventory/42",
                "http://127.0.0.1:9001/v1/pricing/42",
                "https://reviews.example/reviews/42",
            ]
        );
    }

    #[test]
    fn deadline_is_validated() {
        let mut pairs = BASES.to_vec();
        pairs.push((ENV_DEADLINE_MS, "150"));
        let config = Config::from_lookup(lookup(&pairs)).unwrap();
        assert_eq!(config.deadline, Duration::from_millis(150));

        for bad in ["0", "-5", "abc", "60001", ""] {
            let mut pairs = BASES.to_vec();
            pairs.push((ENV_DEADLINE_MS, bad));
            let err = Config::from_lookup(lookup(&pairs)).unwrap_err();
            assert_eq!(err.key, ENV_DEADLINE_MS, "{bad}");
        }
    }

    #[test]
    fn missing_or_malformed_base_names_the_variable() {
        let err = Config::from_lookup(lookup(&BASES[..2])).unwrap_err();
        assert_eq!(err.key, "FANOUT_UPSTREAM_REVIEWS");

        for bad in [
            "ftp://x",
            "http://",
            "http:///path",
            "http://a?b=c",
            "inventory",
        ] {
            let mut pairs = BASES.to_vec();
            pairs[0].1 = bad;
            let err = Config::from_lookup(lookup(&pairs)).unwrap_err();
            assert_eq!(err.key, "FANOUT_UPSTREAM_INVENTORY", "{bad}");
        }
    }
}
