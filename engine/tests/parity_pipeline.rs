//! Whole txt2img/img2img runs against diffusers' pipelines (tests/fixtures/ref_pipeline.py):
//! every pixel within 3/255 and the mean within 0.5/255, for every scheduler and both
//! fixture layouts (SD1-style and SD2-style).
mod common;

use frisket_engine::model::StableDiffusion;
use frisket_engine::pipeline::{Flow, GenerateError};
use serde_json::Value;
use tch::{Device, Tensor};

fn cases() -> Vec<Value> {
    let path = common::fixtures().join("ref/pipeline/cases.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str::<Vec<Value>>(&text).unwrap()
}

fn check_model(model_name: &str) {
    let expected = common::read_ref("pipeline/images.safetensors");
    let model = StableDiffusion::load(&common::model_dir(model_name), Device::Cpu).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases().iter().filter(|c| c["model"] == model_name) {
        let key = case["key"].as_str().unwrap();
        let p = common::case_params(case, "pipeline");
        let mut steps_seen = 0;
        let out = model
            .generate(model.prepare(&p).unwrap_or_else(|e| panic!("{key}: {e:#}")), &mut |_| {
                steps_seen += 1;
                Flow::Continue
            })
            .unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let ours = out.image.permute([1, 2, 0]);
        let theirs: &Tensor = &expected[key];
        let diff = (&ours - theirs).abs();
        let (max, mean) = (diff.max().double_value(&[]) * 255.0, diff.mean(None).double_value(&[]) * 255.0);
        println!("{key}: {steps_seen} steps, max |Δ| {max:.4}/255, mean {mean:.5}/255");
        if max > 3.0 || mean > 0.5 {
            failures.push(format!("{key}: max {max:.3}/255 mean {mean:.4}/255"));
        }
        checked += 1;
    }
    assert!(checked >= 10, "expected at least 10 cases for {model_name}, found {checked}");
    assert!(failures.is_empty(), "images differ from diffusers:\n{}", failures.join("\n"));
}

#[test]
fn sd1_images_match_diffusers() {
    check_model("sd1");
}

#[test]
fn sd2_images_match_diffusers() {
    check_model("sd2");
}

/// The shipped tiny model (models/shapes, trained, fp16 files) renders as diffusers renders it.
#[test]
fn shipped_shapes_model_matches_diffusers() {
    check_model("shapes");
}

/// Cancelling from the step callback stops the job with `GenerateError::Cancelled`.
#[test]
fn stopping_from_the_callback_cancels() {
    let model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let case = cases().into_iter().find(|c| c["model"] == "sd1").unwrap();
    let mut calls = 0;
    let err = model
        .generate(model.prepare(&common::case_params(&case, "pipeline")).unwrap(), &mut |_| {
            calls += 1;
            if calls == 2 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .err()
        .expect("job should stop");
    assert!(matches!(err, GenerateError::Cancelled), "{err:#}");
    assert_eq!(calls, 2);
}

/// A layout no published checkpoint has (2 UNet blocks, per-block layer and head counts,
/// 4-block VAE without mid attention, sharded weights).
#[test]
fn mixed_layout_images_match_diffusers() {
    check_model("sd-mixed");
}
