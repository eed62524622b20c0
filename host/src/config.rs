//! `fanout.toml`: the host's one configuration file.
//!
//! It holds the listen address, the component, the limits, the upstreams
//! (each with its adapter and guardrails), the log (its shed lines, its
//! queue and its format) and the guest's routes. Everything is validated before the
//! server listens; an error names the key.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//!
//! [limits]
//! deadline_ms = 2000
//!
//! [upstreams.pricing]
//! adapter = "http"
//! url = "http://127.0.0.1:9001"
//! max_concurrency = 64
//!
//! [upstreams.reviews]
//! adapter = "simulated"
//! latency = { distribution = "log_normal", median_ms = 40, sigma = 0.5 }
//! error_rate = 0.05
//!
//! [guest]
//! deadline_ms = 200
//! ```
//!
//! See the `fanout.toml` at the root of the repository for every key.

use crate::adapters::{
    FixtureUpstream, Http2, HttpOptions, HttpUpstream, Latency, SimulatedUpstream, TlsOptions,
};
use crate::builder::FanoutBuilder;
use crate::error::Error;
use crate::guard::{CircuitBreakerConfig, Guardrails, RetryBudgetConfig};
use crate::limits::Limits;
use crate::response_cache::ResponseCacheConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The file, as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where the aggregator listens.
    pub listen: Option<SocketAddr>,
    /// Admin listener: /metrics, /healthz, /readyz.
    pub admin: Option<SocketAddr>,
    /// A component to serve instead of the built-in guest.
    pub component: Option<PathBuf>,
    #[serde(default)]
    /// Per-request limits.
    pub limits: LimitsConfig,
    #[serde(default)]
    /// The upstreams, by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The guest's configuration (`FANOUT_CONFIG`): routes, budget, caps.
    pub guest: Option<fanout_guest::config::RawConfig>,
    #[serde(default)]
    /// The access log.
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
/// The `[log]` table.
pub struct LogConfig {
    /// Access lines sheds get a second, at most; 0 for one per shed
    /// (see [`FanoutBuilder::shed_lines_per_second`]).
    pub shed_lines_per_second: Option<u32>,
    /// Log lines queued for stdout at most while its reader is behind
    /// (see [`crate::stdout_log::writer`]); at least 1. Logging starts
    /// before the rest of the file is applied, so the binary reads this
    /// through [`FileConfig::log_buffer_lines`] first.
    pub buffer_lines: Option<usize>,
    /// How the `fanout` binary writes its log lines; unset, `pretty` on a
    /// terminal and `json` otherwise. Read, like `buffer_lines`, before
    /// logging starts; `--log-format` overrides it.
    pub format: Option<LogFormat>,
}

/// How log lines are written (`[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line, its fields flattened: for collectors.
    Json,
    /// Human-readable lines, coloured only on a terminal.
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
/// The `[limits]` table (see [`Limits`] for the defaults).
pub struct LimitsConfig {
    /// Fuel per request; 0 for unlimited (and no fuel metering).
    pub fuel: Option<u64>,
    /// Linear memory per instance, in MiB.
    pub memory_mib: Option<u64>,
    /// Wall-clock limit per request, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// Instances at once: the pool's size.
    pub max_instances: Option<u32>,
    /// Requests an instance serves before it is retired; 1 for a fresh
    /// instance per request.
    pub instance_reuse: Option<u32>,
    /// How long a request may wait for a busy pool; 0 sheds at once.
    pub queue_wait_ms: Option<u64>,
    /// How long a client may take to send a request head (also the
    /// keep-alive idle timeout), in milliseconds.
    pub header_timeout_ms: Option<u64>,
    /// Header fields a request may carry.
    pub max_headers: Option<usize>,
    /// Size of a request head, in KiB.
    pub max_header_kib: Option<usize>,
    /// Client connections open at once.
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
/// Which adapter serves an upstream.
pub enum AdapterKind {
    /// Real HTTP on the pooled client.
    Http,
    /// JSON files keyed by path.
    Fixture,
    /// A latency distribution with injected faults.
    Simulated,
}

/// One upstream: its adapter, the adapter's settings, its guardrails.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Which adapter serves it.
    pub adapter: AdapterKind,
    /// `http`: the upstream's base URL. Other adapters: the base URL the
    /// guest is told (default `http://<name>.<adapter>`), routed in-process.
    pub url: Option<String>,
    /// `http`: longest time to open a connection.
    pub connect_timeout_ms: Option<u64>,
    /// `http`: longest wait for the response head.
    pub response_timeout_ms: Option<u64>,
    /// `http`: how long an idle connection is kept.
    pub idle_timeout_ms: Option<u64>,
    /// `http`: `auto` (ALPN over TLS), `always` (h2c on http://) or `never`.
    pub http2: Option<Http2>,
    /// `http`: PEM CA certificates to trust besides the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// `http`: a PEM client certificate chain (mutual TLS)...
    pub client_cert: Option<PathBuf>,
    /// ...and its PEM private key.
    pub client_key: Option<PathBuf>,
    /// `http`: the name the server's certificate must carry, if not the URL's host.
    pub tls_server_name: Option<String>,
    /// `fixture`: the directory of `*.json` answers, relative to the file.
    pub dir: Option<PathBuf>,
    /// `simulated`: latency, and the fractions of calls that fail or hang.
    pub latency: Option<LatencyConfig>,
    /// `simulated`: the share of calls answered 503.
    pub error_rate: Option<f64>,
    /// `simulated`: the share of calls never answered.
    pub hang_rate: Option<f64>,
    /// Guardrail: calls in flight at once.
    pub max_concurrency: Option<usize>,
    /// Guardrail: the circuit breaker.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Guardrail: the retry budget.
    pub retry_budget: Option<RetryBudgetConfig>,
    /// A cache of the upstream's GET answers; off unless set.
    pub cache: Option<ResponseCacheConfig>,
    /// Identical GETs in flight at once wait for one call (default: on for
    /// `http` upstreams).
    pub coalesce: Option<bool>,
    /// Fields the host adds to every call (credentials): values may hold
    /// `${env:NAME}` and `${file:PATH}`.
    #[serde(default)]
    pub headers: BTreeMap<String, Redacted>,
}

