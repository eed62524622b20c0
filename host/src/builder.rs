//! [`FanoutBuilder`]: everything a [`Fanout`] is made of, validated and
//! compiled before anything listens.

use crate::adapters::{HttpUpstream, WithHeaders, resolve_header};
use crate::admission::{Admission, AdmissionConfig};
use crate::builtin_guest::BuiltinGuest;
use crate::demo;
use crate::error::Error;
use crate::fanout::Fanout;
use crate::guard::Guardrails;
use crate::guest_runtime::GuestRuntime;
use crate::guest_world::{GuestPre, WasiHttpVersion};
use crate::instance::Runner;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::outbound::{DefaultHooks, OutboundHooks, UpstreamHandle, Upstreams};
use crate::response_cache::ResponseCacheConfig;
use crate::runtime::{self, EpochTicker, GuestProfiler};
use crate::stats::Stats;
use crate::store::RequestState;
use crate::upstream::Upstream;
use crate::worker::IdleWorkers;
use fanout_guest::protocol::ENV_UPSTREAM_PREFIX;
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;
use wasmtime::component::Linker;

/// Builds a [`Fanout`]. Everything is validated and the component compiled in
/// [`build`](FanoutBuilder::build), before anything listens.
pub struct FanoutBuilder {
    component: ComponentSource,
    limits: Limits,
    upstreams: Vec<PendingUpstream>,
    env: Vec<(String, String)>,
    http: HttpUpstream,
    hooks: Arc<dyn OutboundHooks>,
    cache_dir: Option<PathBuf>,
    admission: AdmissionMode,
    guest_threads: Option<usize>,
    guest_nice: u8,
    coalescing: bool,
    shed_lines_per_second: u32,
    profiler: Option<GuestProfiler>,
}

/// How requests are admitted before they get an instance. Either way, a
/// request that finds no place waits in line for up to
/// [`Limits::queue_wait`], when its expected wait fits, and is otherwise
/// shed at once with a 503 and `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdmissionMode {
    /// Up to `max_instances` at once.
    Fixed,
    /// A limit learnt from latency (see [`admission`](crate::admission)),
    /// at most `max_instances`: the default. `None` derives the settings
    /// from the limits.
    Adaptive(Option<AdmissionConfig>),
}

struct PendingUpstream {
    name: String,
    base_url: String,
    upstream: Arc<dyn Upstream>,
    guardrails: Guardrails,
    is_http: bool,
    response_cache: Option<ResponseCacheConfig>,
    /// `None`: on for `http` upstreams, off for in-process ones.
    coalesce: Option<bool>,
    /// Fields the host adds to every call, as (name, template) pairs.
    headers: Vec<(String, String)>,
}

enum ComponentSource {
    /// The guest built from `guest/` (or its `wasi:http@0.3` build from
    /// `guest-p3/`), whose configuration the host knows.
    BuiltIn(WasiHttpVersion),
    Bytes(Cow<'static, [u8]>),
    Path(PathBuf),
}

impl Default for FanoutBuilder {
    fn default() -> Self {
        FanoutBuilder {
            component: ComponentSource::BuiltIn(WasiHttpVersion::P2),
            limits: Limits::default(),
            upstreams: Vec::new(),
            env: Vec::new(),
            http: HttpUpstream::default(),
            hooks: Arc::new(DefaultHooks),
            cache_dir: None,
            admission: AdmissionMode::Adaptive(None),
            guest_threads: None,
            guest_nice: 0,
            coalescing: true,
            shed_lines_per_second: crate::telemetry::SHED_LINES_PER_SECOND,
            profiler: None,
        }
    }
}

impl FanoutBuilder {
    /// Runs the built-in guest's build for `version`: the `wasi:http@0.2`
    /// one by default (it runs on every host), or the `@0.3` one.
    pub fn builtin_guest(mut self, version: WasiHttpVersion) -> Self {
        self.component = ComponentSource::BuiltIn(version);
        self
    }

    /// Runs this component (a `wasi:http/proxy` component, as bytes) instead
    /// of the built-in guest.
    pub fn component_bytes(mut self, bytes: impl Into<Cow<'static, [u8]>>) -> Self {
        self.component = ComponentSource::Bytes(bytes.into());
        self
    }

    /// Runs the component at `path` instead of the built-in guest.
    pub fn component_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.component = ComponentSource::Path(path.into());
        self
    }

