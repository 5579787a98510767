//! `frisket-server render --loras DIR --lora NAME:WEIGHT`: the diffusers image with the LoRA
//! (tests/fixtures/ref_lora.py), and a LoRA for another model refused by key.
#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};

fn render(lora: &str, out_png: &std::path::Path) -> Output {
    let (model, loras) = (common::model_dir("sd1"), common::fixtures().join("lora"));
    Command::new(env!("CARGO_BIN_EXE_frisket-server"))
        .arg("render")
        .args(["--model", model.to_str().unwrap(), "--loras", loras.to_str().unwrap(), "--lora", lora])
        .args(["--prompt", "a red circle on a blue background", "--negative-prompt", "blurry"])
        .args(["--seed", "11", "--steps", "6", "--guidance", "7.5", "--scheduler", "ddim"])
        .args(["--width", "64", "--height", "64", "--quiet", "--out", out_png.to_str().unwrap()])
        .output()
        .expect("running frisket-server")
}

#[test]
fn render_with_a_lora_writes_the_diffusers_image() {
    let dir = std::env::temp_dir().join(format!("frisket-cli-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_png = dir.join("out.png");
    let out = render("sd1_kohya:0.8", &out_png);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = image::open(&out_png).unwrap().to_rgb8();
    let expected = common::read_ref("lora/images.safetensors");
    let theirs = &expected["sd1/kohya"];
    let (mut worst, mut sum) = (0.0f64, 0.0f64);
    for (x, y, px) in ours.enumerate_pixels() {
        for c in 0..3 {
            let d = (px[c] as f64 - theirs.double_value(&[y as i64, x as i64, c as i64]) * 255.0).abs();
            worst = worst.max(d);
            sum += d;
        }
    }
    let mean = sum / (64.0 * 64.0 * 3.0);
    println!("render --lora sd1_kohya:0.8: max |Δ| {worst:.3}/255, mean {mean:.4}/255");
    assert!(worst <= 3.0 && mean <= 0.5, "max {worst}/255 mean {mean}/255");

    let out = render("sd2_kohya", &dir.join("refused.png"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
