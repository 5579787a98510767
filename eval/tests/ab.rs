//! `frisket-eval ab` end to end: a server it starts on the shipped shapes model, 3 held-out
//! cases under 3 conditions (sd-tuned tuned on 1 tuning case over a 2-strength grid), with the
//! optional CLIP, LPIPS and pair64 metrics on the parity tests' small random networks; and its bad-input
//! errors. Needs target/<profile>/frisket-server
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

/// The parity tests' fixtures (tests/fixtures/ref_eval.py): a small random CLIPModel folder and
/// an LPIPS state dict.
fn fixture(name: &str) -> PathBuf {
    let root = match std::env::var("FRISKET_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"),
    };
    root.join("eval").join(name)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn three_cases_three_conditions_make_a_complete_report() {
    let out = std::env::temp_dir().join(format!("frisket-ab-test-{}", std::process::id()));
    let (clip, lpips) = (fixture("clip"), fixture("lpips_alex.pth"));
    let inception = fixture("pt_inception-2015-12-05-6726825d.pth");
    let o = ab(&[
        "--model",
        model().to_str().unwrap(),
        "--cases",
        "3",
        "--conditions",
        "sd-0.9,sd-tuned,paper",
        "--tune-grid",
        "0.5,0.9",
        "--tune-cases",
        "1",
        "--steps",
        "10",
        "--clip",
        clip.to_str().unwrap(),
        "--lpips",
        lpips.to_str().unwrap(),
        "--inception",
        inception.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "ab failed: {}", stderr(&o));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 9);

    // The tuning record: both strengths measured on the tuning case, the chosen one closest to
    // paper's adherence there.
    let t = &report["tuning"];
    assert_eq!(t["grid"], serde_json::json!([0.5, 0.9]));
    assert_eq!(t["seeds"], serde_json::json!([950_000, 950_001]));
    let paper = t["paper_adherence"].as_f64().unwrap();
    let per = t["per_strength"].as_array().unwrap();
    assert_eq!(per.len(), 2);
    let distance = |r: &Value| (r["adherence"].as_f64().unwrap() - paper).abs();
    let chosen = t["chosen_strength"].as_f64().unwrap();
    let chosen_row = per.iter().find(|r| r["strength"].as_f64() == Some(chosen)).expect("chosen from the grid");
    assert!(per.iter().all(|r| distance(chosen_row) <= distance(r) + 1e-12), "{t}");
    assert!(t["definition"].as_str().unwrap().contains("closest to the paper preset's adherence"));
    for c in ["sd-0.9", "sd-tuned", "paper"] {
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
        for clip in ["clip_score", "clip_score_region"] {
            let v = m[clip]["mean"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{c}: {clip} {v}");
        }
        assert!(m["lpips_background"]["mean"].as_f64().unwrap() >= 0.0);
        assert!(m["pair64"]["mean"].as_f64().unwrap() >= 0.0);
    }
    // The paper condition protects the kept object: its pixels are exact (the PSNR cap).
    assert_eq!(report["summary"]["means"]["paper"]["psnr_kept"]["mean"].as_f64(), Some(100.0));
    let diffs = report["summary"]["vs_paper"].as_array().unwrap();
    assert_eq!(diffs.len(), 2 * 8);
    // Strips: with 3 cases, the 2 best and the 1 worst by paper − sd-0.9 background PSNR.
    let strips = &report["strips"];
    assert_eq!(strips["metric"], "psnr_background");
    let (best, worst) = (strips["best"].as_array().unwrap(), strips["worst"].as_array().unwrap());
    assert_eq!((best.len(), worst.len()), (2, 1));
    let d = |v: &Value| v["paper_minus_sd09"].as_f64().unwrap();
    assert!(d(&best[0]) >= d(&best[1]) && d(&best[1]) >= d(&worst[0]));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("sd-0.9"));
    assert!(html.contains("<th>clip_score_region</th>") && html.contains("<th>lpips_background</th>"));
    assert!(html.contains("<h2>SD Tuned</h2>") && html.contains("<h2>Best and worst items</h2>"));
    // Each strip row: the reference and 3 outputs; nothing loaded from outside the page.
    assert_eq!(html.matches("src='data:image/png;base64,").count(), 3 * 4);
    assert!(!html.contains("src='http") && !html.contains("src='file"));
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
        (vec!["--model", m.to_str().unwrap(), "--tune-grid", "0.5,1.5"], "strength 1.5 is outside (0, 1]"),
        (vec!["--model", m.to_str().unwrap(), "--tune-cases", "0"], "zero cases"),
        (vec!["--model", m.to_str().unwrap(), "--clip", "/nonexistent/clip"], "CLIP folder not found"),
        (vec!["--model", m.to_str().unwrap(), "--lpips", "/nonexistent/lpips.pth"], "LPIPS weights not found"),
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
