//! The built-in upstream adapters.
//!
//! | adapter | what it is for |
//! |---|---|
//! | [`HttpUpstream`] | real HTTP/1.1 on a pooled keep-alive client |
//! | [`FixtureUpstream`] | JSON answers from files keyed by path: demos, contract tests |
//! | [`from_fn`] | an in-process async closure: no network hop for an embedding app |
//! | [`SimulatedUpstream`] | a latency distribution plus error and hang rates: demos, benchmarks, fault injection |

use crate::error::client_error;
use crate::upstream::{TransportError, Upstream, UpstreamBody, UpstreamFuture, UpstreamResult};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi_http::RequestOptions;

/// How long a new TCP connection to an upstream may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled connection is kept for reuse, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream authority.
pub const POOL_MAX_IDLE_PER_HOST: usize = 512;

/// Settings of an [`HttpUpstream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Longest wait for the response head; `None`: only the guest's own
    /// first-byte timeout applies.
    pub response_timeout: Option<Duration>,
    pub idle_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Real HTTP/1.1 on a pooled, keep-alive client (hyper-util's).
///
/// Cloning is cheap and clones share the connection pool, which is keyed by
/// authority: one client can serve every upstream.
#[derive(Clone)]
pub struct HttpUpstream {
    client: Client<HttpConnector, UpstreamBody>,
    response_timeout: Option<Duration>,
}

impl Default for HttpUpstream {
    fn default() -> Self {
        HttpUpstream::new(HttpOptions::default())
    }
}

impl HttpUpstream {
    pub fn new(options: HttpOptions) -> HttpUpstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(options.connect_timeout));
        // Small JSON requests and answers: Nagle's delay would dominate.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(options.idle_timeout)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        HttpUpstream {
            client,
            response_timeout: options.response_timeout,
        }
    }
}

impl Upstream for HttpUpstream {
    fn call(&self, request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture {
        let response = self.client.request(request);
        // The pooled client has one connect timeout for all requests; the
        // response head waits for the tightest of the guest's options and
        // this upstream's own response timeout.
        let guest = match (options.connect_timeout, options.first_byte_timeout) {
            (Some(c), Some(f)) => Some(c + f),
            (c, f) => c.or(f),
        };
        let head_timeout = match (guest, self.response_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Box::pin(async move {
            let response = match head_timeout {
                Some(limit) => tokio::time::timeout(limit, response)
                    .await
                    .map_err(|_| TransportError::HttpResponseTimeout)?,
                None => response.await,
            };
            let response = response.map_err(client_error)?;
            Ok(response.map(|body| body.map_err(TransportError::from).boxed_unsync()))
        })
    }
}

struct FnUpstream<F>(Arc<F>);

impl<F, Fut> Upstream for FnUpstream<F>
where
    F: Fn(Request<UpstreamBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = UpstreamResult> + Send + 'static,
{
    fn call(&self, request: Request<UpstreamBody>, _options: RequestOptions) -> UpstreamFuture {
        let f = self.0.clone();
        Box::pin(async move {
            let request = read_body(request).await?;
            f(request).await
        })
    }
}

/// Reads the whole request body before answering, as a server on the other
/// end of a socket would: the guest is still writing it, and dropping it
/// early would fail the guest's write.
async fn read_body(
    request: Request<UpstreamBody>,
) -> Result<Request<UpstreamBody>, TransportError> {
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok(Request::from_parts(parts, full(bytes)))
}

fn full(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An in-process upstream from an async closure: no socket, no serialisation
/// beyond the body bytes.
pub fn from_fn<F, Fut>(f: F) -> Arc<dyn Upstream>
where
    F: Fn(Request<UpstreamBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = UpstreamResult> + Send + 'static,
{
    Arc::new(FnUpstream(Arc::new(f)))
}

/// A JSON answer, for in-process upstreams.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<UpstreamBody> {
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// JSON answers keyed by request path: `GET /inventory/42` answers the file
/// `inventory/42.json` under the fixture directory, or 404.
pub struct FixtureUpstream {
    answers: HashMap<String, Bytes>,
}

impl FixtureUpstream {
    /// Loads every `*.json` file under `dir`. Each must be valid JSON: a
    /// broken fixture is a start-up error, not a failing request.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<FixtureUpstream, crate::Error> {
        let dir = dir.as_ref();
        let mut answers = HashMap::new();
        let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
        let io = |path: &Path, e: std::io::Error| crate::Error::Fixture {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        while let Some(current) = pending.pop() {
            for entry in std::fs::read_dir(&current).map_err(|e| io(&current, e))? {
                let path = entry.map_err(|e| io(&current, e))?.path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
                serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| {
                    crate::Error::Fixture {
                        path: path.clone(),
                        reason: format!("invalid JSON: {e}"),
                    }
                })?;
                let key = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .with_extension("")
                    .to_string_lossy()
                    .replace('\\', "/");
                answers.insert(format!("/{key}"), Bytes::from(bytes));
            }
        }
        if answers.is_empty() {
            return Err(crate::Error::Fixture {
                path: dir.to_path_buf(),
                reason: "no *.json files".into(),
            });
        }
        Ok(FixtureUpstream { answers })
    }

    /// Fixtures from memory: path (`/inventory/42`) to answer.
    pub fn from_map(
        answers: impl IntoIterator<Item = (String, serde_json::Value)>,
    ) -> FixtureUpstream {
        FixtureUpstream {
            answers: answers
                .into_iter()
                .map(|(path, value)| (path, Bytes::from(value.to_string())))
                .collect(),
        }
    }
}

impl Upstream for FixtureUpstream {
    fn call(&self, request: Request<UpstreamBody>, _options: RequestOptions) -> UpstreamFuture {
        let answer = self.answers.get(request.uri().path()).cloned();
        let path = request.uri().path().to_string();
        Box::pin(async move {
            read_body(request).await?;
            Ok(match answer {
                Some(bytes) => {
                    let mut response = Response::new(full(bytes));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": { "code": "no_fixture", "message": format!("no fixture for {path}") } }),
                ),
            })
        })
    }
}

/// A latency distribution for [`SimulatedUpstream`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    /// Uniform in `[min, max]`.
    Uniform {
        min: Duration,
        max: Duration,
    },
    /// Log-normal: the typical shape of service latency, with a long tail.
    /// `median` is its median, `sigma` the standard deviation of its log.
    LogNormal {
        median: Duration,
        sigma: f64,
    },
}

impl Latency {
    pub fn sample(&self) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                let span = max.saturating_sub(min).as_micros() as u64;
                min + Duration::from_micros(fastrand::u64(0..=span))
            }
            Latency::LogNormal { median, sigma } => {
                // Box-Muller: one standard normal from two uniforms.
                let u1 = fastrand::f64().max(f64::MIN_POSITIVE);
                let u2 = fastrand::f64();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                median.mul_f64((sigma * z).exp().min(1e4))
            }
        }
    }
}

