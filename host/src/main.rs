//! `fanout`: serve the aggregator component over HTTP.
//!
//! With no arguments it serves on 127.0.0.1:8080 with built-in demo
//! upstreams answered in-process.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, ValueEnum};
use fanout_guest::protocol::{ENV_CONFIG, ENV_DEADLINE_MS};
use fanout_host::config::{FileConfig, LogFormat};
use fanout_host::stdout_log::WorkerGuard;
use fanout_host::telemetry::Otlp;
use fanout_host::threads::ThreadLayout;
use fanout_host::{Fanout, Limits, WasiHttpVersion};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// mimalloc rather than the system allocator: at saturation glibc's malloc
/// and free were a sixth of the host's CPU, and musl's (the static image)
/// is slower still.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

#[derive(Parser, Debug)]
#[command(version, about = "Serve the fanout aggregator component over HTTP")]
struct Args {
    /// A fanout.toml; flags given as well override it. Without one, the
    /// built-in demo upstreams answer in-process.
    #[arg(long, value_name = "FILE", env = "FANOUT_CONFIG_FILE")]
    config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,

    /// Admin address for /metrics (Prometheus), /healthz and /readyz, apart
    /// from the public port [default: none].
    #[arg(long)]
    admin: Option<SocketAddr>,

    /// A wasi:http/proxy component to serve instead of the built-in guest.
    #[arg(long)]
    component: Option<PathBuf>,