    /// Sets the per-request limits ([`Limits::default`] unless set).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Registers upstream `name`: the guest is told `base_url` (through the
    /// `FANOUT_UPSTREAM_<NAME>` environment variable) and its requests to
    /// that authority go to `upstream`. A second call with the same name
    /// replaces the first.
    pub fn upstream(
        self,
        name: impl Into<String>,
        base_url: impl Into<String>,
        upstream: Arc<dyn Upstream>,
    ) -> Self {
        self.add_upstream(name.into(), base_url.into(), upstream, false)
    }

    fn add_upstream(
        mut self,
        name: String,
        base_url: String,
        upstream: Arc<dyn Upstream>,
        is_http: bool,
    ) -> Self {
        // A replaced upstream keeps the settings made for its name.
        let replaced = self.upstreams.iter().position(|u| u.name == name);
        let replaced = replaced.map(|i| self.upstreams.remove(i));
        let (guardrails, response_cache, coalesce, headers) = match replaced {
            Some(old) => (
                old.guardrails,
                old.response_cache,
                old.coalesce,
                old.headers,
            ),
            None if is_http => (Guardrails::http_defaults(), None, None, Vec::new()),
            None => (Guardrails::default(), None, None, Vec::new()),
        };
        self.upstreams.push(PendingUpstream {
            name,
            base_url,
            upstream,
            guardrails,
            is_http,
            response_cache,
            coalesce,
            headers,
        });
        self
    }

    /// The pending upstream `name`, registered before or, as a placeholder
    /// that `build` refuses unless filled, after this call.
    fn settings_of(&mut self, name: &str) -> &mut PendingUpstream {
        let index = match self.upstreams.iter().position(|u| u.name == name) {
            Some(index) => index,
            None => {
                self.upstreams.push(PendingUpstream {
                    name: name.to_string(),
                    base_url: String::new(),
                    upstream: Arc::new(HttpUpstream::default()),
                    guardrails: Guardrails::default(),
                    is_http: false,
                    response_cache: None,
                    coalesce: None,
                    headers: Vec::new(),
                });
                self.upstreams.len() - 1
            }
        };
        &mut self.upstreams[index]
    }

    /// Registers upstream `name` served over HTTP at `base_url` by
    /// `upstream` (for example an [`HttpUpstream`] with its own timeouts).
    /// Upstreams registered this way may share an authority.
    pub fn http_upstream_with(
        self,
        name: impl Into<String>,
        base_url: impl Into<String>,
        upstream: HttpUpstream,
    ) -> Self {
        self.add_upstream(name.into(), base_url.into(), Arc::new(upstream), true)
    }

    /// Sets the cross-request guardrails of upstream `name` (registered
    /// before or after this call).
    pub fn guardrails(mut self, name: &str, guardrails: Guardrails) -> Self {
        self.settings_of(name).guardrails = guardrails;
        self
    }

    /// Stores the GET answers of upstream `name` in a bounded cache, as far
    /// as their `Cache-Control` lets a shared cache (see
    /// [`response_cache`](crate::response_cache)). Off unless set.
    pub fn response_cache(mut self, name: &str, config: ResponseCacheConfig) -> Self {
        self.settings_of(name).response_cache = Some(config);
        self
    }

    /// Turns request coalescing for upstream `name` on or off: while a GET
    /// is in flight, identical ones wait for its answer. On by default for
    /// `http` upstreams, off for in-process ones.
    pub fn coalesce(mut self, name: &str, on: bool) -> Self {
        self.settings_of(name).coalesce = Some(on);
        self
    }

    /// Adds header field `field` to every call to upstream `name`, after
    /// the guest: credentials the guest never sees and cannot override.
    /// `template` may hold `${env:NAME}` and `${file:PATH}`, resolved in
    /// [`build`](Self::build) (a missing one is an error naming it).
    pub fn upstream_header(mut self, name: &str, field: &str, template: &str) -> Self {
        self.settings_of(name)
            .headers
            .push((field.to_string(), template.to_string()));
        self
    }

    /// Whether `http` upstreams not set one by one ([`coalesce`](Self::coalesce))
    /// coalesce identical GETs: yes unless turned off here.
    pub fn coalescing(mut self, on: bool) -> Self {
        self.coalescing = on;
        self
    }

    /// Caches the compiled component in `dir`, so that the next start with
    /// the same component and engine settings skips compilation (see
    /// [`cache`](crate::cache)). Off by default in the library; the `fanout`
    /// binary turns it on.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Names the guest's compiled code for `perf` (off by default). A
    /// profiling aid: the map is written as code is loaded, and the
    /// compiled-component cache serves it as well.
    pub fn guest_profiler(mut self, profiler: GuestProfiler) -> Self {
        self.profiler = Some(profiler);
        self
    }

