//! Test support: mock upstreams on port 0 that record what they saw, and the
//! fanout host started in-process on port 0.

use anyhow::{Context, Result};
use bytes::Bytes;
use fanout_host::Fanout;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One request as a mock upstream saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub headers: HeaderMap,
    pub started: Instant,
    /// When the answer was sent; `None` if the caller went away first.
    pub finished: Option<Instant>,
    /// When the mock stopped working on it: answered, or cut off because the
    /// caller went away. `None` while still in progress.
    pub ended: Option<Instant>,
}

impl Call {
    /// The caller went away before the answer was ready.
    pub fn cut_off(&self) -> bool {
        self.ended.is_some() && self.finished.is_none()
    }
}

/// How a mock answers: a status and a body, after a delay.
#[derive(Clone)]
pub struct Behaviour {
    pub delay: Duration,
    pub status: StatusCode,
    pub body: String,
}

impl Behaviour {
    /// Answers `status` with an empty JSON object, at once.
    pub fn status(status: u16) -> Behaviour {
        Behaviour {
            delay: Duration::ZERO,
            status: StatusCode::from_u16(status).expect("a valid status"),
            body: "{}".into(),
        }
    }

    /// Never answers in any test's time.
    pub fn hang() -> Behaviour {
        Behaviour::json(Duration::from_secs(3600), serde_json::json!({}))
    }

    pub fn json(delay: Duration, body: serde_json::Value) -> Behaviour {
        Behaviour {
            delay,
            status: StatusCode::OK,
            body: body.to_string(),
        }
    }
}

#[derive(Default)]
struct MockState {
    calls: Mutex<Vec<Call>>,
    /// Behaviours for the next calls, before the standing one applies.
    script: Mutex<std::collections::VecDeque<Behaviour>>,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// An HTTP upstream on 127.0.0.1 port 0. It stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<MockState>,
    behaviour: Arc<Mutex<Behaviour>>,
    _server: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl MockUpstream {
    pub async fn start(behaviour: Behaviour) -> Result<MockUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState::default());
        let behaviour = Arc::new(Mutex::new(behaviour));
        let server = tokio::spawn({
            let state = state.clone();
            let behaviour = behaviour.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    let state = state.clone();
                    let behaviour = behaviour.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            serve(state.clone(), behaviour.clone(), request)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Ok(MockUpstream {
            addr,
            state,
            behaviour,
            _server: AbortOnDrop(server),
        })
    }

    /// The standard answers of the product upstreams.
    pub async fn inventory(delay: Duration) -> Result<MockUpstream> {
        Self::start(Behaviour::json(
            delay,
            serde_json::json!({"in_stock": true, "quantity": 3}),
        ))
        .await
    }

    pub async fn pricing(delay: Duration) -> Result<MockUpstream> {
        Self::start(Behaviour::json(
            delay,
            serde_json::json!({"amount": 12.5, "currency": "EUR"}),
        ))
        .await
    }

    pub async fn reviews(delay: Duration) -> Result<MockUpstream> {
        Self::start(Behaviour::json(
            delay,
            serde_json::json!({"rating": 4.2, "count": 17}),
        ))
        .await
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    /// The next calls behave like `script`, in order; then the standing
    /// behaviour applies again.
    pub fn script(&self, script: Vec<Behaviour>) {
        self.state.script.lock().unwrap().extend(script);
    }

    /// Requests being worked on right now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn serve(
    state: Arc<MockState>,
    behaviour: Arc<Mutex<Behaviour>>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let scripted = state.script.lock().unwrap().pop_front();
    let behaviour = scripted.unwrap_or_else(|| behaviour.lock().unwrap().clone());
    let index = {
        let mut calls = state.calls.lock().unwrap();
        calls.push(Call {
            path: request.uri().path().to_string(),
            headers: request.headers().clone(),
            started: Instant::now(),
            finished: None,
            ended: None,
        });
        calls.len() - 1
    };
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Runs even if the caller hangs up and hyper drops this future.
    let _work = EndOfWork {
        state: &state,
        index,
    };
    tokio::time::sleep(behaviour.delay).await;
    state.calls.lock().unwrap()[index].finished = Some(Instant::now());
    let mut response = hyper::Response::new(Full::new(Bytes::from(behaviour.body)));
    *response.status_mut() = behaviour.status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

struct EndOfWork<'a> {
    state: &'a MockState,
    index: usize,
}

impl Drop for EndOfWork<'_> {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.state.calls.lock().unwrap()[self.index].ended = Some(Instant::now());
    }
}

/// The three product upstreams, each answering after `delay`.
pub struct ProductUpstreams {
    pub inventory: MockUpstream,
    pub pricing: MockUpstream,
    pub reviews: MockUpstream,
}

impl ProductUpstreams {
    pub async fn start(delay: Duration) -> Result<ProductUpstreams> {
        Ok(ProductUpstreams {
            inventory: MockUpstream::inventory(delay).await?,
            pricing: MockUpstream::pricing(delay).await?,
            reviews: MockUpstream::reviews(delay).await?,
        })
    }

    /// A host builder with the three registered as HTTP upstreams.
    pub fn builder(&self) -> fanout_host::FanoutBuilder {
        Fanout::builder()
            .cache_dir(cache_dir())
            .http_upstream("inventory", self.inventory.base_url())
            .http_upstream("pricing", self.pricing.base_url())
            .http_upstream("reviews", self.reviews.base_url())
    }
}

