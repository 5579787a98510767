//! Whole txt2img/img2img runs with the samplers that draw generator noise inside their
//! steps (DDPM, DPM-Solver++ SDE), UniPC and the karras variants, against diffusers'
//! pipelines (tests/fixtures/ref_pipeline_samplers.py): every pixel within 3/255 and the
//! mean within 0.5/255, as the other pipeline parity tests hold. The images only match if
//! each step's noise is drawn from the job's generator in diffusers' order.
mod common;

use frisket_engine::model::StableDiffusion;
use frisket_engine::pipeline::Flow;
use serde_json::Value;
use tch::{Device, Tensor};

fn cases() -> Vec<Value> {
    let path = common::fixtures().join("ref/pipeline_samplers/cases.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn check_model(model_name: &str, min_cases: usize) {
    let expected = common::read_ref("pipeline_samplers/images.safetensors");
    let model = StableDiffusion::load(&common::model_dir(model_name), Device::Cpu).unwrap();
    let (mut failures, mut checked) = (Vec::new(), 0);
    for case in cases().iter().filter(|c| c["model"] == model_name) {
        let key = case["key"].as_str().unwrap();
        let job =
            model.prepare(&common::case_params(case, "pipeline_samplers")).unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let out = model.generate(job, &mut |_| Flow::Continue).unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let theirs: &Tensor = &expected[key];
        let diff = (out.image.permute([1, 2, 0]) - theirs).abs();
        let (max, mean) = (diff.max().double_value(&[]) * 255.0, diff.mean(None).double_value(&[]) * 255.0);
        println!("{key}: max |Δ| {max:.4}/255, mean {mean:.5}/255");
        if max > 3.0 || mean > 0.5 {
            failures.push(format!("{key}: max {max:.3}/255 mean {mean:.4}/255"));
        }
        checked += 1;
    }
    assert!(checked >= min_cases, "expected at least {min_cases} cases for {model_name}, found {checked}");
    assert!(failures.is_empty(), "images differ from diffusers:\n{}", failures.join("\n"));
}

#[test]
fn sd1_sampler_images_match_diffusers() {
    check_model("sd1", 12);
}

/// The shipped tiny model (v-prediction, zero-SNR, trailing spacing) with DDPM and the SDE.
#[test]
fn shipped_shapes_model_sampler_images_match_diffusers() {
    check_model("shapes", 4);
}