    /// Which build of the built-in guest to serve: `0.2` (wasi:http/proxy,
    /// which every host runs) or `0.3` (wasi:http/service) [default: 0.2].
    #[arg(long, value_name = "VERSION", env = "FANOUT_WASI_HTTP", value_parser = parse_wasi_http,
          conflicts_with = "component")]
    wasi_http: Option<WasiHttpVersion>,

    /// Where compiled components are cached between starts
    /// [default: $XDG_CACHE_HOME/fanout or ~/.cache/fanout].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    /// Compile the component at every start; do not read or write the cache.
    #[arg(long)]
    no_cache: bool,

    /// An upstream as NAME=BASE_URL, served over HTTP (repeatable). It
    /// replaces the upstream of that name from the file or the demo.
    #[arg(long = "upstream", value_name = "NAME=URL", value_parser = parse_upstream)]
    upstreams: Vec<(String, String)>,

    /// Fuel per request; 0 for unlimited, which also compiles the component
    /// without fuel metering [default: 60000000].
    #[arg(long)]
    fuel: Option<u64>,

    /// Linear memory per instance, in MiB [default: 64].
    #[arg(long)]
    memory_mib: Option<u64>,

    /// Host wall-clock deadline per request, in milliseconds [default: 2000].
    #[arg(long)]
    deadline_ms: Option<u64>,

    /// Instances that may run at once, the ceiling of the admission limit
    /// [default: a quarter of the memory (the cgroup's limit, or the
    /// machine's) at 1 MiB each, between 256 and 2048].
    #[arg(long)]
    max_instances: Option<u32>,

    /// Requests an instance serves, one after another, before it is
    /// retired; 1 gives every request a fresh instance. An instance that
    /// failed is never reused [default: 128].
    #[arg(long)]
    instance_reuse: Option<u32>,

    /// How long a request may wait for an instance when all are busy, in
    /// milliseconds; a longer expected wait gets a 503 at once, and 0 sheds
    /// at once [default: 100].
    #[arg(long)]
    queue_wait_ms: Option<u64>,

    /// How long a client may take to send a request head, and stay idle
    /// between requests, in milliseconds [default: 5000].
    #[arg(long)]
    header_timeout_ms: Option<u64>,

    /// Client connections open at once; beyond, new ones wait in the
    /// kernel's backlog [default: 10000].
    #[arg(long)]
    max_connections: Option<usize>,

    /// Admission: `adaptive` learns how many requests may run at once from
    /// their latency; `fixed` admits up to --max-instances.
    #[arg(long, value_enum, default_value_t = AdmissionFlag::Adaptive)]
    admission: AdmissionFlag,

    /// Do not coalesce identical upstream GETs in flight at once (on by
    /// default for http upstreams; `coalesce` per upstream in the file wins).
    #[arg(long)]
    no_coalesce: bool,

    /// Run the guests on N threads of their own, apart from the ones that
    /// accept connections, so that a 503 under overload does not wait
    /// behind guest work; 0 runs them on the connections' threads
    /// [default: one per core].
    #[arg(long, value_name = "N")]
    guest_threads: Option<usize>,

    /// Threads that accept connections, read requests, shed and write
    /// answers [default: one per four cores, at least one; one per core
    /// with --guest-threads 0].
    #[arg(long, value_name = "N")]
    connection_threads: Option<usize>,

    /// Run the guest threads N steps of nice below the connections', so
    /// that a connection thread gets a core at once when the guests fill
    /// them; measured, it cost answers as often as it sped up sheds
    /// (Linux only; see `fanout_host::threads`) [default: 0].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=19))]
    guest_nice: Option<u8>,

    /// The guest's own budget per request, in milliseconds [default: 200].
    #[arg(long)]
    guest_deadline_ms: Option<u64>,

    /// The guest's routes and policies as a JSON file (FANOUT_CONFIG; see the
    /// README). Overrides the file's [guest] table.
    #[arg(long, value_name = "FILE")]
    guest_config: Option<PathBuf>,

    /// Serve only the demo upstreams over HTTP on --listen (at
    /// /inventory/{id}, /pricing/{id}, /reviews/{id}), e.g. as the upstreams
    /// of the component under `wasmtime serve`.
    #[arg(long)]
    demo_upstreams_only: bool,

    /// Validate the configuration and compile the component (filling the
    /// cache), then exit without serving: a configuration check, and how
    /// the container image warms its cache at build time.
    #[arg(long)]
    check: bool,

    /// Log format. Overrides `[log] format` in the file [default: pretty
    /// on a terminal, json otherwise].
    #[arg(long, value_enum)]
    log_format: Option<LogFormatFlag>,

    /// Log lines queued for stdout at most while its reader is behind;
    /// past them lines are dropped and counted
    /// (`fanout_log_lines_dropped_total`), never waited for. Overrides
    /// `[log] buffer_lines` in the file [default: 8192].
    #[arg(long, value_name = "N", env = "FANOUT_LOG_BUFFER_LINES")]
    log_buffer_lines: Option<std::num::NonZeroUsize>,

    /// Name the guest's compiled code for `perf`: `perfmap` writes
    /// /tmp/perf-<pid>.map, which `perf report` reads [default: none].
    #[arg(long, value_enum, env = "FANOUT_PROFILE")]
    profile: Option<ProfileFlag>,

    /// Access lines sheds (503s from admission) get a second, at most, each
    /// counting the sheds left out before it; 0 writes one per shed
    /// [default: 10].
    #[arg(long, value_name = "N")]
    shed_lines_per_second: Option<u32>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AdmissionFlag {
    Adaptive,
    Fixed,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProfileFlag {
    Perfmap,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatFlag {
    Json,
    Pretty,
}

impl From<LogFormatFlag> for LogFormat {
    fn from(flag: LogFormatFlag) -> LogFormat {
        match flag {
            LogFormatFlag::Json => LogFormat::Json,
            LogFormatFlag::Pretty => LogFormat::Pretty,
        }
    }
}

fn parse_wasi_http(value: &str) -> Result<WasiHttpVersion, String> {
    match value {
        "0.2" | "p2" => Ok(WasiHttpVersion::P2),
        "0.3" | "p3" => Ok(WasiHttpVersion::P3),
        other => Err(format!("`{other}` is not a wasi:http version: 0.2 or 0.3")),
    }
}

fn parse_upstream(raw: &str) -> Result<(String, String), String> {
    let (name, url) = raw
        .split_once('=')
        .ok_or_else(|| format!("`{raw}` is not NAME=URL"))?;
    Ok((name.trim().to_string(), url.trim().to_string()))
}

/// The log's queue of lines: the flag (or its env variable), else the
/// file's `[log] buffer_lines`, else the default. A wrong value in the
/// file is refused even when the flag overrides it, as the file's limits
/// are.
fn log_buffer_lines(
    flag: Option<usize>,
    file: Option<&FileConfig>,
) -> Result<usize, fanout_host::Error> {
    let from_file = file
        .map(FileConfig::log_buffer_lines)
        .transpose()?
        .flatten();
    Ok(flag
        .or(from_file)
        .unwrap_or(fanout_host::stdout_log::DEFAULT_BUFFERED_LINES))
}

/// The log's format: the flag, else the file's `[log] format`, else
/// pretty for a person at a `terminal` and JSON for a collector.
fn log_format(flag: Option<LogFormatFlag>, file: Option<&FileConfig>, terminal: bool) -> LogFormat {
    flag.map(LogFormat::from)
        .or(file.and_then(|file| file.log.format))
        .unwrap_or(if terminal {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        })
}

/// Log lines on stdout (from a thread of their own: `stdout_log`), plus
/// OTLP span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Dropped,
/// the returned guard writes out the lines still queued and the exporter
/// flushes its last spans.
fn init_logging(
    format: LogFormat,
    terminal: bool,
    buffered_lines: usize,
) -> Result<(WorkerGuard, Option<Otlp>)> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, Registry};
    let otlp = Otlp::from_env()?;
    // The request and upstream spans are for the exporter: in the log
    // lines they would repeat what the access line already says.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(format!("{}=off", fanout_host::telemetry::SPAN_TARGET).parse()?);
    let (writer, flush_at_exit) = fanout_host::stdout_log::writer(buffered_lines);
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
        // Colour codes in a file or a collector are noise.
        LogFormat::Pretty => fmt
            .with_ansi(terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
            .with_filter(filter)
            .boxed(),
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![fmt];
    if let Some(otlp) = &otlp {
        layers.push(otlp.layer());
    }
    tracing_subscriber::registry().with(layers).init();
    Ok((flush_at_exit, otlp))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // On the connections' threads there are no guest threads to lower:
    // said, rather than ignored.
    if args.guest_threads == Some(0) && args.guest_nice.is_some_and(|n| n > 0) {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--guest-nice lowers the guests' own threads, and --guest-threads 0 runs them on the connections'",
            )
            .exit();
    }
    let threads =
        ThreadLayout::from_flags(args.connection_threads, args.guest_threads, args.guest_nice);
    let runtime = threads
        .connection_runtime()
        .context("cannot start the connections' runtime")?;
    runtime.block_on(run(args, threads))
}

