//! A deliberately badly behaved `wasi:http/proxy` component, one misdeed per
//! route, so that the host's limits can be tested one at a time and a normal
//! request (`/ok`) can follow each.
//!
//! - `/ok`: answers 200.
//! - `/loop`: spins on the CPU forever (fuel, epoch deadline).
//! - `/hog`: allocates until memory runs out (memory cap).
//! - `/panic`: panics (trap).
//! - `/park`: waits forever without computing (wall-clock deadline).
//! - `/print`: writes to stdout and stderr, then answers 200.
//! - `/call?<url>`: fetches `<url>`, with the request's `authorization` and
//!   `x-api-key` copied on (trying to set the host's credentials), and
//!   reports the outcome (outbound policy, credentials).
//! - `/env`: answers its whole environment (looking for secrets).
//! - `/stream?<n>`: streams `n` bytes (byte `i` is `i % 251`) in 16 KiB
//!   pieces with a pause between them, so that the host sees a body that is
//!   still being written.
//! - `/stall`: sends the head and one piece of the body, then waits forever.
//! - `/post?<n>&<url>`: POSTs `n` bytes to `<url>` and reports the outcome.
//! - `/resources?<n>`: creates `n` host resources (header fields) and holds
//!   them all (the resource table's cap).
//!
//! And for instance reuse, where a guest's statics outlive a request:
//! - `/remember?<text>`: keeps `<text>` and answers what the instance's
//!   previous `/remember` kept (`null` in a fresh instance).
//! - `/burn?<n>`: computes for `n` rounds (fuel), then answers 200.
//! - `/leak?<kib>`: leaks `kib` KiB of touched memory, then answers 200.
//! - `/keep?<n>`: leaves `n` host resources behind in a static, then
//!   answers 200.

#![cfg(target_arch = "wasm32")]
// `wstd::http_server` also emits a `fn main` for bin crates; unused here.
#![allow(dead_code)]

