//! `frisket-eval ab` end to end: a server it starts on the shipped shapes model, 3 held-out
//! cases under 2 conditions; and its bad-input errors. Needs target/<profile>/frisket-server
//! (built by `cargo test --workspace` or `cargo build -p frisket-server`).
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/shapes")
}

fn ab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_frisket-eval")).arg("ab").args(args).output().expect("running frisket-eval ab")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn three_cases_two_conditions_make_a_complete_report() {
    let out = std::env::temp_dir().join(format!("frisket-ab-test-{}", std::process::id()));
    let o = ab(&[
        "--model",
        model().to_str().unwrap(),
        "--cases",
        "3",
        "--conditions",
        "sd-0.9,paper",
        "--steps",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "ab failed: {}", stderr(&o));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 6);
    for c in ["sd-0.9", "paper"] {
        assert_eq!(items.iter().filter(|i| i["condition"] == c).count(), 3);
        let m = &report["summary"]["means"][c];
        let adherence = m["adherence"]["mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&adherence), "{c}: adherence {adherence}");
        let ssim = m["ssim_background"]["mean"].as_f64().unwrap();
        assert!(ssim > 0.0 && ssim <= 1.0, "{c}: SSIM {ssim}");
        let psnr = m["psnr_background"]["mean"].as_f64().unwrap();
        assert!(psnr > 5.0 && psnr <= 100.0, "{c}: PSNR {psnr}");
        let ci = m["psnr_background"]["ci95"].as_array().unwrap();
        assert!(ci[0].as_f64().unwrap() <= psnr && psnr <= ci[1].as_f64().unwrap());
    }
    // The paper condition protects the kept object: its pixels are exact (the PSNR cap).
    assert_eq!(report["summary"]["means"]["paper"]["psnr_kept"]["mean"].as_f64(), Some(100.0));
    let diffs = report["summary"]["vs_paper"].as_array().unwrap();
    assert_eq!(diffs.len(), 4);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("sd-0.9"));
    assert!(!out.join("report.partial").exists());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let out = std::env::temp_dir().join(format!("frisket-ab-bad-{}", std::process::id()));
    let m = model();
    let cases = [
        (vec!["--model", m.to_str().unwrap(), "--cases", "0"], "zero cases"),
        (vec!["--model", m.to_str().unwrap(), "--conditions", "paper,sd-1.0"], "unknown condition \"sd-1.0\""),
        (vec!["--model", "/nonexistent/shapes"], "no model at /nonexistent/shapes"),
    ];
    for (args, want) in cases {
        let mut args = args.clone();
        args.extend(["--out", out.to_str().unwrap()]);
        let o = ab(&args);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
}