/// A fake upstream: answers after a sampled latency, fails with a 503 at
/// `error_rate`, never answers at `hang_rate`. The body is generated from
/// the request path, the same for the same path.
pub struct SimulatedUpstream {
    pub latency: Latency,
    pub error_rate: f64,
    pub hang_rate: f64,
    body: fn(&str) -> serde_json::Value,
}

impl SimulatedUpstream {
    pub fn new(latency: Latency) -> SimulatedUpstream {
        SimulatedUpstream {
            latency,
            error_rate: 0.0,
            hang_rate: 0.0,
            body: crate::demo::answer_for,
        }
    }

    pub fn error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    pub fn hang_rate(mut self, rate: f64) -> Self {
        self.hang_rate = rate;
        self
    }

    /// Answers with `body(path)` instead of the demo data.
    pub fn body(mut self, body: fn(&str) -> serde_json::Value) -> Self {
        self.body = body;
        self
    }
}

impl Upstream for SimulatedUpstream {
    fn call(&self, request: Request<UpstreamBody>, _options: RequestOptions) -> UpstreamFuture {
        let latency = self.latency.sample();
        let roll = fastrand::f64();
        let hang = roll < self.hang_rate;
        let error = !hang && roll < self.hang_rate + self.error_rate;
        let body = (self.body)(request.uri().path());
        Box::pin(async move {
            read_body(request).await?;
            if hang {
                // The caller's timeout or deadline ends this.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(latency).await;
            Ok(if error {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "error": { "code": "injected_fault", "message": "simulated failure" } }),
                )
            } else {
                json_response(StatusCode::OK, &body)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_distributions_stay_in_shape() {
        let ms = Duration::from_millis;
        assert_eq!(Latency::Fixed(ms(7)).sample(), ms(7));
        for _ in 0..1000 {
            let d = Latency::Uniform {
                min: ms(20),
                max: ms(40),
            }
            .sample();
            assert!((ms(20)..=ms(40)).contains(&d), "{d:?}");
        }
        let mut samples: Vec<Duration> = (0..20_000)
            .map(|_| {
                Latency::LogNormal {
                    median: ms(40),
                    sigma: 0.5,
                }
                .sample()
            })
            .collect();
        samples.sort();
        let median = samples[samples.len() / 2];
        assert!((ms(37)..=ms(43)).contains(&median), "median {median:?}");
        // exp(0.5 * 2.326) ~ 3.2: the p99 sits about 3.2x the median.
        let p99 = samples[samples.len() * 99 / 100];
        assert!((ms(110)..=ms(150)).contains(&p99), "p99 {p99:?}");
    }
}