use std::cell::RefCell;
use std::hint::black_box;
use wstd::http::{Body, Client, ErrorCode, Request, Response, StatusCode};

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, wstd::http::Error> {
    let answer = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body))
    };
    match request.uri().path() {
        "/ok" => Ok(answer(StatusCode::OK, r#"{"ok":true}"#.into())?),
        "/loop" => {
            let mut x: u64 = 0;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }
        "/hog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch one byte per page: the memory is really used, at
                // little fuel, so the memory cap is what stops this.
                let mut chunk = vec![0u8; 1 << 20];
                for page in (0..chunk.len()).step_by(4096) {
                    chunk[page] = 1;
                }
                hoard.push(black_box(chunk));
            }
        }
        "/panic" => panic!("hostile guest panics on purpose"),
        "/park" => {
            wstd::task::sleep(wstd::time::Duration::from_secs(3600)).await;
            Ok(answer(StatusCode::OK, "{}".into())?)
        }
        "/print" => {
            println!("hello from the guest's stdout");
            eprintln!("hello from the guest's stderr");
            Ok(answer(StatusCode::OK, "{}".into())?)
        }
        "/call" => {
            let url = request.uri().query().unwrap_or_default().to_string();
            let mut outgoing = Request::get(&url);
            for name in ["authorization", "x-api-key"] {
                if let Some(value) = request.headers().get(name) {
                    outgoing = outgoing.header(name, value);
                }
            }
            let sent = Client::new().send(outgoing.body(Body::empty())?).await;
            Ok(answer(StatusCode::OK, outcome(sent))?)
        }
        "/env" => {
            let env: Vec<String> = std::env::vars()
                .map(|(k, v)| format!("{k:?}:{v:?}"))
                .collect();
            Ok(answer(StatusCode::OK, format!("{{{}}}", env.join(",")))?)
        }
        "/post" => {
            let query = request.uri().query().unwrap_or_default().to_string();
            let (n, url) = query.split_once('&').unwrap_or(("0", ""));
            let body = vec![b'x'; n.parse()?];
            let sent = Client::new()
                .send(Request::post(url).body(Body::from(body))?)
                .await;
            Ok(answer(StatusCode::OK, outcome(sent))?)
        }
        "/resources" => {
            let n: usize = request.uri().query().unwrap_or("0").parse()?;
            let held: Vec<_> = (0..n).map(|_| wasip2::http::types::Fields::new()).collect();
            Ok(answer(
                StatusCode::OK,
                format!(r#"{{"held":{}}}"#, black_box(held).len()),
            )?)
        }
        "/stream" => {
            let total: usize = request.uri().query().unwrap_or("0").parse()?;
            let pieces = futures_lite::stream::unfold(0usize, move |sent| async move {
                if sent >= total {
                    return None;
                }
                if sent > 0 {
                    wstd::task::sleep(wstd::time::Duration::from_millis(1)).await;
                }
                let end = total.min(sent + (16 << 10));
                let piece: Vec<u8> = (sent..end).map(|i| (i % 251) as u8).collect();
                Some((piece, end))
            });
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/octet-stream")
                .body(Body::from_stream(pieces))?)
        }
        "/stall" => {
            let pieces = futures_lite::stream::unfold(false, |sent| async move {
                if sent {
                    wstd::task::sleep(wstd::time::Duration::from_secs(3600)).await;
                    return None;
                }
                Some((b"partial".to_vec(), true))
            });
            Ok(Response::builder()
                .status(StatusCode::OK)
                .body(Body::from_stream(pieces))?)
        }
        "/remember" => {
            let text = request.uri().query().unwrap_or_default().to_string();
            let previous = REMEMBERED.with(|kept| kept.replace(Some(text)));
            let previous = previous.map_or("null".into(), |p| format!("{p:?}"));
            Ok(answer(
                StatusCode::OK,
                format!(r#"{{"previous":{previous}}}"#),
            )?)
        }
        "/burn" => {
            let rounds: u64 = request.uri().query().unwrap_or("0").parse()?;
            let mut x: u64 = 0;
            for _ in 0..rounds {
                x = black_box(x.wrapping_add(1));
            }
            Ok(answer(StatusCode::OK, format!(r#"{{"rounds":{x}}}"#))?)
        }
        "/leak" => {
            let kib: usize = request.uri().query().unwrap_or("0").parse()?;
            let mut chunk = vec![0u8; kib << 10];
            for page in (0..chunk.len()).step_by(4096) {
                chunk[page] = 1;
            }
            std::mem::forget(black_box(chunk));
            Ok(answer(StatusCode::OK, "{}".into())?)
        }
        "/keep" => {
            let n: usize = request.uri().query().unwrap_or("0").parse()?;
            KEPT.with(|kept| {
                let mut kept = kept.borrow_mut();
                kept.extend((0..n).map(|_| wasip2::http::types::Fields::new()));
            });
            Ok(answer(StatusCode::OK, "{}".into())?)
        }
        _ => Ok(answer(StatusCode::NOT_FOUND, "{}".into())?),
    }
}

thread_local! {
    /// What `/remember` kept: state that outlives a request.
    static REMEMBERED: RefCell<Option<String>> = const { RefCell::new(None) };
    /// What `/keep` left behind.
    static KEPT: RefCell<Vec<wasip2::http::types::Fields>> = const { RefCell::new(Vec::new()) };
}

/// What an outgoing call came to, as JSON: its status, or its error code.
fn outcome(sent: Result<Response<Body>, wstd::http::Error>) -> String {
    match sent {
        Ok(response) => format!(r#"{{"status":{}}}"#, response.status().as_u16()),
        Err(e) => match e.downcast_ref::<ErrorCode>() {
            Some(code) => format!(r#"{{"error":"{code:?}"}}"#),
            None => format!(r#"{{"error":{:?}}}"#, e.to_string()),
        },
    }
}
