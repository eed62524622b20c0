//! The `fanout` binary as an operator runs it: OTLP export switched on by
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, spans flushed at a graceful shutdown,
//! JSON log lines on stdout that the spans do not clutter and that a
//! stalled reader cannot stall answers with, the guest's code named for
//! `perf` with `--profile`, and its guest threads lowered by `--guest-nice`.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};

/// Names of the spans a collector received.
type Received = Arc<Mutex<Vec<(String, i32)>>>;

/// A minimal OTLP/HTTP collector on port 0: it decodes each export and keeps
/// the spans' names and kinds.
async fn collector() -> Result<(String, Received)> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let received: Received = Arc::default();
    let spans = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let spans = spans.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<_>| {
                    let spans = spans.clone();
                    async move {
                        let path_ok = request.uri().path() == "/v1/traces";
                        let body = BodyExt::collect(request.into_body()).await?.to_bytes();
                        let status = match ExportTraceServiceRequest::decode(body) {
                            Ok(export) if path_ok => {
                                let mut spans = spans.lock().unwrap();
                                for rs in export.resource_spans {
                                    for ss in rs.scope_spans {
                                        for span in ss.spans {
                                            spans.push((span.name, span.kind));
                                        }
                                    }
                                }
                                200
                            }
                            _ => 400,
                        };
                        let mut response = http::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((endpoint, received))
}

struct Running {
    child: Child,
    addr: String,
    lines: Lines<BufReader<ChildStdout>>,
    /// The JSON log lines read so far.
    logs: Vec<serde_json::Value>,
}

/// `fanout` serving on port 0 with the tests' compile cache, stdout piped,
/// and none of the environment that would change what it does.
fn serving_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
    command
        .args(["--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(std::env::temp_dir().join("fanout-binary-test-cache"))
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    without_inherited_settings(&mut command);
    command
}

/// Removes what the tests' own environment might set for the binary.
fn without_inherited_settings(command: &mut Command) {
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "RUST_LOG",
        "NO_COLOR",
        "FANOUT_PROFILE",
        "FANOUT_CONFIG_FILE",
        "FANOUT_LOG_BUFFER_LINES",
    ] {
        command.env_remove(var);
    }
}

/// The repository's fanout.toml with `shipped` (which it must hold)
/// replaced by `with`, in a temporary file.
fn shipped_config_with(shipped: &str, with: &str) -> Result<tempfile::NamedTempFile> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../fanout.toml"))?;
    assert!(text.contains(shipped), "fanout.toml holds {shipped:?}");
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), text.replacen(shipped, with, 1))?;
    Ok(file)
}

/// Starts `fanout` on port 0 with the demo upstreams, and `extra` flags,
/// and waits for the line that says where it listens.
async fn start(otlp_endpoint: Option<&str>, extra: &[&str]) -> Result<Running> {
    let mut command = serving_command();
    command.args(["--log-format", "json"]).args(extra);
    if let Some(endpoint) = otlp_endpoint {
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    }
    let mut child = command.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut logs = Vec::new();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("fanout is listening on http://") {
                return Ok(url.to_string());
            }
            if let Ok(json) = serde_json::from_str(&line) {
                logs.push(json);
            }
        }
        bail!("fanout exited before listening: {logs:#?}")
    })
    .await
    .context("fanout did not start within 60 s")??;
    Ok(Running {
        child,
        addr,
        lines,
        logs,
    })
}

impl Running {
    async fn get(&self, path: &str) -> Result<http::StatusCode> {
        let url = format!("http://{}{path}", self.addr);
        Ok(fetch(&client(), &url).await?.0)
    }

    /// Where the admin endpoints listen (`--admin`), from the log line
    /// that says so, reading on until it comes.
    async fn admin_addr(&mut self) -> Result<String> {
        let said = |l: &serde_json::Value| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("admin listening"))
                .then(|| l["addr"].as_str().map(str::to_string))
                .flatten()
        };
        if let Some(addr) = self.logs.iter().find_map(said) {
            return Ok(addr);
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = self.lines.next_line().await? {
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                    let addr = said(&json);
                    self.logs.push(json);
                    if let Some(addr) = addr {
                        return Ok(addr);
                    }
                }
            }
            bail!("fanout exited without its admin listening")
        })
        .await
        .context("no admin address logged within 10 s")?
    }

    /// SIGTERM, then every remaining log line until the process exits.
    async fn stop(mut self) -> Result<Vec<serde_json::Value>> {
        let pid = nix::unistd::Pid::from_raw(self.child.id().context("running")? as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.lines.next_line().await? {
                if let Ok(json) = serde_json::from_str(&line) {
                    self.logs.push(json);
                }
            }
            anyhow::Ok(self.child.wait().await?)
        })
        .await
        .context("fanout did not stop within 30 s of SIGTERM")??;
        assert!(status.success(), "{status}");
        Ok(self.logs)
    }
}

