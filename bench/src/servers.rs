//! The processes a benchmark runs: upstream simulators and the targets that
//! aggregate them. Each is started as its own process (a hidden subcommand
//! of `fanout-bench`) and prints `listening on <addr>` when ready.

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The upstreams' paths, in the order of the merged answer.
pub const UPSTREAMS: [(&str, &str); 3] = [
    ("inventory", "inventory"),
    ("pricing", "price"),
    ("reviews", "reviews"),
];

/// Budget of one aggregated request, as the guest's default.
pub const BUDGET: Duration = Duration::from_millis(200);

pub fn announce(addr: SocketAddr) {
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
}

/// Serves HTTP/1.1 with `handler` until the process is stopped.
async fn serve<H, F>(listener: TcpListener, handler: H) -> Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_maybe_tls(listener, None, handler).await
}

/// Serves `fanout` answer by answer, without [`fanout_host::Fanout::serve`]'s
/// pacing of clients that come back too soon: every shed goes out at once,
/// so that a window of them measures what one costs.
pub async fn fanout_unpaced(listener: TcpListener, fanout: fanout_host::Fanout) -> Result<()> {
    serve(listener, move |request| {
        let fanout = fanout.clone();
        async move {
            let (parts, body) = fanout.handle(request).await.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::from_parts(parts, Full::new(bytes))
        }
    })
    .await
}

/// Connections the upstream server has accepted, for `GET /connections`.
static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Serves `handler`: HTTP/1.1, or with `tls` HTTPS with HTTP/1.1 or
/// HTTP/2 as ALPN decides.
async fn serve_maybe_tls<H, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
) -> Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        // Out of file descriptors (EMFILE) must not end the server: wait
        // for some to close, as the fanout host does.
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = handler(request);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            match tls {
                None => {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            }
        });
    }
}

