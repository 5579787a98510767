//! `frisket-server render` with Grad-SAM and protection flags: the dump folder and its
//! manifest, the paper preset, and one-line errors.
#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};

fn render(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_frisket-server"))
        .arg("render")
        .args(args)
        .output()
        .expect("running frisket-server")
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got success");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "error should be one line, got:\n{stderr}");
    stderr
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("frisket-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn reference() -> String {
    common::fixtures().join("ref/pipeline/reference_sd1.png").to_str().unwrap().to_string()
}

#[test]
fn dump_dir_lists_every_map_in_order() {
    let dir = tempdir("explain-dump");
    let mask = dir.join("protect.png");
    let mut m = image::GrayImage::new(64, 48);
    for y in 10..30 {
        for x in 20..40 {
            m.put_pixel(x, y, image::Luma([200]));
        }
    }
    m.save(&mask).unwrap();
    let model = common::model_dir("sd1");
    let dump = dir.join("dump");
    let out_png = dir.join("out.png");
    let out = render(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a small yellow star at the top left",
        "--reference",
        &reference(),
        "--steps",
        "10",
        "--strength",
        "0.9",
        "--subject",
        "star",
        "--subject",
        "yellow",
        "--subject-index",
        "4",
        "--manipulate-at",
        "780,300",
        "--explain-layers",
        "last",
        "--mask-threshold",
        "0.4",
        "--protect",
        mask.to_str().unwrap(),
        "--feather",
        "2",
        "--dump-dir",
        dump.to_str().unwrap(),
        "--out",
        out_png.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("subjects star (token 4), yellow (token 3)"), "{stderr}");
    assert!(stderr.contains("bit-exact"), "{stderr}");
    let manifest: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dump.join("manifest.json")).unwrap()).unwrap();
    let kinds: Vec<String> = manifest
        .iter()
        .map(|e| format!("{}:{}:{}", e["kind"].as_str().unwrap(), e["step"], e["token_index"]))
        .collect();
    assert_eq!(
        kinds,
        [
            "protect:null:null",
            "heatmap:0:4",
            "heatmap:0:3",
            "mask:0:null",
            "heatmap:5:4",
            "heatmap:5:3",
            "mask:5:null",
            "change:null:null"
        ]
    );
    for e in &manifest {
        let npy = dump.join(e["path"].as_str().unwrap());
        let bytes = std::fs::read(&npy).unwrap();
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        assert!(npy.with_extension("png").is_file());
    }
    assert_eq!(manifest[1]["shape"], serde_json::json!([4, 12, 16]));
    assert_eq!(manifest[1]["token"], "star</w>");
    assert_eq!(manifest[1]["timestep"], 801.0);
    assert_eq!(manifest[7]["shape"], serde_json::json!([48, 64]));
    // The protected pixels are the reference's.
    let ours = image::open(&out_png).unwrap().to_rgb8();
    let theirs = image::open(reference()).unwrap().to_rgb8();
    for y in 10..30 {
        for x in 20..40 {
            assert_eq!(ours.get_pixel(x, y), theirs.get_pixel(x, y), "pixel ({x}, {y})");
        }
    }
}

#[test]
fn paper_preset_runs() {
    let dir = tempdir("explain-paper");
    let model = common::model_dir("sd1");
    let timings = dir.join("t.json");
    let out = render(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a duck floating",
        "--reference",
        &reference(),
        "--preset",
        "paper",
        "--steps",
        "20",
        "--out",
        dir.join("o.png").to_str().unwrap(),
        "--timings",
        timings.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("subjects duck (token 2), floating (token 3) [picked from the prompt]"), "{stderr}");
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(timings).unwrap()).unwrap();
    // 20 steps at strength 0.9: 18 run; 780, 520, 320 are manipulated.
    assert_eq!(t["step_seconds"].as_array().unwrap().len(), 18);
    assert_eq!(t["explain_seconds"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_explain_arguments_give_one_line_errors() {
    let dir = tempdir("explain-bad");
    let model = common::model_dir("sd1");
    let m = model.to_str().unwrap();
    let o = dir.join("o.png");
    let o = o.to_str().unwrap();
    let r = reference();
    let base =
        ["--model", m, "--prompt", "a small yellow star", "--reference", r.as_str(), "--steps", "10", "--out", o];
    let with = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        render(&args)
    };
    let e = one_line_error(&with(&["--subject-index", "80"]));
    assert!(e.contains("token index 80 is out of range"), "{e}");
    let e = one_line_error(&with(&["--manipulate-at", "999"]));
    assert!(e.contains("outside this job's schedule"), "{e}");
    let e = one_line_error(&with(&["--explain", "off", "--subject", "star"]));
    assert!(e.contains("--explain off"), "{e}");
    let e = one_line_error(&with(&["--explain-layers", "first"]));
    assert!(e.contains("first"), "{e}");
    let small = dir.join("small.png");
    image::GrayImage::from_pixel(8, 8, image::Luma([255])).save(&small).unwrap();
    let e = one_line_error(&with(&["--protect", small.to_str().unwrap()]));
    // The service's check: the mask must have the reference's size.
    assert!(e.contains("protected_mask is 8×8 but reference_image is 64×48"), "{e}");
    let blank = dir.join("blank.png");
    image::GrayImage::new(64, 48).save(&blank).unwrap();
    let e = one_line_error(&with(&["--protect", blank.to_str().unwrap()]));
    assert!(e.contains("blank"), "{e}");
    let e = one_line_error(&render(&["--model", m, "--prompt", "x", "--subject", "x", "--out", o]));
    assert!(e.contains("--reference"), "{e}");
}
