//! A few-second run of the harness, so that `cargo test` keeps it working.
//! It checks that it measures and reports, not how fast anything is.

use anyhow::Result;
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
