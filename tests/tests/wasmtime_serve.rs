//! The same component under `wasmtime serve`: no fanout host at all, the
//! component's own requests going straight to mock upstreams on port 0.
//!
//! Needs `wasmtime` 48.0.8 on PATH (`.ci/run` installs it). Outside CI a
//! missing binary skips these tests, saying so; in CI (`CI` is set) it fails
//! them.

use anyhow::{Context, Result, bail};
use fanout_tests::{Behaviour, MS, ProductUpstreams};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WASMTIME_VERSION: &str = "48.0.8";

/// One `wasmtime serve` at a time: each compiles the component at start
/// with cranelift on every core, and five at once on two cores slow every
/// test down. (The "connection reset" these tests showed now and then under
/// load was the guest's, not contention's: see
/// `a_host_that_drops_the_request_body_at_once_does_not_fail_the_call`.)
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `wasmtime serve -Scli` running the guest component.
struct WasmtimeServe {
    child: Child,
    base: String,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl WasmtimeServe {
    /// Starts it with the upstreams' base URLs and `extra` environment; `None`
    /// when wasmtime is not installed outside CI.
    async fn start(upstreams: &ProductUpstreams, extra: &[(&str, &str)]) -> Result<Option<Self>> {
        let env = [
            ("FANOUT_UPSTREAM_INVENTORY", upstreams.inventory.base_url()),
            ("FANOUT_UPSTREAM_PRICING", upstreams.pricing.base_url()),
            ("FANOUT_UPSTREAM_REVIEWS", upstreams.reviews.base_url()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
        WasmtimeServe::start_with(env).await
    }

    /// Starts it with exactly the environment `env`.
    async fn start_with(env: Vec<(String, String)>) -> Result<Option<Self>> {
        let version = std::process::Command::new("wasmtime")
            .arg("--version")
            .output();
        let found = match &version {
            Ok(out) => String::from_utf8_lossy(&out.stdout).contains(WASMTIME_VERSION),
            Err(_) => false,
        };
        if !found {
            let why = format!(
                "wasmtime {WASMTIME_VERSION} is not on PATH (found: {:?}); install it with \
                 `cargo install wasmtime-cli --version {WASMTIME_VERSION} --locked`",
                version.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            );
            if std::env::var_os("CI").is_some() {
                bail!("{why}");
            }
            // Straight to stderr: libtest captures eprintln! of passing tests,
            // and a skip must be seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
            return Ok(None);
        }
        let turn = ONE_AT_A_TIME.lock().await;
        let mut command = Command::new("wasmtime");
        command.args(["serve", "-Scli", "--addr", "127.0.0.1:0"]);
        // The suite's build of the guest; the 0.3 one needs WASIp3 on.
        if fanout_tests::wasi_http() == fanout_host::WasiHttpVersion::P3 {
            command.args(["-Wcomponent-model-async", "-Sp3"]);
        }
        // The suite's reuse mode, as `wasmtime serve` spells it.
        command.arg(format!(
            "--max-instance-reuse-count={}",
            fanout_tests::instance_reuse()
        ));
        for (key, value) in env {
            command.arg("--env").arg(format!("{key}={value}"));
        }
        command
            .arg(fanout_tests::guest_component_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("spawning wasmtime serve")?;
        // Ready when it says where it listens (port 0: it picks the port).
        let stderr = child.stderr.take().context("stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let base = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("Serving HTTP on ") {
                    return Ok(url.trim_end_matches('/').to_string());
                }
            }
            bail!("wasmtime serve exited before listening")
        })
        .await
        .context("wasmtime serve did not start listening within 60 s")??;
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Some(WasmtimeServe {
            child,
            base,
            _turn: turn,
        }))
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, http::HeaderMap, Value, Duration)> {
        fanout_tests::get_json(&format!("{}{path}", self.base), &[]).await
    }

    /// Stops it as ctrl-c would (graceful), and waits.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGINT,
            )?;
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await??;
        Ok(())
    }
}

#[tokio::test]
async fn merged_answer_and_concurrent_fan_out() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(100)).await?;
    let Some(serve) = WasmtimeServe::start(&upstreams, &[]).await? else {
        return Ok(());
    };
    // The first request compiles nothing (wasmtime serve compiled at start)
    // but opens connections; measure the second.
    let (status, _, _, _) = serve.get("/products/41").await?;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body, elapsed) = serve.get("/products/42").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["id"], "42");
    assert_eq!(body["price"], json!({"amount": 12.5, "currency": "EUR"}));
    assert_eq!(body["degraded"], json!([]));
    println!("wasmtime serve: 3 x 100 ms fan-out in {elapsed:?}");
    assert!(
        elapsed < MS(180),
        "not concurrent under wasmtime serve: {elapsed:?}"
    );
    serve.stop().await
}

