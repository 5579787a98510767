//! The A/B report's statistics against numpy/scipy (tests/fixtures/ref_ab_stats.py).
use frisket_eval::ab::stats;
use serde_json::Value;
use std::path::PathBuf;

fn reference() -> Value {
    let root = match std::env::var("FRISKET_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"),
    };
    let path = root.join("ab/stats.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures` or tests/fixtures/ref_ab_stats.py)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{what}: {a} vs reference {b}");
}

#[test]
fn wilcoxon_matches_scipy_with_ties_and_zeros() {
    let r = reference();
    for (a, p) in r["arrays"].as_array().unwrap().iter().zip(floats(&r["wilcoxon"])) {
        close(stats::wilcoxon(&floats(a)), p, "wilcoxon p");
    }
}

#[test]
fn bootstrap_interval_matches_numpy_percentiles() {
    let r = reference();
    let indices: Vec<Vec<usize>> = r["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect())
        .collect();
    let (lo, hi) = stats::interval_from_indices(&floats(&r["values"]), &indices);
    let want = floats(&r["interval"]);
    close(lo, want[0], "lower bound");
    close(hi, want[1], "upper bound");
}

#[test]
fn holm_matches_the_step_down_formula() {
    let r = reference();
    for (a, b) in stats::holm(&floats(&r["family"])).into_iter().zip(floats(&r["holm"])) {
        close(a, b, "holm");
    }
}

#[test]
fn resampling_is_reproducible_and_in_range() {
    let a = stats::resample_indices(7, 50, stats::SEED);
    assert_eq!(a, stats::resample_indices(7, 50, stats::SEED));
    assert!(a.iter().flatten().all(|&i| i < 7));
    assert_ne!(a, stats::resample_indices(7, 50, stats::SEED + 1));
}
