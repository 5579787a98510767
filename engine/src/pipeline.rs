//! txt2img and img2img, step for step as diffusers' StableDiffusion(Img2Img)Pipeline, with
//! an event per step that callers (the CLI, the gRPC service) turn into progress streams.
use super::explain::job::{pure_noise, ExplainJob};
pub use super::explain::job::{ExplainSummary, Heatmap, Manipulation, StepExplain, StepFraction};
use super::explain::{self, ExplainParams, ProtectParams, StartMode};
use super::image_io;
use super::model::StableDiffusion;
use super::schedulers::{self, Scheduler, SchedulerKind};
use anyhow::{bail, Result};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// libtorch's default CPU generator is process-wide; a job seeds it and draws all of its
/// noise at once under this lock, so concurrent jobs (and tests) cannot interleave draws.
static GENERATOR: Mutex<()> = Mutex::new(());

#[derive(Debug)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub width: i64,
    pub height: i64,
    /// img2img: the reference image [1, 3, H, W] in [-1, 1] at (width, height).
    pub reference: Option<Tensor>,
    /// img2img: how much of the schedule to run (diffusers' `strength`).
    pub strength: f64,
    /// img2img: SDEdit from the reference (default, diffusers' img2img) or pure noise at
    /// the strength's start timestep (the paper's code).
    pub start: StartMode,
    /// Grad-SAM latent manipulation (needs `reference`).
    pub explain: Option<ExplainParams>,
    /// A region kept from the reference at every step and bit-exact in the output (needs
    /// `reference`).
    pub protect: Option<ProtectParams>,
}

impl Clone for GenerateParams {
    fn clone(&self) -> Self {
        Self {
            reference: self.reference.as_ref().map(Tensor::shallow_clone),
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            explain: self.explain.clone(),
            protect: self.protect.clone(),
            ..*self
        }
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            steps: 20,
            guidance: 7.5,
            scheduler: SchedulerKind::Ddim,
            karras: false,
            width: 512,
            height: 512,
            reference: None,
            strength: 0.8,
            start: StartMode::Reference,
            explain: None,
            protect: None,
        }
    }
}

/// What happened in one denoising step.
pub struct StepEvent<'a> {
    /// 0-based index among the steps this job runs.
    pub index: usize,
    pub total: usize,
    pub timestep: f64,
    /// The latent entering the step (unscaled, as the scheduler holds it).
    pub latents_in: &'a Tensor,
    /// The latent leaving the step.
    pub latents: &'a Tensor,
    /// The scheduler's prediction of the clean latent x̂0 at this step.
    pub denoised: &'a Tensor,
    /// Grad-SAM / protection output of this step; None for plain jobs and plain steps.
    pub explain: Option<StepExplain<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

pub struct Generated {
    /// [3, H, W] float in [0, 1] on the CPU (diffusers' output_type="np", channels first).
    pub image: Tensor,
    pub latents: Tensor,
    pub timesteps: Vec<f64>,
    /// Jobs with Grad-SAM or a protected region.
    pub explain: Option<ExplainSummary>,
}

/// Noise for one job, drawn in the order diffusers draws from its generator.
struct JobNoise {
    vae_sample: Option<Tensor>,
    initial: Tensor,
    per_step: Vec<Tensor>,
    /// Grad-SAM / protection: the one ε that noises the reference, drawn after all of
    /// diffusers' draws so that those stay the same.
    reference: Option<Tensor>,
}

fn draw_noise(seed: u64, latent_shape: &[i64], img2img: bool, step_draws: usize, reference: bool) -> JobNoise {
    let _guard = GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let opts = (Kind::Float, Device::Cpu);
    // Same bits as torch.Generator().manual_seed(seed): libtorch takes the seed as u64.
    tch::manual_seed(seed as i64);
    let vae_sample = img2img.then(|| Tensor::randn(latent_shape, opts));
    let initial = Tensor::randn(latent_shape, opts);
    let per_step = (0..step_draws).map(|_| Tensor::randn(latent_shape, opts)).collect();
    let reference = reference.then(|| Tensor::randn(latent_shape, opts));
    JobNoise { vae_sample, initial, per_step, reference }
}

/// diffusers' img2img `get_timesteps`: the index of the first timestep to run.
pub fn img2img_start(steps: usize, strength: f64, order: usize) -> usize {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    steps.saturating_sub(init_timestep) * order
}