#[tokio::test]
async fn trace_context_and_server_timing_work_without_the_fanout_host() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let Some(serve) = WasmtimeServe::start(&upstreams, &[]).await? else {
        return Ok(());
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let request = http::Request::get(format!("{}/products/42", serve.base))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Empty::new())?;
    let response = client.request(request).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let timing = response.headers()["server-timing"].to_str()?.to_string();
    response.into_body().collect().await?;
    assert!(
        timing.starts_with("inventory;dur=") && timing.contains(", total;dur="),
        "{timing}"
    );
    for upstream in [&upstreams.inventory, &upstreams.pricing, &upstreams.reviews] {
        let traceparent = upstream.calls()[0].headers["traceparent"]
            .to_str()?
            .to_string();
        assert!(
            traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{traceparent}"
        );
    }
    // Its keep-alive connection would hold up the graceful shutdown.
    drop(client);
    serve.stop().await
}

#[tokio::test]
async fn deadline_hit_is_a_504() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    upstreams.pricing.set_behaviour(Behaviour::hang());
    let Some(serve) = WasmtimeServe::start(&upstreams, &[]).await? else {
        return Ok(());
    };
    let (status, _, body, elapsed) = serve.get("/products/42").await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert_eq!(body["error"]["upstream"], "pricing");
    assert!(elapsed < MS(1000), "{elapsed:?}");
    serve.stop().await
}

#[tokio::test]
async fn a_failing_optional_upstream_degrades() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    upstreams.reviews.set_behaviour(Behaviour::status(500));
    let Some(serve) = WasmtimeServe::start(&upstreams, &[]).await? else {
        return Ok(());
    };
    let (status, headers, body, _) = serve.get("/products/42").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["degraded"], json!(["reviews"]));
    assert_eq!(headers["x-fanout-degraded"], "reviews");
    serve.stop().await
}

#[tokio::test]
async fn configuration_reaches_the_guest_the_same_way() -> Result<()> {
    // FANOUT_CONFIG set with --env, exactly as the fanout host sets it.
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let config = r#"{"routes": [{"path": "/items/{id}", "upstreams": [
        {"name": "pricing", "url": "{base}/pricing/{id}", "field": "cost"}]}]}"#;
    let Some(serve) = WasmtimeServe::start(&upstreams, &[("FANOUT_CONFIG", config)]).await? else {
        return Ok(());
    };
    let (status, _, body, _) = serve.get("/items/7").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cost"]["amount"], 12.5);
    let (status, _, body, _) = serve.get("/products/7").await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    serve.stop().await
}

/// The demo's order route (dependent call, per-element list, batch,
/// shaping) behaves the same without the fanout host: the demo upstreams
/// over HTTP, the component under `wasmtime serve`.
#[tokio::test]
async fn the_demo_order_route_works_under_wasmtime_serve() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fanout_host::demo::serve(listener, async {
        let _ = stopped.await;
    }));
    let mut env: Vec<(String, String)> = ["INVENTORY", "PRICING", "REVIEWS", "ORDERS", "CUSTOMERS"]
        .iter()
        .map(|name| (format!("FANOUT_UPSTREAM_{name}"), base.clone()))
        .collect();
    env.push((
        "FANOUT_CONFIG".into(),
        fanout_host::demo::guest_config().to_string(),
    ));
    let Some(serve) = WasmtimeServe::start_with(env).await? else {
        return Ok(());
    };
    let (status, _, body, _) = serve.get("/orders/1").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let lines = body["lines"].as_array().expect("lines");
    assert_eq!(lines.len(), 5);
    assert_eq!(body["prices"].as_array().map(Vec::len), Some(5));
    assert_eq!(body["stock"].as_array().map(Vec::len), Some(5));
    assert_eq!(
        body["prices"][1], body["prices"][3],
        "sku-21 twice, one price"
    );
    assert!(body["customer"]["name"].is_string());
    assert!(body.get("customer_id").is_none());
    serve.stop().await?;
    let _ = stop.send(());
    server.await??;
    Ok(())
}
