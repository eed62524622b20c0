//! A few-second run of the harness, so that `cargo test` keeps it working.
//! It checks that it measures and reports, not how fast anything is.

use anyhow::Result;
use fanout_bench::driver::{self, Backoff};
use fanout_bench::report::{self, Results};
use fanout_bench::{Harness, Target};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_measures_and_reports() -> Result<()> {
    let harness = Harness {
        exe: env!("CARGO_BIN_EXE_fanout-bench").into(),
        warmup: Duration::from_millis(200),
        measure: Duration::from_secs(1),
        repeats: 1,
        wasmtime: None,
        backoff: Backoff::RetryAfter,
    };
    let runs = harness
        .latency(
            &[Target::Native, Target::Fanout, Target::Blocking],
            &[5],
            Duration::from_millis(10),
        )
        .await?;
    assert_eq!(runs.len(), 3);
    for run in &runs {
        let load = &run.load;
        assert!(load.requests > 0, "{run:?}");
        assert_eq!(
            load.statuses.keys().copied().collect::<Vec<_>>(),
            [200],
            "{run:?}"
        );
        assert!(load.errors.is_empty(), "{run:?}");
        // Three 10 ms upstreams: concurrently ~10 ms, one by one ~30 ms.
        assert!(load.p50_ms >= 9.0, "{run:?}");
        assert!(run.target_cpu_s >= 0.0 && run.cpu_ms_per_request >= 0.0);
    }
    let blocking = &runs[2].load;
    assert!(
        blocking.p50_ms >= 29.0,
        "blocking calls one after another: {blocking:?}"
    );

    let dir = tempfile::tempdir()?;
    let results = Results {
        latency: runs,
        skipped: vec!["wasmtime-serve: not in the smoke run".into()],
        ..Results::default()
    };
    report::write(dir.path(), &results)?;
    let markdown = std::fs::read_to_string(dir.path().join("BENCHMARKS.md"))?;
    assert!(markdown.contains("| fanout | 5 |"), "{markdown}");
    assert!(markdown.contains("Skipped: wasmtime-serve"), "{markdown}");
    let svg = std::fs::read_to_string(dir.path().join("bench/latency.svg"))?;
    assert!(svg.starts_with("<svg"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("bench/results.json"),
    )?)?;
    assert_eq!(json["latency"].as_array().map(Vec::len), Some(3));
    Ok(())
}

/// A server that sheds everything: 503 with `Retry-After: 1`, keep-alive.
async fn shedding_server() -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // One answer per request head received.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n\
                                      content-length: 2\r\n\r\n{}";
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_honour_retry_after_unless_told_not_to() -> Result<()> {
    let url = shedding_server().await?;
    let window = Duration::from_millis(1500);
    let polite = driver::run(
        driver::Urls::one(&url),
        2,
        Duration::ZERO,
        window,
        "polite",
        Backoff::RetryAfter,
    )
    .await;
    // Each client waits a second after each 503: two or three requests each.
    assert!((2..=6).contains(&polite.requests), "{polite:?}");
    assert_eq!(polite.backoffs, polite.requests);
    assert_eq!(polite.statuses.get(&503), Some(&polite.requests));
    let hostile = driver::run(
        driver::Urls::one(&url),
        2,
        Duration::ZERO,
        window,
        "hostile",
        Backoff::None,
    )
    .await;
    assert!(hostile.requests > 100, "{hostile:?}");
    assert_eq!(hostile.backoffs, 0);
    Ok(())
}
