//! txt2img and img2img, step for step as diffusers' StableDiffusion(Img2Img)Pipeline.
//!
//! A job is planned once: [`StableDiffusion::prepare`] validates its parameters and
//! resolves them into a [`PreparedJob`] (scheduler, timesteps, start, Grad-SAM and
//! protection plans), which callers may read (to announce the job) and then hand to
//! [`StableDiffusion::generate`] (or to [`StableDiffusion::start`], to step it with others:
//! `run.rs`). Generation calls the job's step hooks (`hooks.rs`) and reports every step to
//! the caller, who turns it into progress streams.
use super::compare::Comparison;
use super::explain::edit::{Manipulation, StepFraction};
use super::explain::{ExplainParams, ExplainPlan};
use super::model::{SizeConditioning, StableDiffusion};
use super::protect::{ProtectParams, ProtectPlan};
use super::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::interrupt::{self, Interrupt, Interrupted};
use anyhow::{bail, ensure, Result};
use std::str::FromStr;
use tch::Tensor;

mod run;
pub use run::{BatchKey, JobRun};

/// The defaults of a job's settings and the paper's preset, defined with the API so that
/// clients resolve a request as the server does.
pub use frisket_proto::defaults;
pub use frisket_proto::defaults::img2img_start;

/// How a job with a reference image starts.
///
/// The default is `Reference` (SDEdit img2img): it is exactly diffusers' img2img, so a
/// request that only adds a reference keeps its meaning and its numbers, a protect-only
/// job starts consistent with the region it keeps, and Grad-SAM's first manipulation
/// already sees a latent laid out like the reference. `Noise` is the paper's code: pure
/// noise at the strength's start timestep, the reference entering only through the
/// manipulations (and the protected region); the paper preset selects it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartMode {
    #[default]
    Reference,
    Noise,
}

impl FromStr for StartMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "reference" => Self::Reference,
            "noise" => Self::Noise,
            other => bail!("unknown start {} (expected noise or reference)", crate::text::quote(other)),
        })
    }
}

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
    /// SDXL's size conditioning: the (width, height) the picture notionally had before
    /// cropping; `None`: the output size (diffusers' default).
    pub original_size: Option<(i64, i64)>,
    /// SDXL's crop conditioning, (top, left) in pixels.
    pub crop_top_left: (i64, i64),
}

impl GenerateParams {
    /// SDXL's time ids of this job.
    pub fn size_conditioning(&self) -> SizeConditioning {
        let target = (self.width, self.height);
        SizeConditioning { original: self.original_size.unwrap_or(target), crop_top_left: self.crop_top_left, target }
    }
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
            steps: defaults::STEPS,
            guidance: defaults::GUIDANCE,
            scheduler: SchedulerKind::Ddim,
            karras: false,
            width: 512,
            height: 512,
            reference: None,
            strength: defaults::STRENGTH,
            start: StartMode::Reference,
            explain: None,
            protect: None,
            original_size: None,
            crop_top_left: defaults::CROP_TOP_LEFT,
        }
    }
}

/// The scheduler a job runs and the index of its first step: 0 for txt2img, img2img's
/// start for a job with a reference at `strength`.
pub fn schedule(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    karras: bool,
    steps: usize,
    img2img_strength: Option<f64>,
) -> Result<(Box<dyn Scheduler>, usize)> {
    let scheduler = schedulers::build(kind, config, karras, steps)?;
    let start = match img2img_strength {
        Some(strength) => img2img_start(steps, strength, scheduler.order()),
        None => 0,
    };
    ensure!(
        start < scheduler.timesteps().len(),
        "strength {} with {steps} steps leaves no step to run: raise strength or steps",
        img2img_strength.unwrap_or(1.0)
    );
    Ok((scheduler, start))
}

