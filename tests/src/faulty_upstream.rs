//! An upstream that misbehaves below and above HTTP, one fault at a time,
//! on 127.0.0.1 port 0. It speaks HTTP/1.1 by hand (one request per
//! connection) so that it can break the protocol where hyper would not.

use anyhow::Result;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the upstream does with each request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Nothing listens: connections are refused.
    Refuse,
    /// Announces a 1000-byte body, sends 10 bytes, then resets.
    ResetMidBody,
    /// Reads the request and never answers.
    Hang,
    /// Sends a valid answer one byte every `0` apart.
    SlowBody(Duration),
    /// Answers this status with an empty JSON object.
    Status(u16),
    /// Answers this status (429, 503) with `Retry-After: <value>`.
    Throttle(u16, &'static str),
    /// Answers 200 with a body that is not JSON.
    BadJson,
    /// Answers 200 with a JSON object of this many bytes.
    Oversized(usize),
    /// Odd calls answer 503, even ones 200.
    Flaky,
}

/// The faulty upstream. It stops when dropped.
pub struct FaultyUpstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    server: Option<JoinHandle<()>>,
}

impl FaultyUpstream {
    pub async fn start(fault: Fault) -> Result<FaultyUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicUsize::new(0));
        if let Fault::Refuse = fault {
            // The port was free a moment ago and nothing listens on it now.
            drop(listener);
            return Ok(FaultyUpstream {
                addr,
                calls,
                server: None,
            });
        }
        let server = tokio::spawn({
            let calls = calls.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::spawn(misbehave(stream, fault.clone(), call));
                }
            }
        });
        Ok(FaultyUpstream {
            addr,
            calls,
            server: Some(server),
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted: one per call.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

fn answer(status: u16, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

async fn misbehave(mut stream: TcpStream, fault: Fault, call: usize) -> std::io::Result<()> {
    // The request head (the guest's GETs have no body).
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let ok = r#"{"amount": 12.5, "currency": "EUR"}"#;
    match fault {
        Fault::Refuse => {}
        Fault::ResetMidBody => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(br#"{"amount":"#).await?;
            stream.flush().await?;
            // Linger 0: close with a reset, not a clean end. (Deprecated
            // because a non-zero linger blocks on drop; zero does not.)
            #[allow(deprecated)]
            stream.set_linger(Some(Duration::ZERO))?;
            drop(stream);
            return Ok(());
        }
        Fault::Hang => {
            std::future::pending::<()>().await;
        }
        Fault::SlowBody(gap) => {
            for byte in answer(200, "", ok).bytes() {
                stream.write_all(&[byte]).await?;
                stream.flush().await?;
                tokio::time::sleep(gap).await;
            }
        }
        Fault::Status(status) => {
            stream
                .write_all(answer(status, "", "{}").as_bytes())
                .await?
        }
        Fault::Throttle(status, after) => {
            let extra = format!("retry-after: {after}\r\n");
            stream
                .write_all(answer(status, &extra, "{}").as_bytes())
                .await?
        }
        Fault::BadJson => {
            stream
                .write_all(answer(200, "", "<html>not json</html>").as_bytes())
                .await?
        }
        Fault::Oversized(bytes) => {
            let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(bytes));
            stream.write_all(answer(200, "", &body).as_bytes()).await?
        }
        Fault::Flaky => {
            let status = if call % 2 == 1 { 503 } else { 200 };
            let body = if status == 200 { ok } else { "{}" };
            stream
                .write_all(answer(status, "", body).as_bytes())
                .await?
        }
    }
    stream.shutdown().await
}