fn json(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Calls the upstream server has answered, for `GET /calls`.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A CA and a certificate for `localhost` made now, the CA's PEM written
/// to `dir/ca.pem` (for the aggregator's `ca_file`): the HTTPS upstreams.
pub fn tls_acceptor(dir: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Inventory, pricing and reviews on one port, each answering after `delay`;
/// with `faults`, a share of calls misbehave (see [`Fault::pick`]); with
/// `tls`, over HTTPS. `GET /calls` and `GET /connections` say how many
/// calls and connections it has had.
pub async fn upstreams(
    listener: TcpListener,
    delay: Duration,
    faults: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<()> {
    serve_maybe_tls(listener, tls, move |request| async move {
        use std::sync::atomic::Ordering;
        match request.uri().path() {
            "/calls" => return json(StatusCode::OK, &json!(CALLS.load(Ordering::Relaxed))),
            "/connections" => {
                return json(StatusCode::OK, &json!(CONNECTIONS.load(Ordering::Relaxed)));
            }
            _ => {}
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
        // Also the OTLP collector of `fanout-telemetry`: it takes the
        // export and answers an empty (fully successful) response.
        if request.uri().path() == "/v1/traces" {
            use http_body_util::BodyExt;
            let _ = request.into_body().collect().await;
            return Response::new(Full::new(Bytes::new()));
        }
        // A list to fan out over (the aggregation scenario): `/lists/100`
        // is `{"ids": ["1", ..., "100"]}`.
        let list = request
            .uri()
            .path()
            .strip_prefix("/lists/")
            .and_then(|n| n.parse::<usize>().ok())
            .map(
                |n| json!({ "ids": (1..=n.min(1000)).map(|i| i.to_string()).collect::<Vec<_>>() }),
            );
        let fault = if faults { Fault::pick() } else { Fault::None };
        let delay = match fault {
            // Past every budget: the guest times the call out.
            Fault::Hang => Duration::from_secs(5),
            Fault::Slow => Duration::from_millis(300),
            _ => delay,
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match fault {
            Fault::Unavailable => json(StatusCode::SERVICE_UNAVAILABLE, &json!({})),
            Fault::BadJson => Response::new(Full::new(Bytes::from_static(b"<html>oops</html>"))),
            _ => json(
                StatusCode::OK,
                &list.unwrap_or_else(|| {
                    fanout_host::demo::answer_for(
                        request.uri().path_and_query().map_or("/", |p| p.as_str()),
                    )
                }),
            ),
        }
    })
    .await
}

/// What a faulty upstream does with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// 5 %: 503 (retried by the guest).
    Unavailable,
    /// 2 %: 200 with a body that is not JSON.
    BadJson,
    /// 2 %: an answer 5 s late.
    Hang,
    /// 1 %: an answer 300 ms late, past the 200 ms budget.
    Slow,
}

impl Fault {
    pub fn pick() -> Fault {
        match fastrand::u32(0..100) {
            0..5 => Fault::Unavailable,
            5..7 => Fault::BadJson,
            7..9 => Fault::Hang,
            9..10 => Fault::Slow,
            _ => Fault::None,
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn merge(id: &str, parts: Vec<Option<Value>>) -> Option<Value> {
    let mut answer = json!({ "id": id, "degraded": [] });
    for ((_, field), part) in UPSTREAMS.iter().zip(parts) {
        answer[*field] = part?;
    }
    Some(answer)
}

/// The native baseline: the same aggregation with no wasm. tokio, hyper, and
/// the same pooled hyper-util client as the fanout host's `http` adapter;
/// the three calls run concurrently under the same 200 ms budget.
pub async fn native(listener: TcpListener, upstream: String) -> Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Arc<Client<HttpConnector, Empty<Bytes>>> = Arc::new(
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector),
    );
    let upstream = Arc::new(upstream);
    serve(listener, move |request| {
        let client = client.clone();
        let upstream = upstream.clone();
        async move {
            let Some(id) = request.uri().path().strip_prefix("/products/") else {
                return json(
                    StatusCode::NOT_FOUND,
                    &json!({"error": {"code": "not_found"}}),
                );
            };
            if !valid_id(id) {
                return json(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": {"code": "invalid_id"}}),
                );
            }
            let calls = UPSTREAMS.iter().map(|(path, _)| {
                let uri = format!("{upstream}/{path}/{id}");
                let client = client.clone();
                async move {
                    let response = client.get(uri.parse().ok()?).await.ok()?;
                    if !response.status().is_success() {
                        return None;
                    }
                    let body = response.into_body().collect().await.ok()?.to_bytes();
                    serde_json::from_slice::<Value>(&body).ok()
                }
            });
            match tokio::time::timeout(BUDGET, futures_util::future::join_all(calls)).await {
                Err(_) => json(
                    StatusCode::GATEWAY_TIMEOUT,
                    &json!({"error": {"code": "upstream_timeout"}}),
                ),
                Ok(parts) => match merge(id, parts) {
                    Some(answer) => json(StatusCode::OK, &answer),
                    None => json(
                        StatusCode::BAD_GATEWAY,
                        &json!({"error": {"code": "upstream_error"}}),
                    ),
                },
            }
        }
    })
    .await
}

/// The fanout host, as the `fanout` binary runs it, with the three upstreams
/// over HTTP; `guest_config` may set the guest to call them one by one.
/// Compiles the component before it returns.
/// How `serve-fanout` treats identical upstream GETs.
#[derive(Debug, Clone, Copy)]
pub enum Identical {
    /// Each request makes its own calls, as the native and the blocking
    /// aggregators' do: the comparison rows, where every request asks for
    /// the same product.
    CallEach,
    /// Identical calls in flight at once are made once.
    Coalesce,
    /// Coalesced, and answers stored for `ttl`.
    Cache { ttl: Duration },
}

/// How `serve-fanout` builds its host: its flags.
pub struct FanoutSetup {
    pub upstream: String,
    pub guest_config: Option<String>,
    pub max_instances: Option<u32>,
    pub cache_dir: Option<std::path::PathBuf>,
    pub fixed: bool,
    pub guest_threads: Option<usize>,
    /// Steps of nice the guest threads run below the connections'.
    pub guest_nice: u8,
    pub identical: Identical,
    /// HTTPS upstreams: the CA to trust and the `http2` mode.
    pub tls: Option<(std::path::PathBuf, String)>,
    /// One instance, fixed admission and no line: every request but the
    /// one running is shed (for the cost of a shed).
    pub shed_all: bool,
    /// Requests per instance; the default when `None`.
    pub instance_reuse: Option<u32>,
    /// Serve the guest's `wasi:http@0.3` build instead of the 0.2 one.
    pub p3: bool,
}

pub fn fanout(setup: FanoutSetup) -> Result<fanout_host::Fanout> {
    use fanout_host::adapters::{Http2, HttpOptions, HttpUpstream, TlsOptions};
    let FanoutSetup {
        upstream,
        guest_config,
        max_instances,
        cache_dir,
        fixed,
        guest_threads,
        guest_nice,
        identical,
        tls,
        shed_all,
        instance_reuse,
        p3,
    } = setup;
    let mut limits = fanout_host::Limits::default();
    if let Some(n) = instance_reuse {
        limits.instance_reuse = n;
    }
    if let Some(n) = max_instances {
        limits.max_instances = n;
    }
    let fixed = fixed || shed_all;
    if shed_all {
        limits.max_instances = 1;
        limits.queue_wait = Duration::ZERO;
    }
    let mut builder = fanout_host::Fanout::builder().limits(limits);
    if p3 {
        builder = builder.builtin_guest(fanout_host::WasiHttpVersion::P3);
    }
    match tls {
        None => {
            for name in ["inventory", "pricing", "reviews"] {
                builder = builder.http_upstream(name, &upstream);
            }
        }
        Some((ca_file, http2)) => {
            // One client for the three: one pool, as plain HTTP has.
            let client = HttpUpstream::with_tls(HttpOptions {
                http2: match http2.as_str() {
                    "always" => Http2::Always,
                    "never" => Http2::Never,
                    _ => Http2::Auto,
                },
                tls: TlsOptions {
                    ca_file: Some(ca_file),
                    ..TlsOptions::default()
                },
                ..HttpOptions::default()
            })?;
            for name in ["inventory", "pricing", "reviews"] {
                builder = builder.http_upstream_with(name, &upstream, client.clone());
            }
        }
    }
    if let Some(config) = guest_config {
        builder = builder.env("FANOUT_CONFIG", config);
    }
    if let Some(dir) = cache_dir {
        builder = builder.cache_dir(dir);
    }
    if fixed {
        builder = builder.admission(fanout_host::AdmissionMode::Fixed);
    }
    if let Some(threads) = guest_threads {
        builder = builder.guest_threads(threads).guest_nice(guest_nice);
    }
    match identical {
        Identical::CallEach => builder = builder.coalescing(false),
        Identical::Coalesce => {}
        Identical::Cache { ttl } => {
            for name in ["inventory", "pricing", "reviews"] {
                let config = fanout_host::response_cache::ResponseCacheConfig {
                    ttl,
                    ..Default::default()
                };
                builder = builder.response_cache(name, config);
            }
        }
    }
    Ok(builder.build()?)
}

/// The blocking anti-pattern, in the style of a WSGI server with sync
/// workers: a fixed pool of threads, each taking one connection at a time,
/// calling the three upstreams one after another with a blocking client,
/// answering, and closing the connection.
pub fn blocking(listener: std::net::TcpListener, upstream: String, workers: usize) -> Result<()> {
    let listener = Arc::new(listener);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(BUDGET))
        .http_status_as_error(false)
        .build()
        .into();
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.clone();
            let agent = agent.clone();
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                loop {
                    let Ok((mut stream, _)) = listener.accept() else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let _ = blocking_request(&mut stream, &agent, &upstream);
                }
            })
        })
        .collect();
    // The workers serve until the process is stopped.
    handles.into_iter().for_each(|h| {
        let _ = h.join();
    });
    anyhow::bail!("every blocking worker stopped")
}

