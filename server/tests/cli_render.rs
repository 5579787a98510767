//! The `frisket-server render` command: output against diffusers, and its errors.
#[path = "../../engine/tests/common/mod.rs"]
mod common;

use frisket_engine::tch;
use std::path::Path;
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

#[test]
fn render_writes_the_diffusers_image() {
    let dir = tempdir("render");
    let out_png = dir.join("out.png");
    let model = common::model_dir("sd1");
    // The sd1/ddim/txt2img case of tests/fixtures/ref_pipeline.py.
    let out = render(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "A small yellow STAR, top-left!",
        "--negative-prompt",
        "blurry",
        "--seed",
        "1000",
        "--steps",
        "8",
        "--guidance",
        "7.5",
        "--scheduler",
        "ddim",
        "--width",
        "64",
        "--height",
        "48",
        "--out",
        out_png.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = image::open(&out_png).unwrap().to_rgb8();
    let expected = common::read_ref("pipeline/images.safetensors");
    let theirs = &expected["sd1/ddim/txt2img"];
    assert_eq!((ours.width(), ours.height()), (64, 48));
    let mut worst = 0.0f64;
    for (x, y, px) in ours.enumerate_pixels() {
        for c in 0..3 {
            let want = theirs.double_value(&[y as i64, x as i64, c as i64]) * 255.0;
            worst = worst.max((px[c] as f64 - want).abs());
        }
    }
    println!("worst pixel difference {worst:.3}/255");
    assert!(worst <= 3.5, "PNG differs from diffusers by {worst}/255");
}

#[test]
fn bad_arguments_give_one_line_errors() {
    let model = common::model_dir("sd1");
    let m = model.to_str().unwrap();
    let dir = tempdir("bad-args");
    let o = dir.join("o.png");
    let o = o.to_str().unwrap();
    let e = one_line_error(&render(&["--model", m, "--prompt", "x", "--scheduler", "plms", "--out", o]));
    assert!(e.contains("plms") && e.contains("ddim"), "{e}");
    let e = one_line_error(&render(&["--model", m, "--prompt", "x", "--width", "66", "--height", "48", "--out", o]));
    assert!(e.contains("multiple"), "{e}");
    let e = one_line_error(&render(&["--model", m, "--prompt", "x", "--steps", "0", "--out", o]));
    assert!(e.contains("steps"), "{e}");
    let e = one_line_error(&render(&["--model", "/nonexistent/model", "--prompt", "x", "--out", o]));
    assert!(e.contains("/nonexistent/model"), "{e}");
    let e = one_line_error(&render(&["--prompt", "x", "--out", o]));
    assert!(e.contains("--model"), "{e}");
    let e = one_line_error(&render(&["--model", m, "--prompt", "x", "--steps", "many", "--out", o]));
    assert!(e.contains("many"), "{e}");
}

/// `render` takes `serve`'s limit flags and config file, and refuses as the service would.
#[test]
fn render_applies_the_limits_of_its_flags_and_config_file() {
    let model = common::model_dir("sd1");
    let m = model.to_str().unwrap();
    let dir = tempdir("limits");
    let o = dir.join("o.png");
    let o = o.to_str().unwrap();
    let config = dir.join("limits.toml");
    std::fs::write(&config, "[limits]\nmax_steps = 3\n").unwrap();
    let c = config.to_str().unwrap();
    let e = one_line_error(&render(&["--model", m, "--prompt", "x", "--steps", "4", "--config", c, "--out", o]));
    assert!(e.contains("steps 4") && e.contains("limit of 3 (max_steps)"), "{e}");
    let args = ["--model", m, "--prompt", "x", "--steps", "2", "--width", "128", "--height", "64", "--out", o];
    let e = one_line_error(&render(&[&args[..], &["--config", c, "--max-side", "96"]].concat()));
    assert!(e.contains("128×64") && e.contains("(max_side)"), "{e}");
    std::fs::write(&config, "[limits]\nmax_sides = 3\n").unwrap();
    let e = one_line_error(&render(&["--model", m, "--prompt", "x", "--config", c, "--out", o]));
    assert!(e.contains("max_sides") && e.contains("limits.toml"), "{e}");
    assert!(!Path::new(o).exists());
}

#[test]
fn broken_model_folder_names_the_tensor() {
    let dir = tempdir("broken-model");
    copy_dir(&common::model_dir("sd1"), &dir.join("model"));
    let unet_file = dir.join("model/unet/diffusion_pytorch_model.safetensors");
    let mut tensors = tch::Tensor::read_safetensors(&unet_file).unwrap();
    let missing = "mid_block.resnets.1.conv2.weight";
    tensors.retain(|(name, _)| name != missing);
    tch::Tensor::write_safetensors(&tensors, &unet_file).unwrap();
    let o = dir.join("o.png");
    let e = one_line_error(&render(&[
        "--model",
        dir.join("model").to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        o.to_str().unwrap(),
    ]));
    assert!(e.contains(missing), "{e}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("frisket-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
