//! Training data: scenes drawn on the fly by the shapes generator (no dataset on disk).
//! Seeds are split by range so that training never sees an evaluation scene's seed, and
//! captions equal to a held-out eval prompt are skipped, so the eval prompts are truly unseen.
use crate::engine::image_io::rgb_to_tensor;
use crate::engine::pipeline::GenerateParams;
use crate::engine::protect::ProtectParams;
use frisket_shapes::rng::Rng;
use frisket_shapes::{generate, generate_default, GenConfig, ObjectSpec, Scene, Shape};
use std::collections::HashSet;
use tch::{Kind, Tensor};

/// Training scenes use seeds from here up (the eval sets use seeds below 1_000_000).
pub const TRAIN_SEED_BASE: u64 = 1 << 32;

/// The held-out single-object eval scenes: seeds 0..n with one object (eval_tiny renders their
/// captions and judges the results).
pub fn eval_single_object_scenes(n: u64) -> Vec<Scene> {
    let cfg = GenConfig::default().with_objects(1);
    (0..n).map(|seed| generate(seed, &cfg).expect("one object always fits")).collect()
}

pub use frisket_shapes::protect::{protect_case, ProtectCase};

/// A protect case's job: img2img from the reference at `strength`, the kept object's exact mask
/// protected.
pub fn protect_params(case: &ProtectCase, base: &GenerateParams, seed: u64, strength: f64) -> GenerateParams {
    let (w, h) = case.reference.image.dimensions();
    let mask = Tensor::from_slice(&case.reference.masks[0].to_gray().into_raw()).view([h as i64, w as i64]);
    GenerateParams {
        prompt: case.prompt.clone(),
        seed,
        reference: Some(rgb_to_tensor(&case.reference.image)),
        strength,
        protect: Some(ProtectParams { mask, feather: 0 }),
        ..base.clone()
    }
}

/// RGB u8 image → [3, H, W] float in [-1, 1] (the VAE's input range).
pub fn image_tensor(scene: &Scene) -> Tensor {
    let (w, h) = scene.image.dimensions();
    let t = Tensor::from_slice(scene.image.as_raw()).view([h as i64, w as i64, 3]).permute([2, 0, 1]);
    t.to_kind(Kind::Float) / 127.5 - 1.0
}

/// The caption without its background phrase ("a red circle on the right"): prompts that
/// name only the subject, as a user editing a reference image writes them.
pub fn subject_only(caption: &str) -> &str {
    // Object phrases say "on the left/right"; the background phrase is the only " on a(n) ".
    caption.rsplit_once(" on a ").or_else(|| caption.rsplit_once(" on an ")).map_or(caption, |(s, _)| s)
}

/// One in FOCUS_ONE_IN of a focused single-object batch's scenes shows a focus shape.
pub const FOCUS_ONE_IN: u64 = 2;

/// How one training batch is drawn.
pub struct BatchSpec<'a> {
    pub run_seed: u64,
    pub step: u64,
    pub size: usize,
    /// Use one-object scenes for this batch (the eval's main prompts are single-object).
    pub single_object: bool,
    /// Captions never trained on.
    pub held_out: &'a HashSet<String>,
    /// Shapes drawn more often: one in FOCUS_ONE_IN of a single-object batch's scenes takes
    /// one of these (empty: every shape equally likely).
    pub focus: &'a [Shape],
}

/// A batch: images [n, 3, H, W] in [-1, 1] and their captions.
pub fn batch(spec: &BatchSpec) -> (Tensor, Vec<String>) {
    let (x, _, caps) = batch_with_objects(spec);
    (x, caps)
}

/// The batch's scenes: drawn in order from the step's own seed range, skipping held-out captions.
fn scenes(spec: &BatchSpec) -> Vec<Scene> {
    let cfg = if spec.single_object { GenConfig::default().with_objects(1) } else { GenConfig::default() };
    let focused = |seed: u64| {
        let mut rng = Rng::new(seed ^ 0xf0c5);
        match spec.focus.is_empty() || rng.chance(FOCUS_ONE_IN - 1, FOCUS_ONE_IN) {
            true => None,
            false => {
                Some(cfg.clone().with_object(ObjectSpec { shape: Some(rng.pick(spec.focus)), ..ObjectSpec::any() }))
            }
        }
    };
    (0u64..)
        // Disjoint seed ranges per step (2^12 draws per step leave room for skips).
        .map(|i| TRAIN_SEED_BASE + spec.run_seed.wrapping_mul(1 << 40) + (spec.step << 12) + i)
        .map(|seed| match (spec.single_object, focused(seed)) {
            (false, _) => generate_default(seed),
            (true, focused_cfg) => {
                generate(seed, focused_cfg.as_ref().unwrap_or(&cfg)).expect("one object always fits")
            }
        })
        .filter(|s| !spec.held_out.contains(&s.meta.caption))
        .take(spec.size)
        .collect()
}

/// `batch`, plus which object owns each pixel: [n, 1, H, W], 0 background, k + 1 object k.
pub fn batch_with_objects(spec: &BatchSpec) -> (Tensor, Tensor, Vec<String>) {
    let scenes = scenes(spec);
    let imgs: Vec<Tensor> = scenes.iter().map(image_tensor).collect();
    let objs: Vec<Tensor> = scenes
        .iter()
        .map(|s| {
            let side = s.meta.size as i64;
            let owned: Vec<f32> = s.owner.iter().map(|&o| o as f32).collect();
            Tensor::from_slice(&owned).view([1, side, side])
        })
        .collect();
    let caps = scenes.into_iter().map(|s| s.meta.caption).collect();
    (Tensor::stack(&imgs, 0), Tensor::stack(&objs, 0), caps)
}

/// The captions of a batch's scenes, without the images (the text encoder's pre-training).
pub fn captions(spec: &BatchSpec) -> Vec<String> {
    scenes(spec).into_iter().map(|s| s.meta.caption).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn focus_shapes_fill_half_of_the_single_object_scenes_only() {
        let held = HashSet::new();
        let spec =
            |single_object, focus| BatchSpec { run_seed: 3, step: 1, size: 210, single_object, held_out: &held, focus };
        let stars = |s: &[Scene]| s.iter().filter(|s| s.meta.objects[0].shape == Shape::Star).count();
        // One shape in seven without focus (30 of 210); half, plus a seventh of the rest, with it (120).
        assert!((15..=45).contains(&stars(&scenes(&spec(true, &[])))));
        assert!((100..=140).contains(&stars(&scenes(&spec(true, &[Shape::Star])))));
        let hashes = |s: Vec<Scene>| s.iter().map(Scene::hash).collect::<Vec<_>>();
        assert_eq!(hashes(scenes(&spec(false, &[]))), hashes(scenes(&spec(false, &[Shape::Star]))));
    }
}