/// A job planned against a model: validated, with everything resolved that the steps need.
pub struct PreparedJob {
    pub params: GenerateParams,
    scheduler: Box<dyn Scheduler>,
    /// Index of the first step in the scheduler's timesteps.
    pub start: usize,
    /// The timesteps this job runs, in order.
    pub timesteps: Vec<f64>,
    pub explain: Option<ExplainPlan>,
    pub protect: Option<ProtectPlan>,
    /// Stops `generate` within one UNet block, attribution chunk or decoder block of
    /// firing (`GenerateError::Cancelled`); never fires unless the caller sets one.
    pub interrupt: Interrupt,
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
    /// Grad-SAM's maps and mask, on a manipulated step (computed before the step's UNet
    /// call, from the latent entering it).
    pub manipulation: Option<&'a Manipulation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Why a job did not produce an image.
#[derive(Debug)]
pub enum GenerateError {
    /// The caller's step callback returned `Flow::Stop`, or the job's interrupt fired.
    Cancelled,
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for GenerateError {
    fn from(e: anyhow::Error) -> Self {
        if interrupt::is_interrupted(&e) {
            Self::Cancelled
        } else {
            Self::Failed(e)
        }
    }
}

impl From<Interrupted> for GenerateError {
    fn from(_: Interrupted) -> Self {
        Self::Cancelled
    }
}

impl std::fmt::Display for GenerateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cancelled => f.write_str("cancelled"),
            Self::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for GenerateError {}

pub struct Generated {
    /// [3, H, W] float in [0, 1] on the CPU (diffusers' output_type="np", channels first).
    pub image: Tensor,
    pub latents: Tensor,
    pub timesteps: Vec<f64>,
    /// img2img: the result against its reference (change map, PSNR inside and outside a
    /// protected region).
    pub comparison: Option<Comparison>,
    /// Grad-SAM: the share of latents from the reference at each manipulated step.
    pub reference_fractions: Vec<StepFraction>,
}

impl StableDiffusion {
    /// Validates `p` against this model and plans the job.
    pub fn prepare(&self, p: &GenerateParams) -> Result<PreparedJob> {
        let factor = self.vae_scale_factor();
        if p.width <= 0 || p.height <= 0 || p.width % factor != 0 || p.height % factor != 0 {
            bail!(
                "width and height must be positive multiples of {factor} for this model, got {}x{}",
                p.width,
                p.height
            );
        }
        ensure!(p.steps > 0, "steps must be at least 1");
        ensure!(
            p.guidance.is_finite() && p.guidance >= 0.0,
            "guidance must be a finite number ≥ 0, got {}",
            p.guidance
        );
        if let Some(reference) = &p.reference {
            ensure!((0.0..=1.0).contains(&p.strength), "strength must be in [0, 1], got {}", p.strength);
            let size = reference.size();
            ensure!(
                size == [1, 3, p.height, p.width],
                "reference image is {size:?}, expected [1, 3, {}, {}]",
                p.height,
                p.width
            );
        }
        if let Some((w, h)) = p.original_size {
            ensure!(w > 0 && h > 0, "original size must be positive, got {w}x{h}");
        }
        ensure!(
            p.crop_top_left.0 >= 0 && p.crop_top_left.1 >= 0,
            "crop top-left must not be negative, got {:?}",
            p.crop_top_left
        );
        if (p.explain.is_some() || p.protect.is_some()) && p.reference.is_none() {
            bail!("Grad-SAM manipulation and protected regions need a reference image (img2img)");
        }
        let strength = p.reference.as_ref().map(|_| p.strength);
        let (scheduler, start) = schedule(&self.scheduler_config, p.scheduler, p.karras, p.steps, strength)?;
        let timesteps = scheduler.timesteps()[start..].to_vec();
        let explain = p.explain.as_ref().map(|e| ExplainPlan::new(self, &p.prompt, e, &timesteps)).transpose()?;
        let protect = p.protect.as_ref().map(|m| ProtectPlan::new(m, p.width, p.height, factor)).transpose()?;
        Ok(PreparedJob {
            params: p.clone(),
            scheduler,
            start,
            timesteps,
            explain,
            protect,
            interrupt: Interrupt::default(),
        })
    }
}