/// A configured value that is never printed (`Debug` shows `<redacted>`).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(tag = "distribution", rename_all = "snake_case", deny_unknown_fields)]
/// A `simulated` upstream's latency distribution.
#[allow(
    missing_docs,
    reason = "the fields are those of adapters::Latency, in milliseconds"
)]
pub enum LatencyConfig {
    Fixed { ms: u64 },
    Uniform { min_ms: u64, max_ms: u64 },
    LogNormal { median_ms: u64, sigma: f64 },
}

/// What the file decides beyond the [`FanoutBuilder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where the aggregator listens.
    pub listen: Option<SocketAddr>,
    /// Where the admin endpoints listen.
    pub admin: Option<SocketAddr>,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

impl FileConfig {
    /// Reads and parses `path`; TOML errors carry their line and column.
    pub fn load(path: &Path) -> Result<FileConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            key: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut config: FileConfig = toml::from_str(&text).map_err(|e| Error::Config {
            key: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // Relative paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(component) = &mut config.component {
            *component = base.join(&*component);
        }
        for upstream in config.upstreams.values_mut() {
            for path in [
                &mut upstream.dir,
                &mut upstream.ca_file,
                &mut upstream.client_cert,
                &mut upstream.client_key,
            ]
            .into_iter()
            .flatten()
            {
                *path = base.join(&*path);
            }
        }
        Ok(config)
    }