    /// How requests are admitted ([`AdmissionMode::Adaptive`] by default:
    /// see BENCHMARKS.md for the two under overload).
    pub fn admission(mut self, admission: AdmissionMode) -> Self {
        self.admission = admission;
        self
    }

    /// How many access lines sheds (503s from admission) get a second, at
    /// most: [`SHED_LINES_PER_SECOND`](crate::telemetry::SHED_LINES_PER_SECOND)
    /// by default; 0 writes one for every shed. Each line written carries
    /// `sheds_not_logged`, the sheds left out since the one before;
    /// `fanout_shed_total` counts them all. Under clients that re-send at
    /// once a line per shed costs the CPU the answers need.
    pub fn shed_lines_per_second(mut self, lines: u32) -> Self {
        self.shed_lines_per_second = lines;
        self
    }

    /// Runs the guests on a runtime of their own with `threads` workers,
    /// apart from the caller's runtime that accepts connections and sheds.
    /// Under overload a shed 503 is then answered without waiting behind
    /// guest work (see [`threads`](crate::threads), which lays out the
    /// `fanout` binary's threads this way, and README.md). Off by default
    /// in the library: the guests run on the caller's runtime.
    ///
    /// Each request crosses between the runtimes once each way: the guest's
    /// answer is read to its end (up to [`HANDOFF_BUFFER`](crate::limits::HANDOFF_BUFFER)) before it goes
    /// back, so its first byte leaves when its last is written, and a
    /// guest that fails before then gets its failure's own answer (a 504
    /// at the deadline) instead of a broken body. A larger body streams.
    pub fn guest_threads(mut self, threads: usize) -> Self {
        self.guest_threads = Some(threads.max(1));
        self
    }

    /// Runs the [guest threads](Self::guest_threads) `nice` steps below the
    /// priority of the thread that builds them (Linux nice values: 19 is
    /// the lowest; elsewhere this does nothing). 0, the default, leaves
    /// them at it.
    ///
    /// A connection thread that wakes while the guests fill the cores then
    /// takes one at once, so sheds and new requests are read on time. But
    /// the guests also yield to every busy process in their scheduling
    /// group, and in one of the two overloads measured they answered fewer
    /// on as much CPU: see [`threads`](crate::threads).
    pub fn guest_nice(mut self, nice: u8) -> Self {
        self.guest_nice = nice;
        self
    }

    /// Hooks into every outgoing request (see [`OutboundHooks`]).
    pub fn outbound_hooks(mut self, hooks: Arc<dyn OutboundHooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Registers upstream `name` served over real HTTP at `base_url`, on the
    /// shared pooled client.
    pub fn http_upstream(self, name: impl Into<String>, base_url: impl Into<String>) -> Self {
        let http = Arc::new(self.http.clone());
        self.add_upstream(name.into(), base_url.into(), http, true)
    }

    /// Registers the built-in in-process demo upstreams.
    pub fn demo_upstreams(mut self) -> Self {
        for (name, base, upstream) in demo::upstreams() {
            self = self.upstream(name, base, upstream);
        }
        self
    }

    /// Sets an extra environment variable for the guest (for example
    /// `FANOUT_DEADLINE_MS`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Validates the configuration, compiles and links the component, and
    /// starts the epoch ticker.
    pub fn build(self) -> Result<Fanout, Error> {
        self.limits.validate()?;
        let metrics = Arc::new(Metrics::default());
        let mut upstreams = Upstreams::default();
        let mut env = self.env;
        for pending in self.upstreams {
            let name = pending.name;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::InvalidUpstream {
                    name,
                    reason: "names are made of A-Z, a-z, 0-9 and '_'".into(),
                });
            }
            if pending.base_url.is_empty() {
                return Err(Error::InvalidUpstream {
                    name,
                    reason: "guardrails were set, but no upstream was registered".into(),
                });
            }
            pending
                .guardrails
                .validate()
                .and_then(|()| match &pending.response_cache {
                    Some(cache) => cache.validate(),
                    None => Ok(()),
                })
                .map_err(|reason| Error::InvalidUpstream {
                    name: name.clone(),
                    reason,
                })?;
            env.push((
                format!("{ENV_UPSTREAM_PREFIX}{}", name.to_ascii_uppercase()),
                pending.base_url.clone(),
            ));
            let mut upstream = pending.upstream;
            if !pending.headers.is_empty() {
                let mut headers = http::HeaderMap::new();
                for (field, template) in &pending.headers {
                    let (field, value) = resolve_header(field, template).map_err(|reason| {
                        Error::InvalidUpstream {
                            name: name.clone(),
                            reason: format!("headers: {reason}"),
                        }
                    })?;
                    headers.append(field, value);
                }
                upstream = Arc::new(WithHeaders::new(upstream, headers));
            }
            let handle = UpstreamHandle::new(
                name,
                pending.base_url,
                upstream,
                &pending.guardrails,
                pending.is_http,
            )?;
            let coalesce = pending
                .coalesce
                .unwrap_or(pending.is_http && self.coalescing);
            upstreams.insert(if coalesce || pending.response_cache.is_some() {
                handle.with_response_cache(pending.response_cache, metrics.clone())
            } else {
                handle
            })?;
        }