fn blocking_request(
    stream: &mut std::net::TcpStream,
    agent: &ureq::Agent,
    upstream: &str,
) -> Result<()> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let path = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(_) = request.parse(&buffer)? {
            break request.path.unwrap_or("/").to_string();
        }
    };
    let (status, body) = match path.strip_prefix("/products/") {
        Some(id) if valid_id(id) => {
            let parts = UPSTREAMS
                .iter()
                .map(|(p, _)| {
                    let mut response = agent.get(format!("{upstream}/{p}/{id}")).call().ok()?;
                    if !response.status().is_success() {
                        return None;
                    }
                    serde_json::from_str::<Value>(&response.body_mut().read_to_string().ok()?).ok()
                })
                .collect();
            match merge(id, parts) {
                Some(answer) => (200, answer),
                None => (502, json!({"error": {"code": "upstream_error"}})),
            }
        }
        Some(_) => (400, json!({"error": {"code": "invalid_id"}})),
        None => (404, json!({"error": {"code": "not_found"}})),
    };
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}

/// Installs the `fanout` binary's telemetry: JSON log lines on stdout
/// (queued for a thread of their own, as the binary's are) and OTLP span
/// export to `collector`. Dropped, the guard writes out the last lines and
/// the exporter flushes.
pub fn telemetry(
    collector: &str,
) -> Result<(
    fanout_host::stdout_log::WorkerGuard,
    fanout_host::telemetry::Otlp,
)> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, Registry};
    let otlp = fanout_host::telemetry::Otlp::to_endpoint(collector)?;
    let filter = EnvFilter::new("info")
        .add_directive(format!("{}=off", fanout_host::telemetry::SPAN_TARGET).parse()?);
    let (writer, flush_at_exit) =
        fanout_host::stdout_log::writer(fanout_host::stdout_log::DEFAULT_BUFFERED_LINES);
    let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_filter(filter)
            .boxed(),
        otlp.layer(),
    ];
    tracing_subscriber::registry().with(layers).try_init()?;
    Ok((flush_at_exit, otlp))
}