    /// Limits from the file, defaults where it says nothing.
    pub fn limits(&self) -> Result<Limits, Error> {
        let defaults = Limits::default();
        let l = &self.limits;
        Ok(Limits {
            fuel: match l.fuel {
                None => defaults.fuel,
                Some(0) => None,
                Some(n) => Some(n),
            },
            memory_bytes: match l.memory_mib {
                None => defaults.memory_bytes,
                Some(mib) => crate::limits::mib_to_bytes(mib)
                    .ok_or_else(|| invalid("limits.memory_mib", format!("{mib} is too large")))?,
            },
            deadline: l
                .deadline_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.deadline),
            max_instances: l.max_instances.unwrap_or(defaults.max_instances),
            instance_reuse: l.instance_reuse.unwrap_or(defaults.instance_reuse),
            queue_wait: l
                .queue_wait_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.queue_wait),
            header_timeout: l
                .header_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.header_timeout),
            max_headers: l.max_headers.unwrap_or(defaults.max_headers),
            max_header_bytes: match l.max_header_kib {
                None => defaults.max_header_bytes,
                Some(kib) => kib.checked_mul(1 << 10).ok_or_else(|| {
                    invalid("limits.max_header_kib", format!("{kib} is too large"))
                })?,
            },
            max_connections: l.max_connections.unwrap_or(defaults.max_connections),
        })
    }

    /// `[log] buffer_lines`, if set: the queue of log lines for stdout,
    /// which must hold at least one.
    pub fn log_buffer_lines(&self) -> Result<Option<usize>, Error> {
        match self.log.buffer_lines {
            Some(0) => Err(invalid(
                "log.buffer_lines",
                "must be at least 1: past the queue lines are dropped, so 0 would drop them all",
            )),
            lines => Ok(lines),
        }
    }

    /// Applies the file to `builder`: limits, component, upstreams, guest
    /// configuration. Call [`FanoutBuilder::build`] on the result to validate
    /// the rest (and compile).
    pub fn apply(&self, mut builder: FanoutBuilder) -> Result<(FanoutBuilder, Settings), Error> {
        let limits = self.limits()?;
        limits.validate().map_err(|e| match e {
            Error::InvalidLimit { key, reason } => invalid(format!("limits.{key}"), reason),
            other => other,
        })?;
        builder = builder.limits(limits);
        if let Some(component) = &self.component {
            builder = builder.component_path(component);
        }
        for (name, upstream) in &self.upstreams {
            builder = upstream.apply(name, builder)?;
        }
        if let Some(lines) = self.log.shed_lines_per_second {
            builder = builder.shed_lines_per_second(lines);
        }
        if let Some(guest) = &self.guest {
            let json = serde_json::to_string(guest).map_err(|e| invalid("guest", e.to_string()))?;
            builder = builder.env(fanout_guest::protocol::ENV_CONFIG, json);
        }
        Ok((
            builder,
            Settings {
                listen: self.listen,
                admin: self.admin,
            },
        ))
    }
}

