//! The `frisket-eval` binary: JSON on stdout, clear errors on bad input.
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn dir() -> PathBuf {
    let root = match std::env::var("FRISKET_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"),
    };
    root.join("eval")
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_frisket-eval")).args(args).output().unwrap()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("ref.json")).expect("run `make fixtures`")).unwrap()
}

#[test]
fn fid_and_kid_print_json() {
    let r = reference();
    let (a, b) = (dir().join("a"), dir().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let net = dir().join("inception/inception-2015-12-05.pt");
    let cache = std::env::temp_dir().join(format!("frisket-eval-cli-{}", std::process::id()));
    let out = run(&["fid", a, b, "--inception", net.to_str().unwrap(), "--cache", cache.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fid: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = r["clean_fid_exact"].as_f64().unwrap();
    assert_eq!(fid["mode"], "clean");
    assert_eq!(fid["n_a"], 24);
    assert!((fid["value"].as_f64().unwrap() - expected).abs() / expected <= 1e-4, "{fid} vs {expected}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("biased below 2048"));
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2, "one cached statistics file per folder");
    std::fs::remove_dir_all(&cache).unwrap();

    let out = run(&["kid", a, b, "--inception", net.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kid: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = r["clean_kid"].as_f64().unwrap();
    assert!((kid["value"].as_f64().unwrap() - expected).abs() / expected <= 1e-4, "{kid} vs {expected}");
}

#[test]
fn missing_weights_fail_clearly_and_print_nothing() {
    let a = dir().join("a");
    let out =
        run(&["fid", a.to_str().unwrap(), a.to_str().unwrap(), "--inception", "/no/such/inception.pt", "--no-cache"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Inception weights not found: /no/such/inception.pt"), "{err}");
}

#[test]
fn psnr_ssim_and_lpips_print_json() {
    let r = reference();
    let (pred, target, mask) = (dir().join("pred.png"), dir().join("target.png"), dir().join("mask.png"));
    for metric in ["psnr", "ssim"] {
        let out = run(&[metric, pred.to_str().unwrap(), target.to_str().unwrap(), "--mask", mask.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let expected = r["preservation"][metric].as_f64().unwrap();
        assert!((v["value"].as_f64().unwrap() - expected).abs() <= 1e-5, "{v} vs {expected}");
    }
    let weights = dir().join("lpips_alex.pth");
    let out = run(&[
        "lpips",
        pred.to_str().unwrap(),
        target.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = r["preservation"]["lpips"].as_f64().unwrap();
    assert!((v["value"].as_f64().unwrap() - expected).abs() <= 1e-5, "{v} vs {expected}");
    // A mask of another size is refused.
    let a0 = dir().join("a/000.png");
    let out = run(&["psnr", pred.to_str().unwrap(), target.to_str().unwrap(), "--mask", a0.to_str().unwrap()]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the mask is [64, 64]"));
}

#[test]
fn clip_score_and_direction_print_json() {
    let r = &reference()["clip"];
    let (images, prompts, clip) = (dir().join("clip_images"), dir().join("clip_prompts.txt"), dir().join("clip"));
    let (images, prompts, clip) = (images.to_str().unwrap(), prompts.to_str().unwrap(), clip.to_str().unwrap());
    let out = run(&["clip-score", images, "--prompts", prompts, "--clip", clip]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = r["score"].as_f64().unwrap();
    assert_eq!(v["metric"], "clip_score");
    assert_eq!(v["n"], 4);
    assert_eq!(v["scores"][3]["image"], "003.png");
    assert!((v["value"].as_f64().unwrap() - expected).abs() <= 1e-3, "{v} vs {expected}");

    let whole: Vec<f64> = (0..4).map(|i| v["scores"][i]["score"].as_f64().unwrap()).collect();

    // --masks: image 0 cropped to its mask's bounding box, the others with all-white masks (their
    // bounding box is the whole image, so their scores stay).
    let masks = std::env::temp_dir().join(format!("frisket-eval-masks-{}", std::process::id()));
    std::fs::create_dir_all(&masks).unwrap();
    std::fs::copy(dir().join("clip_mask.png"), masks.join("000.png")).unwrap();
    for i in 1..4 {
        let (w, h) = image::image_dimensions(dir().join(format!("clip_images/{i:03}.png"))).unwrap();
        image::GrayImage::from_pixel(w, h, image::Luma([255])).save(masks.join(format!("{i:03}.png"))).unwrap();
    }
    let out = run(&["clip-score", images, "--prompts", prompts, "--clip", clip, "--masks", masks.to_str().unwrap()]);
    std::fs::remove_dir_all(&masks).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["metric"], "clip_score_region");
    let region = r["region_score"].as_f64().unwrap();
    assert!((v["scores"][0]["score"].as_f64().unwrap() - region).abs() <= 1e-3, "{v} vs {region}");
    for (i, w) in whole.iter().enumerate().skip(1) {
        assert!((v["scores"][i]["score"].as_f64().unwrap() - w).abs() <= 1e-9, "{v}: image {i} vs {w}");
    }

    let (a, b) = (dir().join("clip_images/001.png"), dir().join("clip_images/000.png"));
    let (source, target) = ("a red circle on grey", "two blue squares");
    let out = run(&[
        "clip-direction",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--source",
        source,
        "--target",
        target,
        "--clip",
        clip,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = r["directional"].as_f64().unwrap();
    assert!((v["value"].as_f64().unwrap() - expected).abs() <= 1e-4, "{v} vs {expected}");

    // Fewer prompts than images, and a missing CLIP folder: clear errors, nothing on stdout.
    let three = std::env::temp_dir().join(format!("frisket-eval-three-{}", std::process::id()));
    std::fs::write(&three, "a\nb\nc\n").unwrap();
    let out = run(&["clip-score", images, "--prompts", three.to_str().unwrap(), "--clip", clip]);
    std::fs::remove_file(&three).unwrap();
    assert!(!out.status.success() && out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has 4 images but") && err.contains("has 3 prompts"), "{err}");
    let out = run(&["clip-score", images, "--prompts", prompts, "--clip", "/no/such/clip"]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CLIP folder not found: /no/such/clip"));
}

#[test]
fn pair64_prints_the_papers_number_labelled_not_fid() {
    let path = dir().join("pair64.json");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("run tests/fixtures/ref_pair64.py")).unwrap();
    let first = &r["pairs"][0];
    let pth = dir().join("pt_inception-2015-12-05-6726825d.pth");
    let (pth, a, b) = (pth.to_str().unwrap(), dir().join("a"), dir().join("b"));
    let (fa, fb) = (a.join(first["a"].as_str().unwrap()), b.join(first["b"].as_str().unwrap()));
    let out = run(&["pair64", fa.to_str().unwrap(), fb.to_str().unwrap(), "--inception", pth]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let one: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(one["label"], "the paper's per-pair 64-feature number, not FID");
    let (value, expected) = (one["value"].as_f64().unwrap(), first["value"].as_f64().unwrap());
    assert!((value - expected).abs() / expected <= 1e-6, "{value} vs torchmetrics {expected}");

    // Folders: pairs by file name, each pair and the mean.
    let out = run(&["pair64", a.to_str().unwrap(), b.to_str().unwrap(), "--inception", pth]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pairs = all["pairs"].as_array().unwrap();
    assert_eq!((all["n"].as_u64(), pairs.len()), (Some(24), 24));
    assert_eq!(pairs[0]["value"], one["value"]);
    let mean = pairs.iter().map(|p| p["value"].as_f64().unwrap()).sum::<f64>() / 24.0;
    assert!((all["value"].as_f64().unwrap() - mean).abs() <= 1e-9 * mean);

    let ts = dir().join("inception/inception-2015-12-05.pt");
    let other = dir().join("clip_images");
    for (args, want) in [
        (
            vec![fa.to_str().unwrap(), fb.to_str().unwrap(), "--inception", ts.to_str().unwrap()],
            "needs pytorch-fid's pt_inception",
        ),
        (vec![a.to_str().unwrap(), fb.to_str().unwrap(), "--inception", pth], "give two image files or two folders"),
        (vec![a.to_str().unwrap(), other.to_str().unwrap(), "--inception", pth], "do not hold the same file names"),
    ] {
        let out = run(&[&["pair64"], &args[..]].concat());
        assert!(!out.status.success() && out.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