#[tokio::test]
async fn otlp_endpoint_turns_on_export_and_shutdown_flushes_it() -> Result<()> {
    let (endpoint, received) = collector().await?;
    let fanout = start(Some(&endpoint), &[]).await?;
    assert_eq!(fanout.get("/products/1").await?, http::StatusCode::OK);
    assert_eq!(fanout.get("/products/2").await?, http::StatusCode::OK);
    // The batch exporter has not sent these yet: the shutdown must.
    let logs = fanout.stop().await?;

    let spans = received.lock().unwrap().clone();
    let servers = spans
        .iter()
        .filter(|(name, kind)| name == "GET /products/{id}" && *kind == 2)
        .count();
    let clients = spans.iter().filter(|(_, kind)| *kind == 3).count();
    assert_eq!(servers, 2, "{spans:?}");
    assert_eq!(clients, 6, "three upstreams per request: {spans:?}");

    assert!(
        logs.iter()
            .any(|l| l["message"] == "exporting spans over OTLP"),
        "{logs:#?}"
    );
    let access: Vec<_> = logs
        .iter()
        .filter(|l| l["target"] == "fanout::access")
        .collect();
    assert_eq!(access.len(), 2, "{logs:#?}");
    // The spans go to the collector, not into the log lines.
    for line in &logs {
        assert!(
            line.get("span").is_none() && line.get("spans").is_none(),
            "{line}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported() -> Result<()> {
    let fanout = start(None, &[]).await?;
    assert_eq!(fanout.get("/products/3").await?, http::StatusCode::OK);
    // Without --config, the demo's second route is served too.
    assert_eq!(fanout.get("/orders/1").await?, http::StatusCode::OK);
    let logs = fanout.stop().await?;
    assert!(
        !logs
            .iter()
            .any(|l| l["message"] == "exporting spans over OTLP"),
        "{logs:#?}"
    );
    assert_eq!(
        logs.iter()
            .filter(|l| l["target"] == "fanout::access")
            .count(),
        2
    );
    Ok(())
}

/// The perf map a process with `pid` writes, its contents once the process
/// has stopped (`None`: it wrote none), and the file removed.
#[cfg(target_os = "linux")]
fn take_perf_map(pid: u32) -> Result<Option<String>> {
    let path = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            std::fs::remove_file(&path)?;
            Ok(Some(text))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn profile_perfmap_names_the_guest_code_for_perf() -> Result<()> {
    // Off by default: no map.
    let fanout = start(None, &[]).await?;
    let pid = fanout.child.id().context("running")?;
    assert_eq!(fanout.get("/products/5").await?, http::StatusCode::OK);
    fanout.stop().await?;
    assert_eq!(take_perf_map(pid)?, None, "a map written without --profile");

    // The compiled component comes from the cache the run above filled:
    // the map must name its code all the same.
    let fanout = start(None, &["--profile", "perfmap"]).await?;
    let pid = fanout.child.id().context("running")?;
    assert_eq!(fanout.get("/products/6").await?, http::StatusCode::OK);
    fanout.stop().await?;
    let map = take_perf_map(pid)?.context("no /tmp/perf-<pid>.map written")?;
    // perf's format: start and size in hex (the start with `0x` or
    // without), then the symbol's name.
    let hex = |field: &str| u64::from_str_radix(field.trim_start_matches("0x"), 16).is_ok();
    for line in map.lines() {
        let mut fields = line.splitn(3, ' ');
        let (start, size, name) = (fields.next(), fields.next(), fields.next());
        assert!(
            start.is_some_and(hex) && size.is_some_and(hex) && name.is_some_and(|n| !n.is_empty()),
            "not a perf map line: {line:?}"
        );
    }
    // The guest's own functions, by their Rust names.
    assert!(
        map.lines()
            .any(|line| line.contains("fanout_guest::fanout::fan_out")),
        "the guest's fan-out is not named: {} lines, e.g. {:?}",
        map.lines().count(),
        map.lines().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// Each thread of process `pid` by name, with its nice value
/// (`/proc/PID/task/TID/stat`: field 19, counted past the name in
/// parentheses, which may hold spaces).
#[cfg(target_os = "linux")]
fn nice_by_thread(pid: u32) -> Result<Vec<(String, i32)>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        let (name, rest) = stat
            .split_once(" (")
            .and_then(|(_, rest)| rest.rsplit_once(") "))
            .context("a stat line")?;
        let nice = rest.split(' ').nth(16).context("a nice field")?.parse()?;
        threads.push((name.to_string(), nice));
    }
    Ok(threads)
}

/// `--guest-nice N` runs the guests N below the connections (0 unless
/// told); the threads that accept, read and shed keep the process's
/// priority.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn guest_nice_lowers_the_guest_threads_alone() -> Result<()> {
    let ours = nice_by_thread(std::process::id())?
        .into_iter()
        .map(|(_, nice)| nice)
        .min()
        .context("a thread")?;
    for (flags, below) in [
        (&[][..], 0),
        (&["--guest-nice", "10"][..], 10),
        (&["--guest-nice", "3"][..], 3),
    ] {
        let fanout = start(None, flags).await?;
        // Guest threads start with the runtime; a request makes sure.
        assert_eq!(fanout.get("/products/7").await?, http::StatusCode::OK);
        let threads = nice_by_thread(fanout.child.id().context("running")?)?;
        fanout.stop().await?;
        let nice_of = |wanted: &str| -> Vec<i32> {
            threads
                .iter()
                .filter(|(name, _)| name == wanted)
                .map(|(_, nice)| *nice)
                .collect()
        };
        let guests = nice_of("fanout-guest");
        assert!(!guests.is_empty(), "no guest threads in {threads:?}");
        assert!(
            guests.iter().all(|nice| *nice == (ours + below).min(19)),
            "{flags:?}: guests at {guests:?}, expected {ours} + {below}"
        );
        let workers = nice_of("tokio-rt-worker");
        assert!(!workers.is_empty(), "no connection threads in {threads:?}");
        assert!(
            workers.iter().all(|nice| *nice == ours),
            "{flags:?}: connection threads at {workers:?}, expected {ours}"
        );
    }
    // Past 19 there is no lower priority, and with the guests on the
    // connections' threads no threads of theirs: clap's usage errors.
    for flags in [
        &["--guest-nice", "20"][..],
        &["--guest-nice", "5", "--guest-threads", "0"][..],
    ] {
        let (status, stderr) = check(flags).await?;
        assert_eq!(status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains("--guest-nice"), "{flags:?}: {stderr}");
    }
    // 0 with 0 asks for nothing to be lowered: accepted.
    let (status, stderr) = check(&["--guest-nice", "0", "--guest-threads", "0"]).await?;
    assert!(status.success(), "{stderr}");
    Ok(())
}

/// A reader of stdout that stops reading (a stalled log shipper, a full
/// disk behind the container runtime) must cost log lines, counted, never
/// answers: once the pipe is full, a line written in place would block
/// the thread that answers requests.
#[tokio::test]
async fn a_stalled_reader_of_stdout_costs_log_lines_not_answers() -> Result<()> {
    // The repository's fanout.toml with a queue of 64 lines: the file's
    // `[log]` table, read before logging starts, sizes it (its 8,192
    // would drop nothing here).
    let file = shipped_config_with("\nbuffer_lines = 8192 ", "\nbuffer_lines = 64 ")?;
    let config = file.path().to_str().context("a UTF-8 temp path")?;
    let mut fanout = start(None, &["--config", config, "--admin", "127.0.0.1:0"]).await?;
    let admin = fanout.admin_addr().await?;

    // Nobody reads stdout from here on. A pipe holds 64 KiB, some 200
    // access lines, the queue 64 more and the batch being written ~200:
    // 1,000 requests fill them all.
    let client = client();
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        let mut statuses = Vec::new();
        for batch in 0..1000 / 32 + 1 {
            let calls = (0..32).map(|i| {
                let client = client.clone();
                let url = format!("http://{}/products/{}", fanout.addr, batch * 32 + i);
                async move { anyhow::Ok(fetch(&client, &url).await?.0) }
            });
            for status in futures_util::future::join_all(calls).await {
                statuses.push(status?);
            }
        }
        anyhow::Ok(statuses)
    })
    .await
    .context("requests stalled behind a stalled stdout")??;
    assert!(answered.len() >= 1000);
    assert!(
        answered.iter().all(|s| *s == http::StatusCode::OK),
        "{answered:?}"
    );

    let (_, metrics) = fetch(&client, &format!("http://{admin}/metrics")).await?;
    let metrics = String::from_utf8(metrics.to_vec())?;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fanout_log_lines_dropped_total "))
        .context("no fanout_log_lines_dropped_total on /metrics")?
        .trim()
        .parse()?;
    assert!(
        (100..=1000).contains(&dropped),
        "{dropped} lines dropped of ~1,000"
    );

    // Read again, the log goes on. The queue drains in a moment, so a
    // request or two after reading resumes is logged; the first may still
    // find it full.
    let Running {
        mut child,
        addr,
        mut lines,
        ..
    } = fanout;
    let read = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let line_read = Arc::new(tokio::sync::Notify::new());
    let reader = tokio::spawn({
        let (read, line_read) = (read.clone(), line_read.clone());
        async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(json) = serde_json::from_str(&line) {
                    read.lock().unwrap().push(json);
                    line_read.notify_waiters();
                }
            }
        }
    });
    let logged = |path: &str| {
        read.lock()
            .unwrap()
            .iter()
            .any(|l| l["target"] == "fanout::access" && l["path"] == path)
    };
    let mut probes = 0;
    let after_the_stall = loop {
        probes += 1;
        assert!(probes <= 50, "no request logged after the reader came back");
        let path = format!("/products/{}", 100_000 + probes);
        let (status, _) = fetch(&client, &format!("http://{addr}{path}")).await?;
        assert_eq!(status, http::StatusCode::OK);
        // Its line may come after its answer; a dropped one never comes.
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let next = line_read.notified();
                if logged(&path) {
                    break;
                }
                next.await;
            }
        })
        .await;
        if seen.is_ok() {
            break path;
        }
    };
    assert!(probes <= 3, "{probes} requests before one was logged");

    let pid = nix::unistd::Pid::from_raw(child.id().context("running")? as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("fanout did not stop within 30 s of SIGTERM")??;
    assert!(status.success(), "{status}");
    reader.await?;
    assert!(logged(&after_the_stall));
    Ok(())
}