/// A compiled-component cache shared by the tests: each test builds its own
/// host, and compiling the component for each would dominate the suite.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("fanout-test-component-cache")
}

/// The fanout host serving on 127.0.0.1 port 0. Dropping it shuts it down.
pub struct TestHost {
    pub addr: SocketAddr,
    pub fanout: Fanout,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl TestHost {
    pub async fn start(fanout: Fanout) -> Result<TestHost> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let fanout = fanout.clone();
            async move {
                fanout
                    .serve(listener, async {
                        let _ = stop.await;
                    })
                    .await
            }
        });
        Ok(TestHost {
            addr,
            fanout,
            shutdown: Some(shutdown),
            server: Some(server),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends `method path` and returns the status, headers and JSON body.
    pub async fn request(&self, method: &str, path: &str) -> Result<Answer> {
        self.send(method, path, &[]).await
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Answer> {
        let mut request = http::Request::builder().method(method).uri(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new())?;
        let started = Instant::now();
        let response = self.client.request(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        let elapsed = started.elapsed();
        let json = serde_json::from_slice(&body).with_context(|| {
            format!(
                "{method} {path}: {status} body is not JSON: {:?}",
                String::from_utf8_lossy(&body)
            )
        })?;
        Ok(Answer {
            status,
            headers,
            json,
            elapsed,
        })
    }

    /// `GET path` as it comes, for bodies that are not JSON: the head, the
    /// body or the error that cut it off, and the time to the body's end.
    pub async fn get_raw(
        &self,
        path: &str,
    ) -> Result<(http::response::Parts, Result<Bytes, hyper::Error>, Duration)> {
        let request = http::Request::get(self.url(path)).body(Empty::new())?;
        let started = Instant::now();
        let (head, body) = self.client.request(request).await?.into_parts();
        let body = body.collect().await.map(|collected| collected.to_bytes());
        Ok((head, body, started.elapsed()))
    }

    pub async fn get(&self, path: &str) -> Result<Answer> {
        self.request("GET", path).await
    }

    /// `GET path` with extra request headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<Answer> {
        self.send("GET", path, headers).await
    }

    /// Stops accepting, waits for in-flight requests, returns serve's result.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await??;
        }
        Ok(())
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A decoded answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: serde_json::Value,
    pub elapsed: Duration,
}

impl Answer {
    /// The `error.code` of a JSON error body, or "" if there is none.
    pub fn error_code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or_default()
    }
}

/// Captures the log events of the calling thread as JSON lines, from now
/// until the thread ends. `#[tokio::test]` runs all the tasks of a test on
/// the test's own thread, so this sees that test's host events only.
///
/// One global subscriber routes events to per-thread buffers. (A per-thread
/// `set_default` subscriber misses events whose callsite interest another
/// test thread cached first.)
pub fn capture_logs() -> Logs {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| ThreadLogs(CAPTURE.with(|c| c.borrow().clone())))
            .try_init();
    });
    let logs = Logs::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(logs.clone()));
    logs
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// Log lines captured by [`capture_logs`].
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Every captured event, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|line| serde_json::from_str(line).expect("log lines are JSON"))
            .collect()
    }
}

/// The writer for one event: the calling thread's buffer, if it captures.
struct ThreadLogs(Option<Logs>);

impl std::io::Write for ThreadLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(logs) = &self.0 {
            logs.0.lock().unwrap().extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An OTLP/HTTP collector on 127.0.0.1 port 0 that decodes the protobuf
/// span exports it receives. It runs on its own thread and runtime, so a
/// test can block on the exporter's flush without stalling it. It stops when
/// dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One span as the collector received it, with its resource's service name.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: Option<String>,
    pub span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl ReceivedSpan {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// An attribute's value as a string (ints printed in decimal), if set.
    pub fn attribute(&self, key: &str) -> Option<String> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        Some(match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl OtlpReceiver {
    pub fn start() -> Result<OtlpReceiver> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn({
            let spans = spans.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the OTLP receiver");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("a tokio listener");
                    let accept = async {
                        while let Ok((stream, _)) = listener.accept().await {
                            let spans = spans.clone();
                            tokio::spawn(async move {
                                let service = hyper::service::service_fn(move |request| {
                                    receive(spans.clone(), request)
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            }
        });
        Ok(OtlpReceiver {
            addr,
            spans,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The base URL an exporter is pointed at (`/v1/traces` is appended).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn receive(
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let answer = |status: StatusCode, body: &str| {
        let mut response = http::Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        Ok(response)
    };
    if request.uri().path() != "/v1/traces" {
        return answer(StatusCode::NOT_FOUND, "only /v1/traces");
    }
    let Ok(body) = request.into_body().collect().await else {
        return answer(StatusCode::BAD_REQUEST, "unreadable body");
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return answer(StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest");
    };
    let mut received = spans.lock().unwrap();
    for resource_spans in export.resource_spans {
        let service = resource_spans.resource.as_ref().and_then(|r| {
            r.attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                        Some(s.clone())
                    }
                    _ => None,
                })
        });
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse: full success.
    let mut response = http::Response::new(Full::new(Bytes::new()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(response)
}
