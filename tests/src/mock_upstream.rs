//! Mock upstreams on 127.0.0.1 port 0 that record what they saw.

use crate::{TestHost, cache_dir};
use anyhow::Result;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
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

/// How a mock answers: a status, fields and a body, after a delay.
#[derive(Clone)]
pub struct Behaviour {
    pub delay: Duration,
    pub status: StatusCode,
    pub body: String,
    /// Fields of the answer beyond `content-type: application/json`.
    pub headers: Vec<(String, String)>,
}

impl Behaviour {
    /// Answers `status` with an empty JSON object, at once.
    pub fn status(status: u16) -> Behaviour {
        Behaviour {
            delay: Duration::ZERO,
            status: StatusCode::from_u16(status).expect("a valid status"),
            body: "{}".into(),
            headers: Vec::new(),
        }
    }

    /// The same, with one more field in the answer.
    pub fn with_header(mut self, name: &str, value: &str) -> Behaviour {
        self.headers.push((name.into(), value.into()));
        self
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
            headers: Vec::new(),
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
            path: request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
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
    for (name, value) in &behaviour.headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("a field name"),
            value.parse().expect("a field value"),
        );
    }
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
        crate::builder()
            .cache_dir(cache_dir())
            .http_upstream("inventory", self.inventory.base_url())
            .http_upstream("pricing", self.pricing.base_url())
            .http_upstream("reviews", self.reviews.base_url())
    }

    /// The built-in product route as `FANOUT_CONFIG`, with each attempt
    /// allowed `attempt_timeout`: for upstreams slower than the default
    /// per-attempt timeout (150 ms) that should be answered, not retried.
    pub fn route_with_attempt_timeout(attempt_timeout: Duration) -> String {
        let upstream = |name: &str, field: &str, required: bool| {
            serde_json::json!({"name": name, "url": format!("{{base}}/{name}/{{id}}"),
                "field": field, "required": required,
                "timeout_ms": attempt_timeout.as_millis() as u64})
        };
        serde_json::json!({"routes": [{"path": "/products/{id}", "upstreams": [
            upstream("inventory", "inventory", true),
            upstream("pricing", "price", true),
            upstream("reviews", "reviews", false),
        ]}]})
        .to_string()
    }

    /// A test host with the three as its upstreams and nothing else set.
    pub async fn host(&self) -> Result<TestHost> {
        TestHost::start(self.builder().build()?).await
    }
}