async fn run(args: Args, threads: ThreadLayout) -> Result<()> {
    // The file is read before logging starts: its `[log]` table sizes the
    // log's queue. What is wrong with it is printed to stderr, as any
    // error that stops the start.
    let file = match &args.config {
        Some(path) => Some(FileConfig::load(path).context("fanout did not start")?),
        None => None,
    };
    let flag = args.log_buffer_lines.map(std::num::NonZeroUsize::get);
    let buffered_lines = log_buffer_lines(flag, file.as_ref()).context("fanout did not start")?;
    let terminal = std::io::stdout().is_terminal();
    let format = log_format(args.log_format, file.as_ref(), terminal);
    let (_flush_at_exit, otlp) = init_logging(format, terminal, buffered_lines)?;
    if otlp.is_some() {
        tracing::info!("exporting spans over OTLP");
    }

    if args.demo_upstreams_only {
        let listen = args.listen.unwrap_or(DEFAULT_LISTEN);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "demo upstreams listening");
        println!("demo upstreams on http://{addr}: try curl -s http://{addr}/pricing/42");
        fanout_host::demo::serve(listener, shutdown_signal()).await?;
        return Ok(());
    }

    let (fanout, listen, admin) = configure(&args, file, threads).map_err(|e| {
        // A file's guest table is `guest` to its reader, not FANOUT_CONFIG.
        match (&args.config, e) {
            (Some(_), fanout_host::Error::GuestConfig { key, reason }) => anyhow::anyhow!(
                "invalid configuration `{}`: {reason}",
                key.replacen(ENV_CONFIG, "guest", 1)
            ),
            (_, e) => anyhow::Error::from(e),
        }
        .context("fanout did not start")
    })?;

    if args.check {
        for (name, base) in fanout.upstreams() {
            tracing::info!(upstream = %name, %base, "upstream");
        }
        println!("configuration valid, component compiled");
        return Ok(());
    }

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    for (name, base) in fanout.upstreams() {
        tracing::info!(upstream = %name, %base, "upstream");
    }
    tracing::info!(%addr, "fanout listening");
    println!("fanout is listening on http://{addr}\ntry: curl -s http://{addr}/products/42");

    // One signal stops both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    if let Some(admin) = admin {
        let admin_listener = tokio::net::TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot listen on {admin} (--admin)"))?;
        tracing::info!(addr = %admin_listener.local_addr()?, "admin listening: /metrics /healthz /readyz");
        let fanout = fanout.clone();
        let stopped = until_stopped(stopped.clone());
        tokio::spawn(async move { fanout.serve_admin(admin_listener, stopped).await });
    }
    fanout.serve(listener, until_stopped(stopped)).await?;
    tracing::info!("shut down");
    Ok(())
}

