//! What a job does to its latent besides denoising. The pipeline calls each [`StepHook`]
//! of a job around its steps; protected regions (`protect.rs`) and Grad-SAM manipulation
//! (`explain/edit.rs`) implement it. Hooks see the step through [`StepPoint`] and never
//! the pipeline itself.
use super::model::StableDiffusion;
use super::schedulers::Scheduler;
use super::unet::CrossContext;
use anyhow::Result;
use tch::Tensor;

/// Where a job stands when its hooks run.
pub struct StepPoint<'a> {
    pub model: &'a StableDiffusion,
    pub scheduler: &'a dyn Scheduler,
    /// 0-based index among the steps this job runs.
    pub index: usize,
    /// The same step's index in the scheduler's timesteps.
    pub step_index: usize,
    pub timestep: f64,
    /// The prompt's conditioning, one row (without the CFG branch): the text embedding
    /// [1, keys, D] and, for SDXL, its added conditioning.
    pub cond: &'a CrossContext,
}

pub trait StepHook {
    /// Before the step's UNet call, on the latent entering it.
    fn before_step(&mut self, at: &StepPoint, latents: &mut Tensor) -> Result<()>;

    /// After the last step, on the final latent, before it is decoded.
    fn before_decode(&mut self, _latents: &mut Tensor) {}

    /// On the decoded image [3, H, W] in [0, 1] (CPU).
    fn after_decode(&mut self, _image: &mut Tensor) {}
}

/// The reference a job's hooks pull its latent towards: E(ref) (scaled latents) and the
/// job's one ε, on the model's device.
pub struct ReferenceLatents {
    pub clean: Tensor,
    pub noise: Tensor,
}

impl ReferenceLatents {
    /// The reference noised to the timestep of `step_index` (the scheduler's add_noise, so
    /// right for DDIM and σ-space schedulers alike).
    pub fn noised(&self, scheduler: &dyn Scheduler, step_index: usize) -> Tensor {
        scheduler.add_noise(&self.clean, &self.noise, step_index)
    }
}

impl Clone for ReferenceLatents {
    fn clone(&self) -> Self {
        Self { clean: self.clean.shallow_clone(), noise: self.noise.shallow_clone() }
    }
}