        let builtin = match self.component {
            ComponentSource::BuiltIn(_) => {
                Some(BuiltinGuest::configure(&env, &self.limits, &upstreams)?)
            }
            _ => None,
        };

        let bytes: Cow<'_, [u8]> = match &self.component {
            ComponentSource::BuiltIn(WasiHttpVersion::P2) => {
                Cow::Borrowed(crate::builtin_guest::GUEST_COMPONENT)
            }
            ComponentSource::BuiltIn(WasiHttpVersion::P3) => {
                Cow::Borrowed(crate::builtin_guest::GUEST_P3_COMPONENT)
            }
            ComponentSource::Bytes(bytes) => Cow::Borrowed(bytes),
            ComponentSource::Path(path) => {
                Cow::Owned(std::fs::read(path).map_err(|source| Error::ReadComponent {
                    path: path.clone(),
                    source,
                })?)
            }
        };
        let world = WasiHttpVersion::exported_by(&bytes);
        let engine =
            runtime::engine(&self.limits, world, self.profiler).map_err(Error::wasmtime)?;
        let (component, origin) =
            crate::cache::load_or_compile(&engine, &bytes, self.cache_dir.as_deref())
                .map_err(|e| Error::Component(format!("{e:#}")))?;
        tracing::info!(?origin, "component ready");

        let mut linker = Linker::<RequestState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(Error::wasmtime)?;
        crate::outgoing_handler::add_to_linker(&mut linker).map_err(Error::wasmtime)?;
        // A 0.3 guest built for wasm32-wasip2 imports both: std's 0.2 WASI
        // and the 0.3 interfaces it calls. A 0.2 guest's engine has no
        // concurrency support (see `runtime::engine`), which 0.3 needs.
        if world == WasiHttpVersion::P3 {
            wasmtime_wasi::p3::add_to_linker(&mut linker).map_err(Error::wasmtime)?;
            wasmtime_wasi_http::p3::add_to_linker(&mut linker).map_err(Error::wasmtime)?;
        }
        let pre = linker
            .instantiate_pre(&component)
            .and_then(|pre| GuestPre::new(pre, world))
            .map_err(|e| Error::Component(format!("{e:#}")))?;

        let max_instances = self.limits.max_instances as usize;
        // The budget a request has by default: the guest's own, or for
        // another component the host's deadline.
        let budget = builtin
            .as_ref()
            .map_or(self.limits.deadline, BuiltinGuest::budget);
        let admission = match self.admission {
            AdmissionMode::Fixed => Admission::fixed(max_instances),
            AdmissionMode::Adaptive(config) => Admission::new(
                config.unwrap_or_else(|| AdmissionConfig::for_budget(max_instances, budget)),
            ),
        };
        metrics.watch(&admission);
        let ticker = EpochTicker::start(engine.clone())?;
        let runner = Runner {
            pre,
            limits: self.limits,
            upstreams: Arc::new(upstreams),
            hooks: self.hooks,
            env,
            instances: Arc::new(Semaphore::new(max_instances)),
            idle: IdleWorkers::new(metrics.instances_idle.clone()),
            stats: Stats::default(),
            metrics,
            builtin,
            admission,
            adaptive: matches!(self.admission, AdmissionMode::Adaptive(_)),
            guests: self
                .guest_threads
                .map(|threads| GuestRuntime::new(threads, self.guest_nice))
                .transpose()?,
            ticker,
        };
        Ok(Fanout::new(runner, origin, self.shed_lines_per_second))
    }
}

impl Fanout {
    /// A builder with the built-in guest, default limits and no upstreams.
    pub fn builder() -> FanoutBuilder {
        FanoutBuilder::default()
    }
}