impl StableDiffusion {
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        let factor = self.vae_scale_factor();
        if p.width <= 0 || p.height <= 0 || p.width % factor != 0 || p.height % factor != 0 {
            bail!(
                "width and height must be positive multiples of {factor} for this model, got {}x{}",
                p.width,
                p.height
            );
        }
        if p.steps == 0 {
            bail!("steps must be at least 1");
        }
        if !p.guidance.is_finite() || p.guidance < 0.0 {
            bail!("guidance must be a finite number ≥ 0, got {}", p.guidance);
        }
        if let Some(reference) = &p.reference {
            if !(0.0..=1.0).contains(&p.strength) {
                bail!("strength must be in [0, 1], got {}", p.strength);
            }
            let size = reference.size();
            if size != [1, 3, p.height, p.width] {
                bail!("reference image is {:?}, expected [1, 3, {}, {}]", size, p.height, p.width);
            }
            if img2img_start(p.steps, p.strength, 1) >= p.steps {
                bail!("strength {} with {} steps leaves no step to run", p.strength, p.steps);
            }
        }
        explain::plan(self, p)?;
        Ok(())
    }

    pub fn scheduler(&self, p: &GenerateParams) -> Result<Box<dyn Scheduler>> {
        schedulers::build(p.scheduler, &self.scheduler_config, p.karras, p.steps)
    }

    /// Runs a whole job. `on_step` is called after every step; returning `Flow::Stop`
    /// ends the job early with an error (the caller asked to cancel).
    pub fn generate(&self, p: &GenerateParams, on_step: &mut dyn FnMut(&StepEvent) -> Flow) -> Result<Generated> {
        self.validate(p)?;
        let plan = explain::plan(self, p)?;
        let _no_grad = tch::no_grad_guard();
        let mut scheduler = self.scheduler(p)?;
        let timesteps = scheduler.timesteps().to_vec();
        let factor = self.vae_scale_factor();
        let channels = self.unet.config().in_channels;
        let latent_shape = [1, channels, p.height / factor, p.width / factor];

        let start = match &p.reference {
            Some(_) => img2img_start(p.steps, p.strength, scheduler.order()),
            None => 0,
        };
        let step_draws = if scheduler.needs_step_noise() { timesteps.len() - start } else { 0 };
        let noise = draw_noise(p.seed, &latent_shape, p.reference.is_some(), step_draws, plan.is_some());
        let to_dev = |t: &Tensor| t.to_device(self.device).to_kind(self.kind);

        let scaling = self.vae.config().scaling_factor;
        let mut reference_latents = None;
        let mut latents = match &p.reference {
            Some(reference) => {
                scheduler.set_begin_index(start);
                let dist = self.vae.encode(&to_dev(reference));
                let sample_noise = noise.vae_sample.as_ref().expect("img2img draws VAE noise");
                let init = dist.sample_with(&to_dev(sample_noise)) * scaling;
                let latents = match p.start {
                    StartMode::Reference => scheduler.add_noise(&init, &to_dev(&noise.initial), start),
                    StartMode::Noise => pure_noise(&*scheduler, &to_dev(&noise.initial), start),
                };
                reference_latents = Some(init);
                latents
            }
            None => to_dev(&noise.initial) * scheduler.init_noise_sigma(),
        };

        let guided = p.guidance > 1.0;
        let context =
            if guided { self.encode_prompts(&[&p.negative_prompt, &p.prompt]) } else { self.encode_prompt(&p.prompt) };
        // Cross-attention keys/values are computed from it once, in the first step.
        let context = self.unet.prepare_context(&context);
        // Grad-SAM explains the conditional branch alone.
        let states = context.states();
        let cond = if guided { states.narrow(0, 1, 1) } else { states.shallow_clone() };
        let mut job = plan.as_ref().map(|plan| {
            let eps = noise.reference.as_ref().expect("drawn for explain/protect jobs");
            ExplainJob::new(self, plan, reference_latents.as_ref(), eps, &to_dev)
        });

        let total = timesteps.len() - start;
        for (index, step_index) in (start..timesteps.len()).enumerate() {
            let t = timesteps[step_index];
            let manipulation = match job.as_mut() {
                Some(job) => job.before_step(self, &*scheduler, &mut latents, index, step_index, t, &cond)?,
                None => None,
            };
            let model_in = if guided { Tensor::cat(&[&latents, &latents], 0) } else { latents.shallow_clone() };
            let model_in = scheduler.scale_model_input(&model_in, step_index);
            let out = self.unet.forward_prepared(&model_in, t, &context);
            let noise_pred = if guided {
                let parts = out.chunk(2, 0);
                &parts[0] + (&parts[1] - &parts[0]) * p.guidance
            } else {
                out
            };
            let step_noise = noise.per_step.get(index).map(to_dev);
            let step = scheduler.step(&noise_pred, step_index, &latents, step_noise.as_ref());
            let event = StepEvent {
                index,
                total,
                timestep: t,
                latents_in: &latents,
                latents: &step.prev_sample,
                denoised: &step.pred_original_sample,
                explain: match (&plan, &manipulation) {
                    (Some(plan), m) if index == 0 || m.is_some() => {
                        Some(StepExplain { plan: (index == 0).then_some(plan), manipulation: m.as_ref() })
                    }
                    _ => None,
                },
            };
            if on_step(&event) == Flow::Stop {
                bail!(Cancelled);
            }
            latents = step.prev_sample;
        }

        let (image, explain) = match (job, &plan) {
            (Some(job), Some(plan)) => {
                let (image, summary) = job.finish(self, plan, p, &mut latents)?;
                (image, Some(summary))
            }
            _ => (self.decode_latents(&latents), None),
        };
        Ok(Generated { image, latents, timesteps: timesteps[start..].to_vec(), explain })
    }

    /// Scaled latents → [3, H, W] image in [0, 1] on the CPU.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let cfg = self.vae.config();
        let mut z = latents / cfg.scaling_factor;
        if let Some(shift) = cfg.shift_factor {
            z = z + shift;
        }
        image_io::postprocess(&self.vae.decode(&z))
    }
}

/// The error a job ends with when its caller stopped it.
#[derive(Debug, Clone, Copy)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}
