//! Shared helpers for the parity tests: where the fixtures are and how to compare.
#![allow(dead_code)]
use frisket_engine::tch::{self, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The fixtures directory written by `make fixtures` (tests/fixtures/*.py).
pub fn fixtures() -> PathBuf {
    match std::env::var("FRISKET_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"),
    }
}

/// A fixture model, or the shipped tiny model ("shapes", in the repo's models/).
pub fn model_dir(name: &str) -> PathBuf {
    if name == "shapes" {
        return PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/shapes");
    }
    fixtures().join("models").join(name)
}

/// Reads a reference safetensors file into a name → tensor map.
pub fn read_ref(rel: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("ref").join(rel);
    let tensors = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (run `make fixtures`)", path.display()));
    tensors.into_iter().collect()
}

/// ‖a − b‖₂ / ‖b‖₂, in f64.
pub fn rel_l2(actual: &Tensor, expected: &Tensor) -> f64 {
    let a = actual.to_kind(tch::Kind::Double);
    let b = expected.to_kind(tch::Kind::Double);
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let num = (&a - &b).norm().double_value(&[]);
    let den = b.norm().double_value(&[]);
    num / den.max(1e-30)
}

pub fn assert_rel_l2(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let err = rel_l2(actual, expected);
    println!("{what}: rel L2 error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: rel L2 error {err:.3e} exceeds {tol:.0e}");
}

/// The job of one fixture case (a cases.json entry written by tests/fixtures/ref_*.py):
/// prompt, negative prompt, seed, steps, guidance, size; the scheduler (ddim when absent),
/// an img2img reference image in `ref/<ref_dir>/` with its strength, and SDXL's
/// original_size / crop_top_left, where the case has them.
pub fn case_params(case: &serde_json::Value, ref_dir: &str) -> frisket_engine::pipeline::GenerateParams {
    use frisket_engine::image_io;
    let (scheduler, karras) =
        frisket_engine::schedulers::SchedulerKind::parse_with_karras(case["scheduler"].as_str().unwrap_or("ddim"))
            .unwrap();
    let reference = case["reference"].as_str().map(|name| {
        let path = fixtures().join("ref").join(ref_dir).join(name);
        image_io::rgb_to_tensor(&image_io::read_rgb(&path).unwrap())
    });
    let pair = |v: &serde_json::Value| (v[0].as_i64().unwrap(), v[1].as_i64().unwrap());
    let defaults = frisket_engine::pipeline::GenerateParams::default();
    frisket_engine::pipeline::GenerateParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        seed: case["seed"].as_u64().unwrap(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        scheduler,
        karras,
        width: case["width"].as_i64().unwrap(),
        height: case["height"].as_i64().unwrap(),
        reference,
        strength: case["strength"].as_f64().unwrap_or(defaults.strength),
        original_size: case["original_size"].as_array().map(|_| pair(&case["original_size"])),
        crop_top_left: case["crop_top_left"]
            .as_array()
            .map_or(defaults.crop_top_left, |_| pair(&case["crop_top_left"])),
        ..defaults
    }
}

/// The whole-run cases of tests/fixtures/ref_pipeline.py.
pub fn pipeline_cases() -> Vec<serde_json::Value> {
    let path = fixtures().join("ref/pipeline/cases.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
}

/// Renders every pipeline case of `model_name` and holds each image to diffusers': every
/// pixel within 3/255, the mean within 0.5/255.
pub fn check_pipeline_images(model_name: &str) {
    let expected = read_ref("pipeline/images.safetensors");
    let model = frisket_engine::model::StableDiffusion::load(&model_dir(model_name), tch::Device::Cpu).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in pipeline_cases().iter().filter(|c| c["model"] == model_name) {
        let key = case["key"].as_str().unwrap();
        let p = case_params(case, "pipeline");
        let mut steps_seen = 0;
        let out = model
            .generate(model.prepare(&p).unwrap_or_else(|e| panic!("{key}: {e:#}")), &mut |_| {
                steps_seen += 1;
                frisket_engine::pipeline::Flow::Continue
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
