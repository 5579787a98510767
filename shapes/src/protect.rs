//! The protect task: a one-object reference scene whose object is kept, and a prompt for a
//! second object (another colour, another cell) that the generator placed validly beside it in
//! the same scene (the target). Seed ranges in use: the trainer's eval_tiny 700_000..,
//! tune_probe 800_000..; frisket-eval's A/B runner 900_000.. (held out) and 950_000.. (its
//! tuning split).
use crate::{generate, BackgroundSpec, GenConfig, GenError, ObjectInfo, ObjectQuery, ObjectSpec, Scene};

pub struct ProtectCase {
    pub reference: Scene,
    /// The two-object scene the reference and prompt come from: its masks are the true regions
    /// of the kept object (0) and the requested one (1).
    pub target: Scene,
    pub kept: ObjectInfo,
    pub wanted: ObjectInfo,
    pub prompt: String,
}

pub fn protect_case(seed: u64) -> Result<ProtectCase, GenError> {
    let target = generate(seed, &GenConfig::default().with_objects(2))?;
    let (kept, wanted) = (target.meta.objects[0].clone(), target.meta.objects[1].clone());
    let reference = generate(
        seed,
        &GenConfig::default()
            .with_objects(1)
            .with_object(ObjectSpec::exact(&kept))
            .with_background(BackgroundSpec::Exact(target.meta.background.clone())),
    )?;
    let prompt = ObjectQuery::from_info(&wanted).phrase(&Default::default());
    Ok(ProtectCase { reference, target, kept, wanted, prompt })
}
