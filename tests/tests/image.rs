//! The container image (`deploy/image/`): built by its script, run with
//! podman, answering a merged product and `/readyz`, from the cache warmed
//! at build time.
//!
//! Runs only where podman is installed; elsewhere it is skipped with a
//! note, unless `FANOUT_IMAGE_TEST=required` (which `.ci/run` sets when it
//! could install podman) makes a missing podman a failure. The build is a
//! release build for the musl target: minutes, cold.

use anyhow::{Context, Result, bail, ensure};
use fanout_tests::get_json;
use http::StatusCode;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(command: &mut Command) -> Result<String> {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    ensure!(
        status.success(),
        "{command:?} failed ({status}): {}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    Ok(String::from_utf8_lossy(&stdout).trim().to_string())
}

/// `podman run` options that this kind of machine needs and others accept.
/// crun refuses hosts with cgroup v1 and v2 mounted side by side ("hybrid
/// mode"), which runc serves. Without CAP_SYS_RESOURCE the runtime cannot
/// raise the rlimits podman asks for by default (nor, here, its own nproc):
/// ask for open files up to this process's hard limit, and 1024 threads,
/// far more than the host starts.
fn run_options() -> Vec<String> {
    let mut options = Vec::new();
    if Command::new("runc").arg("--version").output().is_ok() {
        options.extend(["--runtime".into(), "runc".into()]);
    }
    if let Some(files) = hard_nofile() {
        options.extend(["--ulimit".into(), format!("nofile={files}:{files}")]);
    }
    options.extend(["--ulimit".into(), "nproc=1024:1024".into()]);
    options
}

/// This process's hard limit on open files, read with util-linux's
/// `prlimit` (podman spells unlimited -1).
fn hard_nofile() -> Option<String> {
    let out = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string()])
        .args(["--nofile", "--noheadings", "--raw", "--output", "HARD"])
        .output()
        .ok()?;
    let hard = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!hard.is_empty()).then(|| hard.replace("unlimited", "-1"))
}

/// Removes the container when the test ends, passed or not.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", &self.0]).output();
    }
}

/// Untags the test's image when the test ends (its layers stay cached).
struct Untag(String);

impl Drop for Untag {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_serves_from_its_warmed_cache() -> Result<()> {
    if Command::new("podman").arg("--version").output().is_err() {
        let why = "podman is not installed (apt-get install podman runc)";
        if std::env::var("FANOUT_IMAGE_TEST").as_deref() == Ok("required") {
            bail!("{why}, and FANOUT_IMAGE_TEST=required");
        }
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let tag = format!("localhost/fanout-test:{}", std::process::id());
    let built = Instant::now();
    let log = run(Command::new("bash")
        .arg(root().join("deploy/image/build.sh"))
        .arg(&tag)
        .current_dir(root()))?;
    eprintln!("{log}\nbuilt in {:.0?}", built.elapsed());
    let _image = Untag(tag.clone());
    let size: u64 =
        run(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &tag]))?
            .parse()?;
    eprintln!("image size: {:.1} MiB", size as f64 / 1048576.0);

    let id = run(Command::new("podman")
        .args(["run", "--detach", "--read-only"])
        .args(run_options())
        .args([
            "--publish",
            "127.0.0.1::8080",
            "--publish",
            "127.0.0.1::9090",
        ])
        .arg(&tag))?;
    let container = Container(id);
    let port = |inner: &str| -> Result<String> {
        run(Command::new("podman").args(["port", &container.0, inner]))?
            .lines()
            .next()
            .map(str::to_string)
            .context("no published port")
    };
    let (public, admin) = (port("8080/tcp")?, port("9090/tcp")?);

    // The container starts in the background: ask until it is ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get_json(&format!("http://{admin}/readyz"), &[]).await {
            Ok((StatusCode::OK, ..)) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => bail!(
                "never ready: {other:?}; logs: {}",
                run(Command::new("podman").args(["logs", &container.0]))?
            ),
        }
    }
    let (status, _, product, _) = get_json(&format!("http://{public}/products/42"), &[]).await?;
    assert_eq!(status, StatusCode::OK, "{product}");
    assert_eq!(product["id"], "42", "{product}");
    assert_eq!(product["degraded"], serde_json::json!([]), "{product}");
    for field in ["inventory", "price", "reviews"] {
        assert!(product[field].is_object(), "{field} missing: {product}");
    }

    // Loaded from the cache the build warmed, not compiled at start: the
    // image runs as a non-root user on a read-only root, so the cache's
    // ownership and mode survived the build.
    let logs = run(Command::new("podman").args(["logs", &container.0]))?;
    let ready = logs
        .lines()
        .find(|line| line.contains("component ready"))
        .with_context(|| format!("no start-up line: {logs}"))?;
    assert!(ready.contains("\"Cached\""), "{ready}");
    assert!(!logs.contains("\"level\":\"WARN\""), "{logs}");
    Ok(())
}
