//! Whole txt2img/img2img runs against diffusers' pipelines (tests/fixtures/ref_pipeline.py):
//! every pixel within 3/255 and the mean within 0.5/255, for every scheduler and both
//! fixture layouts (SD1-style and SD2-style).
mod common;

use frisket_engine::model::StableDiffusion;
use frisket_engine::pipeline::{Flow, GenerateError};
use tch::Device;

#[test]
fn sd1_images_match_diffusers() {
    common::check_pipeline_images("sd1");
}

#[test]
fn sd2_images_match_diffusers() {
    common::check_pipeline_images("sd2");
}

/// The shipped tiny model (models/shapes, trained, fp16 files) renders as diffusers renders it.
#[test]
fn shipped_shapes_model_matches_diffusers() {
    common::check_pipeline_images("shapes");
}

/// Cancelling from the step callback stops the job with `GenerateError::Cancelled`.
#[test]
fn stopping_from_the_callback_cancels() {
    let model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let case = common::pipeline_cases().into_iter().find(|c| c["model"] == "sd1").unwrap();
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
    common::check_pipeline_images("sd-mixed");
}