impl UpstreamConfig {
    fn apply(&self, name: &str, builder: FanoutBuilder) -> Result<FanoutBuilder, Error> {
        let key = |field: &str| format!("upstreams.{name}.{field}");
        let only_for = |field: &str, set: bool, kind: AdapterKind| {
            if set && self.adapter != kind {
                Err(invalid(
                    key(field),
                    format!(
                        "only for adapter = \"{}\"",
                        format!("{kind:?}").to_lowercase()
                    ),
                ))
            } else {
                Ok(())
            }
        };
        only_for(
            "connect_timeout_ms",
            self.connect_timeout_ms.is_some(),
            AdapterKind::Http,
        )?;
        only_for(
            "response_timeout_ms",
            self.response_timeout_ms.is_some(),
            AdapterKind::Http,
        )?;
        only_for(
            "idle_timeout_ms",
            self.idle_timeout_ms.is_some(),
            AdapterKind::Http,
        )?;
        for (field, set) in [
            ("http2", self.http2.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("client_cert", self.client_cert.is_some()),
            ("client_key", self.client_key.is_some()),
            ("tls_server_name", self.tls_server_name.is_some()),
        ] {
            only_for(field, set, AdapterKind::Http)?;
        }
        only_for("dir", self.dir.is_some(), AdapterKind::Fixture)?;
        only_for("latency", self.latency.is_some(), AdapterKind::Simulated)?;
        only_for(
            "error_rate",
            self.error_rate.is_some(),
            AdapterKind::Simulated,
        )?;
        only_for(
            "hang_rate",
            self.hang_rate.is_some(),
            AdapterKind::Simulated,
        )?;

        // What the file leaves out, an http upstream takes from its
        // defaults; in-process ones have none.
        let defaults = match self.adapter {
            AdapterKind::Http => Guardrails::http_defaults(),
            _ => Guardrails::default(),
        };
        let guardrails = Guardrails {
            max_concurrency: self.max_concurrency.or(defaults.max_concurrency),
            circuit_breaker: self.circuit_breaker.clone().or(defaults.circuit_breaker),
            retry_budget: self.retry_budget.clone().or(defaults.retry_budget),
        };
        guardrails
            .validate()
            .map_err(|reason| invalid(format!("upstreams.{name}"), reason))?;
        let kind = format!("{:?}", self.adapter).to_lowercase();
        let url = self
            .url
            .clone()
            .unwrap_or_else(|| format!("http://{name}.{kind}"));
        let ms = |v: Option<u64>, field: &str| -> Result<Option<Duration>, Error> {
            match v {
                Some(0) => Err(invalid(key(field), "must be at least 1 ms")),
                v => Ok(v.map(Duration::from_millis)),
            }
        };
        let builder = match self.adapter {
            AdapterKind::Http => {
                if self.url.is_none() {
                    return Err(invalid(key("url"), "required for adapter = \"http\""));
                }
                let defaults = HttpOptions::default();
                let options = HttpOptions {
                    connect_timeout: ms(self.connect_timeout_ms, "connect_timeout_ms")?
                        .unwrap_or(defaults.connect_timeout),
                    response_timeout: ms(self.response_timeout_ms, "response_timeout_ms")?,
                    idle_timeout: ms(self.idle_timeout_ms, "idle_timeout_ms")?
                        .unwrap_or(defaults.idle_timeout),
                    http2: self.http2.unwrap_or_default(),
                    tls: TlsOptions {
                        ca_file: self.ca_file.clone(),
                        client_cert: self.client_cert.clone(),
                        client_key: self.client_key.clone(),
                        server_name: self.tls_server_name.clone(),
                    },
                };
                let tls_asked = options.tls != TlsOptions::default();
                if tls_asked && !url.starts_with("https://") {
                    return Err(invalid(
                        key("url"),
                        "ca_file, client_cert and tls_server_name need an https:// URL",
                    ));
                }
                let upstream = HttpUpstream::with_tls(options).map_err(|e| {
                    let field = if e.key == "tls" { "url" } else { e.key };
                    invalid(key(field), e.reason)
                })?;
                builder.http_upstream_with(name, url, upstream)
            }
            AdapterKind::Fixture => {
                let dir = self
                    .dir
                    .as_ref()
                    .ok_or_else(|| invalid(key("dir"), "required for adapter = \"fixture\""))?;
                let fixtures = FixtureUpstream::from_dir(dir)
                    .map_err(|e| invalid(key("dir"), e.to_string()))?;
                builder.upstream(name, url, Arc::new(fixtures))
            }
            AdapterKind::Simulated => {
                let latency = match self.latency {
                    None => Latency::Fixed(Duration::from_millis(20)),
                    Some(LatencyConfig::Fixed { ms }) => Latency::Fixed(Duration::from_millis(ms)),
                    Some(LatencyConfig::Uniform { min_ms, max_ms }) if min_ms <= max_ms => {
                        Latency::Uniform {
                            min: Duration::from_millis(min_ms),
                            max: Duration::from_millis(max_ms),
                        }
                    }
                    Some(LatencyConfig::Uniform { .. }) => {
                        return Err(invalid(key("latency"), "min_ms must not exceed max_ms"));
                    }
                    Some(LatencyConfig::LogNormal { median_ms, sigma })
                        if (0.0..=3.0).contains(&sigma) =>
                    {
                        Latency::LogNormal {
                            median: Duration::from_millis(median_ms),
                            sigma,
                        }
                    }
                    Some(LatencyConfig::LogNormal { .. }) => {
                        return Err(invalid(key("latency"), "sigma must be in 0..=3"));
                    }
                };
                let rate = |v: Option<f64>, field: &str| match v.unwrap_or(0.0) {
                    r if (0.0..=1.0).contains(&r) => Ok(r),
                    r => Err(invalid(key(field), format!("{r} is outside 0..=1"))),
                };
                let (error_rate, hang_rate) = (
                    rate(self.error_rate, "error_rate")?,
                    rate(self.hang_rate, "hang_rate")?,
                );
                if error_rate + hang_rate > 1.0 {
                    return Err(invalid(
                        format!("upstreams.{name}"),
                        "error_rate + hang_rate exceeds 1",
                    ));
                }
                let simulated = SimulatedUpstream::new(latency, crate::demo::answer_for)
                    .error_rate(error_rate)
                    .hang_rate(hang_rate);
                builder.upstream(name, url, Arc::new(simulated))
            }
        };
        let mut builder = builder.guardrails(name, guardrails);
        if let Some(cache) = &self.cache {
            cache.validate().map_err(|reason| {
                invalid(
                    key("cache"),
                    reason.trim_start_matches("cache.").to_string(),
                )
            })?;
            builder = builder.response_cache(name, cache.clone());
        }
        if let Some(on) = self.coalesce {
            builder = builder.coalesce(name, on);
        }
        for (field, template) in &self.headers {
            // Resolved here to name the key; the builder resolves it again.
            crate::adapters::resolve_header(field, &template.0)
                .map_err(|reason| invalid(format!("upstreams.{name}.headers.{field}"), reason))?;
            builder = builder.upstream_header(name, field, &template.0);
        }
        Ok(builder)
    }
}

#[cfg(test)]
mod tests;
