//! `make load`'s generator (`frisket-load`) on a small run (two rounds) against a real
//! server with the shipped model: it reports every job, all of them OK, with a first
//! preview each, and a batch-size histogram of exactly the measured jobs' steps (the
//! warm-up jobs' and stopped steps left out).
use frisket_e2e::{server_binary, workspace_binary, workspace_root};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

const STEPS: u64 = 3;
const JOBS: u64 = 2;

#[test]
fn the_load_generator_reports_every_job_and_the_steps_they_ran() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("frisket-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("load.json");
    let status = Command::new(workspace_binary("frisket-load", "FRISKET_LOAD_BIN"))
        .arg("--models")
        .arg(workspace_root().join("models"))
        .args(["--steps", &STEPS.to_string(), "--jobs", &JOBS.to_string(), "--concurrency", "1,2", "--stagger"])
        .args(["--setting", "batched=--max-batch 4", "--rounds", "2", "--out"])
        .arg(&out)
        .env("FRISKET_SERVER_BIN", server_binary())
        .env("FRISKET_TEST_RUST_LOG", "info,frisket_server::service::worker=debug")
        .status()
        .expect("frisket-load runs");
    assert!(status.success(), "frisket-load failed: {status}");
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "{report}");
    for (run, (round, c)) in runs.iter().zip([(1, 1), (1, 2), (2, 1), (2, 2)]) {
        let r = &run["result"];
        assert_eq!(r["round"], round);
        let jobs = c * JOBS;
        assert_eq!(r["concurrency"], c);
        assert_eq!(r["codes"], serde_json::json!({"Ok": jobs}), "{r}");
        let samples = r["samples"].as_array().expect("samples");
        assert_eq!(samples.len() as u64, jobs);
        let clients: std::collections::BTreeSet<u64> = samples.iter().map(|s| s["client"].as_u64().unwrap()).collect();
        assert_eq!(clients.len() as u64, c);
        for s in samples {
            let first = s["first_preview_ms"].as_f64().expect("a first preview");
            assert!(first > 0.0 && first <= s["job_ms"].as_f64().unwrap(), "{s}");
        }
        // Every measured step is one row of one batched call, and nothing else is counted.
        let rows: u64 = r["batch_sizes"]
            .as_object()
            .expect("batch sizes")
            .iter()
            .map(|(size, n)| size.parse::<u64>().unwrap() * n.as_u64().unwrap())
            .sum();
        assert_eq!(rows, jobs * STEPS, "{r}");
        // A step stops at most once for each job that comes while others run.
        assert!(r["step_yields"].as_u64().expect("step_yields") < jobs, "{r}");
    }
}
