//! The fanout host started in-process on 127.0.0.1 port 0, and a client for it.

use anyhow::{Context, Result};
use bytes::Bytes;
use fanout_host::Fanout;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A compiled-component cache shared by the tests: each test builds its own
/// host, and compiling the component for each would dominate the suite.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("fanout-test-component-cache")
}

/// The value of the series `name{labels}` in a Prometheus text exposition.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
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

    /// The host's stats once no request holds an instance (5 s at most): a
    /// request's counts land just after its answer's last byte is out, so a
    /// client may have its answer a moment before.
    pub async fn settled_stats(&self) -> fanout_host::StatsSnapshot {
        let until = Instant::now() + Duration::from_secs(5);
        while self.fanout.stats().instances_in_use > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.fanout.stats()
    }

    /// The value of the series `name{labels}` in the host's metrics now.
    pub fn metric(&self, series: &str) -> Option<f64> {
        sample(&self.fanout.metrics().encode(), series)
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

/// `GET url` with `headers` on a fresh client, for servers other than a
/// [`TestHost`] (`wasmtime serve`, `jco serve`): the status, the headers,
/// the JSON body and the time to its end.
pub async fn get_json(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, HeaderMap, serde_json::Value, Duration)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let started = Instant::now();
    let response = client.request(request.body(Empty::new())?).await?;
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.into_body().collect().await?.to_bytes();
    let elapsed = started.elapsed();
    let json = serde_json::from_slice(&body)
        .with_context(|| format!("not JSON: {:?}", String::from_utf8_lossy(&body)))?;
    Ok((status, headers, json, elapsed))
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
