//! diffusers' DDPMScheduler (the paper's scheduler): the ancestral sampler of Ho et al. Its
//! step() draws `randn(model_output.shape)` from the pipeline's generator, in the model
//! output's dtype, on every step whose timestep is above 0; here the pipeline passes that
//! draw in as `noise`.
use super::ddim::{alpha_add_noise, alpha_at, alpha_x0, integer_timesteps};
use super::{get, scalar, sqrt32, to_f32_vec, ClassConfig, PredictionType, Scheduler, StepOutput};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use tch::Tensor;

/// The variance_type values implemented: how the step's noise is scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variance {
    /// √β̃_t, β̃_t = (1 − ᾱ_prev)/(1 − ᾱ_t)·β_t (the posterior variance, floored at 1e-20).
    Small,
    /// exp(½·log β̃_t): the same value through log and exp.
    SmallLog,
    /// √β_t.
    Large,
}

pub struct Ddpm {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    alphas_cumprod_f64: Vec<f64>,
    prediction: PredictionType,
    clip: Option<f32>,
    variance: Variance,
}

impl Ddpm {
    pub(super) fn new(c: &ClassConfig, n: usize) -> Result<Self> {
        c.unsupported("thresholding", json!(false))?;
        let variance = match c.other("variance_type") {
            None => Variance::Small,
            Some(Value::String(v)) => match v.as_str() {
                "fixed_small" => Variance::Small,
                "fixed_small_log" => Variance::SmallLog,
                "fixed_large" => Variance::Large,
                other => bail!(
                    "DDPMScheduler option variance_type = \"{other}\" is not supported (fixed_small, fixed_small_log, fixed_large)"
                ),
            },
            Some(v) => bail!("DDPMScheduler option variance_type = {v} is not a string"),
        };
        let alphas_cumprod = to_f32_vec(&c.alphas_cumprod(false)?);
        Ok(Self {
            timesteps: integer_timesteps(c, n)?,
            alphas_cumprod_f64: alphas_cumprod.iter().map(|&a| a as f64).collect(),
            alphas_cumprod,
            prediction: c.prediction_type()?,
            clip: get!(c, clip_sample, true).then(|| get!(c, clip_sample_range, 1.0) as f32),
            variance,
        })
    }

    /// (ᾱ_t, ᾱ_prev) at the step: the previous timestep is the next entry of the schedule,
    /// past the last one ᾱ_prev is 1.
    fn alphas(&self, step_index: usize) -> (f32, f32) {
        let t = self.timesteps[step_index] as i64;
        let alpha_prev = match self.timesteps.get(step_index + 1) {
            Some(&prev) if prev >= 0.0 => alpha_at(&self.alphas_cumprod, prev as i64),
            Some(_) | None => 1.0,
        };
        (alpha_at(&self.alphas_cumprod, t), alpha_prev)
    }

    /// The standard deviation of the step's noise (a 0-dim float32 tensor, as diffusers').
    fn noise_scale(&self, alpha_t: f32, alpha_prev: f32) -> Tensor {
        let current_beta = 1.0 - alpha_t / alpha_prev;
        let small = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
        match self.variance {
            Variance::Small => scalar(small).pow_tensor_scalar(0.5),
            Variance::SmallLog => (scalar(small).log() * 0.5).exp(),
            Variance::Large => scalar(current_beta).pow_tensor_scalar(0.5),
        }
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> StepOutput {
        let (alpha_t, alpha_prev) = self.alphas(step_index);
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let mut pred_original = alpha_x0(self.prediction, model_output, sample, alpha_t);
        if let Some(r) = self.clip {
            pred_original = pred_original.clamp(-r as f64, r as f64);
        }
        // float32 scalar arithmetic in diffusers' order.
        let x0_coeff = sqrt32(alpha_prev) * current_beta / beta_t;
        let sample_coeff = sqrt32(current_alpha) * beta_prev / beta_t;
        let mut prev_sample = &pred_original * x0_coeff as f64 + sample * sample_coeff as f64;
        if self.needs_step_noise(step_index) {
            let noise = noise.expect("the ddpm scheduler needs step noise (needs_step_noise)");
            prev_sample += self.noise_scale(alpha_t, alpha_prev) * noise.to_kind(model_output.kind());
        }
        StepOutput { prev_sample, pred_original_sample: pred_original }
    }

    fn needs_step_noise(&self, step_index: usize) -> bool {
        self.timesteps[step_index] > 0.0
    }

    fn pred_original(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        alpha_x0(self.prediction, model_output, sample, self.alphas(step_index).0)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Tensor {
        alpha_add_noise(self.alphas(step_index).0, original, noise)
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod_f64
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }
}
