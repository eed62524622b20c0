//! The committed BENCHMARKS.md against the committed raw results: the
//! report is written from `bench/results.json` alone, so a change to the
//! report's text or arithmetic that was not followed by
//! `fanout-bench report` (or a new run) shows here, not in a reader's
//! doubt about a figure.

use anyhow::Result;
use fanout_bench::Target;
use fanout_bench::report::{self, Results};
use std::path::Path;

fn committed() -> Result<(Results, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let results = serde_json::from_str(&std::fs::read_to_string(root.join("bench/results.json"))?)?;
    let markdown = std::fs::read_to_string(root.join("BENCHMARKS.md"))?;
    Ok((results, markdown))
}

#[test]
fn benchmarks_md_is_what_the_report_writes_from_the_raw_results() -> Result<()> {
    let (results, committed) = committed()?;
    assert_eq!(
        report::markdown(&results),
        committed,
        "BENCHMARKS.md is out of step with bench/results.json: run \
         `cargo run -p fanout-bench --release -- report`"
    );
    Ok(())
}

#[test]
fn the_bounds_of_the_hard_goals_are_the_runs_own_figures() -> Result<()> {
    let (results, markdown) = committed()?;
    let section = markdown
        .split("**What bounds the hard goals**")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the section follows the goals");
    // CPU per request at saturation, fanout against native, from the raw
    // windows: the section's ratio is theirs.
    let cpu = |target: Target| {
        let windows = results.saturation.iter().filter(|run| run.target == target);
        assert!(windows.clone().count() > 0, "{target:?} at saturation");
        report::stat(windows.map(|run| run.cpu_ms_per_request)).median
    };
    let (fanout, native) = (cpu(Target::Fanout), cpu(Target::Native));
    assert!(
        section.contains(&format!(
            "{fanout:.3} against {native:.3} ms ({:.2}×",
            native / fanout
        )),
        "{section}"
    );
    // The micro figures it cites.
    let micro = results.micro.as_ref().expect("micro measured");
    assert!(
        section.contains(&format!(
            "{:.0} µs in one process",
            micro.in_process_request_us
        )),
        "{section}"
    );
    assert!(
        section.contains(&format!(
            "{:.2} µs of a request",
            micro.instantiation_per_request_reused_us
        )),
        "{section}"
    );
    Ok(())
}
