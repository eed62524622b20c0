//! `fanout`: serve the aggregator component over HTTP.
//!
//! With no arguments it serves on 127.0.0.1:8080 with built-in demo
//! upstreams answered in-process.

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use fanout_host::{Fanout, Limits, limits};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "Serve the fanout aggregator component over HTTP")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "FANOUT_LISTEN")]
    listen: SocketAddr,

    /// A wasi:http/proxy component to serve instead of the built-in guest.
    #[arg(long)]
    component: Option<PathBuf>,

    /// An upstream as NAME=BASE_URL, served over HTTP (repeatable). It
    /// replaces the demo upstream of that name; the others stay in-process.
    #[arg(long = "upstream", value_name = "NAME=URL", value_parser = parse_upstream)]
    upstreams: Vec<(String, String)>,

    /// Fuel per request (0: unlimited).
    #[arg(long, default_value_t = limits::DEFAULT_FUEL)]
    fuel: u64,

    /// Linear memory per instance, in MiB.
    #[arg(long, default_value_t = (limits::DEFAULT_MEMORY_BYTES >> 20) as u64)]
    memory_mib: u64,

    /// Host wall-clock deadline per request, in milliseconds.
    #[arg(long, default_value_t = limits::DEFAULT_DEADLINE.as_millis() as u64)]
    deadline_ms: u64,

    /// The guest's own budget per request, in milliseconds (guest default: 200).
    #[arg(long)]
    guest_deadline_ms: Option<u64>,

    /// The guest's routes and policies as a JSON file (FANOUT_CONFIG; see the
    /// README).
    #[arg(long, value_name = "FILE")]
    guest_config: Option<PathBuf>,

    /// Instances that may run at once; requests beyond get a 503.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_INSTANCES)]
    max_instances: u32,

    /// Serve only the demo upstreams over HTTP on --listen (at
    /// /inventory/{id}, /pricing/{id}, /reviews/{id}), e.g. as the upstreams
    /// of the component under `wasmtime serve`.
    #[arg(long)]
    demo_upstreams_only: bool,

    /// Log format; json by default when stdout is not a terminal.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

fn parse_upstream(raw: &str) -> Result<(String, String), String> {
    let (name, url) = raw
        .split_once('=')
        .ok_or_else(|| format!("`{raw}` is not NAME=URL"))?;
    Ok((name.trim().to_string(), url.trim().to_string()))
}

fn init_logging(format: Option<LogFormat>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stdout().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);

    if args.demo_upstreams_only {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "demo upstreams listening");
        println!("demo upstreams on http://{addr}: try curl -s http://{addr}/pricing/42");
        fanout_host::demo::serve(listener, shutdown_signal()).await?;
        return Ok(());
    }

    let limits = Limits {
        fuel: (args.fuel > 0).then_some(args.fuel),
        memory_bytes: usize::try_from(args.memory_mib)
            .ok()
            .and_then(|m| m.checked_mul(1 << 20))
            .context("--memory-mib is too large")?,
        deadline: Duration::from_millis(args.deadline_ms),
        max_instances: args.max_instances,
    };
    let mut builder = Fanout::builder().limits(limits).demo_upstreams();
    if let Some(path) = &args.component {
        builder = builder.component_path(path);
    }
    for (name, url) in &args.upstreams {
        builder = builder.http_upstream(name, url);
    }
    if let Some(ms) = args.guest_deadline_ms {
        builder = builder.env("FANOUT_DEADLINE_MS", ms.to_string());
    }
    if let Some(path) = &args.guest_config {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --guest-config {}", path.display()))?;
        builder = builder.env("FANOUT_CONFIG", json);
    }
    // Everything is validated and compiled here, before we listen.
    let fanout = builder.build().context("invalid configuration")?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    for (name, base) in fanout.upstreams() {
        tracing::info!(upstream = %name, %base, "upstream");
    }
    tracing::info!(%addr, "fanout listening");
    println!("fanout is listening on http://{addr}\ntry: curl -s http://{addr}/products/42");

    fanout.serve(listener, shutdown_signal()).await?;
    tracing::info!("shut down");
    Ok(())
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
