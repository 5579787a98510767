//! The defaults of a job's settings, and the paper's preset. Every front end (the gRPC
//! request, `frisket-server render`, the trainer's evaluation, the client's limit check)
//! takes them from here; the engine re-exports them as `pipeline::defaults`.
use crate::text::quote;
use crate::v1 as pb;
use std::borrow::Cow;
use tonic::Status;

pub const STEPS: usize = 20;
pub const GUIDANCE: f64 = 7.5;
pub const STRENGTH: f64 = 0.8;
pub const SCHEDULER: &str = "ddim";
/// The paper's manipulation timesteps (snapped to the job's schedule).
pub const TIMESTEPS: [f64; 3] = [780.0, 520.0, 320.0];
/// SDXL's crop conditioning (top, left): an uncropped picture.
pub const CROP_TOP_LEFT: (i64, i64) = (0, 0);

/// `--preset paper`: the settings of the paper's code: DDPM for 50 steps, CFG 8,
/// strength 0.9, a pure-noise start, and Grad-SAM fast on the last cross-attention layer
/// with k = 0.5.
pub mod paper {
    pub const NAME: &str = "paper";
    pub const SCHEDULER: &str = "ddpm";
    pub const STEPS: usize = 50;
    pub const GUIDANCE: f64 = 8.0;
    pub const STRENGTH: f64 = 0.9;
    pub const TIMESTEPS: [f64; 3] = super::TIMESTEPS;
    pub const MASK_THRESHOLD: f64 = 0.5;
}

/// diffusers' img2img `get_timesteps`: the index of the first timestep to run.
/// Images a request asks for: `num_images`, absent or 0 meaning 1.
pub fn num_images(req: &pb::GenerateRequest) -> u32 {
    req.num_images.unwrap_or(1).max(1)
}

/// The seed of image `index` of a request whose first image has `seed`.
pub fn image_seed(seed: u64, index: u32) -> u64 {
    seed.wrapping_add(index as u64)
}

pub fn img2img_start(steps: usize, strength: f64, order: usize) -> usize {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    steps.saturating_sub(init_timestep) * order
}

/// The request with its preset's values in the fields it leaves unset.
pub fn with_preset(req: &pb::GenerateRequest) -> Result<Cow<'_, pb::GenerateRequest>, Status> {
    match req.preset.as_str() {
        "" => Ok(Cow::Borrowed(req)),
        paper::NAME => {
            if req.reference_image.is_empty() {
                return Err(Status::invalid_argument("the paper preset needs a reference_image (img2img)"));
            }
            let mut r = req.clone();
            if r.scheduler.is_empty() {
                r.scheduler = paper::SCHEDULER.into();
            }
            r.steps.get_or_insert(paper::STEPS as u32);
            r.guidance.get_or_insert(paper::GUIDANCE);
            r.strength.get_or_insert(paper::STRENGTH);
            let e = r.explain.get_or_insert_with(Default::default);
            e.start.get_or_insert(pb::StartMode::Noise as i32);
            if *e.mode.get_or_insert(pb::ExplainMode::Fast as i32) != pb::ExplainMode::Off as i32 {
                if e.layers.trim().is_empty() {
                    e.layers = "last".into();
                }
                if e.manipulate_at.is_empty() {
                    e.manipulate_at = paper::TIMESTEPS.to_vec();
                }
                e.mask_threshold.get_or_insert(paper::MASK_THRESHOLD);
            }
            Ok(Cow::Owned(r))
        }
        other => Err(Status::invalid_argument(format!(
            "unknown preset {} (expected \"{}\" or none)",
            quote(other),
            paper::NAME
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{pb, with_preset};

    #[test]
    fn the_paper_preset_fills_only_unset_fields() {
        let req = pb::GenerateRequest { preset: "paper".into(), reference_image: vec![1], ..Default::default() };
        let r = with_preset(&req).unwrap().into_owned();
        assert_eq!((r.steps, r.guidance, r.strength), (Some(50), Some(8.0), Some(0.9)));
        assert_eq!(r.scheduler, "ddpm", "the paper's scheduler");
        let e = r.explain.unwrap();
        assert_eq!((e.mode, e.start), (Some(pb::ExplainMode::Fast as i32), Some(pb::StartMode::Noise as i32)));
        assert_eq!(
            (e.layers.as_str(), e.manipulate_at, e.mask_threshold),
            ("last", vec![780.0, 520.0, 320.0], Some(0.5))
        );

        let explicit = pb::ExplainOptions {
            mode: Some(pb::ExplainMode::Off as i32),
            start: Some(pb::StartMode::Reference as i32),
            ..Default::default()
        };
        let req = pb::GenerateRequest {
            steps: Some(20),
            scheduler: "euler-a".into(),
            explain: Some(explicit.clone()),
            ..req
        };
        let r = with_preset(&req).unwrap().into_owned();
        assert_eq!((r.steps, r.guidance, r.scheduler.as_str()), (Some(20), Some(8.0), "euler-a"));
        assert_eq!(r.explain, Some(explicit), "Grad-SAM off keeps its options unset");

        let none = pb::GenerateRequest::default();
        assert!(matches!(with_preset(&none).unwrap(), std::borrow::Cow::Borrowed(_)));
        let bad = pb::GenerateRequest { preset: "x".repeat(1000), reference_image: vec![1], ..Default::default() };
        let status = with_preset(&bad).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() < 200, "{}", status.message());
        let txt2img = pb::GenerateRequest { preset: "paper".into(), ..Default::default() };
        assert!(with_preset(&txt2img).unwrap_err().message().contains("reference_image"));
    }
}