/// Runs `fanout --check` with `args` and returns its exit status and
/// stderr: a configuration check that starts nothing.
async fn check(args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
    command.arg("--check").args(args).stdin(Stdio::null());
    without_inherited_settings(&mut command);
    let output = command.output().await?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stderr).into(),
    ))
}

#[tokio::test]
async fn a_log_queue_of_no_lines_is_refused_by_key() -> Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), "[log]\nbuffer_lines = 0\n")?;
    let config = file.path().to_str().context("a UTF-8 temp path")?;
    let (status, stderr) = check(&["--config", config]).await?;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("log.buffer_lines") && stderr.contains("at least 1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The flag: clap's usage error.
    let (status, stderr) = check(&["--log-buffer-lines", "0"]).await?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--log-buffer-lines"), "{stderr}");
    Ok(())
}

/// `[log] format = "pretty"` in the file: the lines are for a person, and
/// with stdout a pipe, without colour codes.
#[tokio::test]
async fn the_file_sets_the_log_format() -> Result<()> {
    let file = shipped_config_with("[log]\n", "[log]\nformat = \"pretty\"\n")?;
    let mut child = serving_command().arg("--config").arg(file.path()).spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut logged = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if logged.iter().any(|l: &String| l.contains("upstream")) {
                return anyhow::Ok(());
            }
            logged.push(line);
        }
        bail!("fanout exited: {logged:#?}")
    })
    .await
    .context("no upstream logged within 60 s")??;
    let ready = logged
        .iter()
        .find(|l| l.contains("component ready"))
        .context("the component's line")?;
    assert!(ready.contains(" INFO "), "{ready}");
    for line in &logged {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_err(),
            "{line}"
        );
        assert!(!line.contains('\x1b'), "colour codes in a pipe: {line:?}");
    }
    Ok(())
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// GET `url`: its status and whole body.
async fn fetch(client: &Client, url: &str) -> Result<(http::StatusCode, Bytes)> {
    let response = client.get(url.parse()?).await?;
    let status = response.status();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}