/// The file (or the demo), then the flags on top; validated and compiled.
fn configure(
    args: &Args,
    file: Option<FileConfig>,
    threads: ThreadLayout,
) -> Result<(Fanout, SocketAddr, Option<SocketAddr>), fanout_host::Error> {
    let mut builder = Fanout::builder();
    let mut listen = None;
    let mut admin = None;
    let mut limits = Limits::default();
    match file {
        Some(file) => {
            limits = file.limits()?;
            let (applied, settings) = file.apply(builder)?;
            builder = applied;
            listen = settings.listen;
            admin = settings.admin;
        }
        None => {
            builder = builder.demo_upstreams();
            // The demo's routes are the built-in guest's; another component
            // or the operator's own routes get none of them.
            if args.guest_config.is_none() && args.component.is_none() {
                let routes = fanout_host::demo::guest_config().to_string();
                builder = builder.env(ENV_CONFIG, routes);
            }
        }
    }
    if let Some(fuel) = args.fuel {
        limits.fuel = (fuel > 0).then_some(fuel);
    }
    if let Some(mib) = args.memory_mib {
        limits.memory_bytes = fanout_host::limits::mib_to_bytes(mib).ok_or_else(|| {
            fanout_host::Error::InvalidLimit {
                key: "memory",
                reason: format!("--memory-mib {mib} is too large"),
            }
        })?;
    }
    if let Some(ms) = args.deadline_ms {
        limits.deadline = Duration::from_millis(ms);
    }
    if let Some(n) = args.max_instances {
        limits.max_instances = n;
    }
    if let Some(n) = args.instance_reuse {
        limits.instance_reuse = n;
    }
    if let Some(ms) = args.queue_wait_ms {
        limits.queue_wait = Duration::from_millis(ms);
    }
    if let Some(ms) = args.header_timeout_ms {
        limits.header_timeout = Duration::from_millis(ms);
    }
    if let Some(n) = args.max_connections {
        limits.max_connections = n;
    }
    builder = builder.limits(limits).admission(match args.admission {
        AdmissionFlag::Adaptive => fanout_host::AdmissionMode::Adaptive(None),
        AdmissionFlag::Fixed => fanout_host::AdmissionMode::Fixed,
    });
    if args.no_coalesce {
        builder = builder.coalescing(false);
    }
    if let Some(lines) = args.shed_lines_per_second {
        builder = builder.shed_lines_per_second(lines);
    }
    if let Some(count) = threads.guest_threads {
        builder = builder.guest_threads(count).guest_nice(threads.guest_nice);
    }
    if let Some(profile) = args.profile {
        builder = builder.guest_profiler(match profile {
            ProfileFlag::Perfmap => fanout_host::GuestProfiler::PerfMap,
        });
    }
    if !args.no_cache
        && let Some(dir) = args
            .cache_dir
            .clone()
            .or_else(fanout_host::cache::default_dir)
    {
        builder = builder.cache_dir(dir);
    }
    if let Some(version) = args.wasi_http {
        builder = builder.builtin_guest(version);
    }
    if let Some(path) = &args.component {
        builder = builder.component_path(path);
    }
    for (name, url) in &args.upstreams {
        builder = builder.http_upstream(name, url);
    }
    if let Some(ms) = args.guest_deadline_ms {
        builder = builder.env(ENV_DEADLINE_MS, ms.to_string());
    }
    if let Some(path) = &args.guest_config {
        let json = std::fs::read_to_string(path).map_err(|e| fanout_host::Error::Config {
            key: "--guest-config".into(),
            reason: format!("{}: {e}", path.display()),
        })?;
        builder = builder.env(ENV_CONFIG, json);
    }
    // Everything is validated and compiled here, before we listen.
    let fanout = builder.build()?;
    Ok((
        fanout,
        args.listen.or(listen).unwrap_or(DEFAULT_LISTEN),
        args.admin.or(admin),
    ))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_host::stdout_log::DEFAULT_BUFFERED_LINES;

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).expect("a valid file")
    }

    #[test]
    fn the_flag_sizes_the_log_queue_before_the_file_and_the_file_before_the_default() {
        let sized = file("[log]\nbuffer_lines = 64\n");
        let not_set = file("[log]\nshed_lines_per_second = 5\n");
        assert_eq!(log_buffer_lines(Some(10), Some(&sized)).unwrap(), 10);
        assert_eq!(log_buffer_lines(None, Some(&sized)).unwrap(), 64);
        assert_eq!(
            log_buffer_lines(None, Some(&not_set)).unwrap(),
            DEFAULT_BUFFERED_LINES
        );
        assert_eq!(
            log_buffer_lines(None, None).unwrap(),
            DEFAULT_BUFFERED_LINES
        );
        let zero = file("[log]\nbuffer_lines = 0\n");
        let err = log_buffer_lines(None, Some(&zero)).unwrap_err();
        assert!(err.to_string().contains("log.buffer_lines"), "{err}");
        assert!(
            log_buffer_lines(Some(32), Some(&zero)).is_err(),
            "a wrong file is refused whatever the flags say"
        );
    }

    #[test]
    fn the_flag_sets_the_log_format_before_the_file_and_the_file_before_the_terminal() {
        let pretty = file("[log]\nformat = \"pretty\"\n");
        let json = file("[log]\nformat = \"json\"\n");
        let not_set = file("[log]\nbuffer_lines = 64\n");
        let flag = Some(LogFormatFlag::Json);
        assert_eq!(log_format(flag, Some(&pretty), true), LogFormat::Json);
        assert_eq!(log_format(None, Some(&pretty), false), LogFormat::Pretty);
        assert_eq!(log_format(None, Some(&json), true), LogFormat::Json);
        for file in [Some(&not_set), None] {
            assert_eq!(log_format(None, file, true), LogFormat::Pretty);
            assert_eq!(log_format(None, file, false), LogFormat::Json);
        }
    }
}
