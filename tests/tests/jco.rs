//! The same component under `jco serve` (Node.js's own HTTP stack, through
//! jco's JavaScript implementation of `wasi:http`): a second runtime that
//! shares no code with wasmtime.
//!
//! Needs Node.js and jco 1.35.0: `.ci/run` installs jco into `.ci/jco`
//! with npm; `JCO` may name another jco binary. Outside CI a missing one
//! skips this test, saying so; in CI (`CI` is set) it fails it.

use anyhow::{Context, Result, bail};
use fanout_tests::{Behaviour, MS, ProductUpstreams};
use http::StatusCode;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

const JCO_VERSION: &str = "1.35.0";

/// The jco binary: `$JCO`, else the one `.ci/run` installs.
fn jco() -> PathBuf {
    std::env::var_os("JCO")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ci/jco/node_modules/.bin/jco")
        })
}

/// `jco serve` running the guest component. jco runs the server in a
/// child `node` of its own: dropping this kills the whole process group.
struct JcoServe {
    child: Child,
    base: String,
}

impl Drop for JcoServe {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl JcoServe {
    /// Starts it with the upstreams' base URLs; `None` when jco or Node is
    /// missing outside CI.
    async fn start(upstreams: &ProductUpstreams) -> Result<Option<JcoServe>> {
        let jco = jco();
        let version = std::process::Command::new(&jco).arg("--version").output();
        let found = match &version {
            Ok(out) => String::from_utf8_lossy(&out.stdout).contains(JCO_VERSION),
            Err(_) => false,
        };
        if !found {
            let why = format!(
                "jco {JCO_VERSION} is not at {} (or $JCO), or Node.js is missing: {:?}; \
                 `npm install --prefix .ci/jco @bytecodealliance/jco@{JCO_VERSION}`",
                jco.display(),
                version.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            );
            if std::env::var_os("CI").is_some() {
                bail!("{why}");
            }
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
            return Ok(None);
        }
        // jco cannot say which port it got for port 0: take a free one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(&jco);
        command
            .args(["serve", fanout_host::GUEST_COMPONENT_PATH])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // Environment variables pass through to the guest.
            .env("FANOUT_UPSTREAM_INVENTORY", upstreams.inventory.base_url())
            .env("FANOUT_UPSTREAM_PRICING", upstreams.pricing.base_url())
            .env("FANOUT_UPSTREAM_REVIEWS", upstreams.reviews.base_url())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().context("spawning jco serve")?;
        let serve = JcoServe {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        // Ready when the port accepts (jco transpiles the component first).
        tokio::time::timeout(Duration::from_secs(120), async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(MS(100)).await;
            }
        })
        .await
        .context("jco serve did not start listening within 120 s")?;
        Ok(Some(serve))
    }

    async fn get_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, http::HeaderMap, Value, Duration)> {
        fanout_tests::get_json(&format!("{}{path}", self.base), headers).await
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, http::HeaderMap, Value, Duration)> {
        self.get_with(path, &[]).await
    }
}

/// One `jco serve` for every case (it transpiles the component at start,
/// seconds on two cores), the upstreams' behaviour changed between them.
#[tokio::test]
async fn the_component_runs_unchanged_under_jco_serve() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(100)).await?;
    let Some(serve) = JcoServe::start(&upstreams).await? else {
        return Ok(());
    };

    // A merged answer in about the slowest upstream's time (the first
    // request opens connections; measure the second).
    let (status, _, body, _) = serve.get("/products/41").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, headers, body, elapsed) = serve.get("/products/42").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["id"], "42");
    assert_eq!(body["price"], json!({"amount": 12.5, "currency": "EUR"}));
    assert_eq!(body["degraded"], json!([]));
    println!("jco serve: 3 x 100 ms fan-out in {elapsed:?}");
    assert!(elapsed < MS(190), "not concurrent under jco: {elapsed:?}");

    // A batch, in the order asked for.
    let (status, _, body, _) = serve.get("/products?ids=7,3,5").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<&str> = body["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|item| item["id"].as_str())
        .collect();
    assert_eq!(ids, ["7", "3", "5"]);

    // An invalid id: 400 at once, no upstream called.
    let calls = upstreams.pricing.calls().len();
    let (status, _, body, _) = serve.get("/products/bad!id").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_id");
    assert_eq!(upstreams.pricing.calls().len(), calls);

    // The budget header: 50 ms against 100 ms upstreams is a 504 in time.
    let (status, _, body, elapsed) = serve
        .get_with("/products/42", &[("x-request-timeout-ms", "50")])
        .await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(elapsed < MS(150), "{elapsed:?}");

    // An optional upstream that hangs: a degraded answer at the deadline.
    upstreams.reviews.set_behaviour(Behaviour::hang());
    let (status, headers, body, elapsed) = serve.get("/products/42").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["degraded"], json!(["reviews"]));
    assert_eq!(headers["x-fanout-degraded"], "reviews");
    assert!((MS(150)..MS(400)).contains(&elapsed), "{elapsed:?}");

    // A required upstream failing: 502 naming it.
    upstreams.reviews.set_behaviour(Behaviour::status(200));
    upstreams.pricing.set_behaviour(Behaviour::status(500));
    let (status, _, body, _) = serve.get("/products/42").await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(body["error"]["upstream"], "pricing");

    drop(serve);
    Ok(())
}
