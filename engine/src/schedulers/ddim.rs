//! diffusers' DDIMScheduler with eta = 0 (what the SD pipelines pass): deterministic, no
//! generator noise.
use super::{
    coefficient, get, spaced_timesteps, sqrt32, to_f32_vec, ClassConfig, PredictionType, Scheduler, StepOutput,
};
use anyhow::{bail, Result};
use serde_json::json;
use tch::Tensor;

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    alphas_cumprod_f64: Vec<f64>,
    final_alpha_cumprod: f32,
    /// The distance to the previous timestep: always train // steps, whatever the spacing
    /// (as diffusers, even where that is not the next timestep).
    step_ratio: i64,
    prediction: PredictionType,
    clip: Option<f32>,
}

impl Ddim {
    pub(super) fn new(c: &ClassConfig, n: usize) -> Result<Self> {
        c.unsupported("thresholding", json!(false))?;
        let train = c.num_train_timesteps();
        let alphas_cumprod = to_f32_vec(&c.alphas_cumprod(false)?);
        let timesteps = integer_timesteps(c, n)?;
        let final_alpha_cumprod = if get!(c, set_alpha_to_one, true) { 1.0 } else { alphas_cumprod[0] };
        let clip = get!(c, clip_sample, true).then(|| get!(c, clip_sample_range, 1.0) as f32);
        Ok(Self {
            timesteps,
            alphas_cumprod_f64: alphas_cumprod.iter().map(|&a| a as f64).collect(),
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (train / n) as i64,
            prediction: c.prediction_type()?,
            clip,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        alpha_at(&self.alphas_cumprod, t)
    }
}

/// DDIM's and DDPM's int64 timesteps (leading spacing by default): linspace values rounded
/// half-to-even (np.round). Timesteps past the train range are refused (diffusers fails on
/// them while stepping).
pub(super) fn integer_timesteps(c: &ClassConfig, n: usize) -> Result<Vec<f64>> {
    let train = c.num_train_timesteps();
    let timesteps: Vec<f64> = spaced_timesteps(c.spacing("leading")?, train, n, get!(c, steps_offset, 0))
        .into_iter()
        .map(f64::round_ties_even)
        .collect();
    if let Some(t) = timesteps.iter().find(|&&t| t >= train as f64) {
        bail!("{}: timestep {t} is beyond the {train} train timesteps (steps_offset too large for {n} steps)", c.class);
    }
    Ok(timesteps)
}

/// ᾱ at an integer timestep; Python indexing, so the -1 that trailing spacing can produce
/// reads the last entry.
pub(super) fn alpha_at(alphas_cumprod: &[f32], t: i64) -> f32 {
    alphas_cumprod[t.rem_euclid(alphas_cumprod.len() as i64) as usize]
}

/// x̂0 from the model output at ᾱ_t, as DDIM and DDPM compute it (float32 scalars).
pub(super) fn alpha_x0(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> Tensor {
    let (sqrt_a, sqrt_b) = (sqrt32(alpha_prod_t) as f64, sqrt32(1.0 - alpha_prod_t) as f64);
    match prediction {
        PredictionType::Epsilon => (sample - model_output * sqrt_b) / sqrt_a,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample * sqrt_a - model_output * sqrt_b,
    }
}

/// √ᾱ_t·x0 + √(1−ᾱ_t)·ε with the coefficients in the sample's dtype, as DDIM's and DDPM's
/// add_noise.
pub(super) fn alpha_add_noise(alpha_prod_t: f32, original: &Tensor, noise: &Tensor) -> Tensor {
    let a = coefficient(alpha_prod_t, original);
    let sqrt_alpha = a.pow_tensor_scalar(0.5);
    let sqrt_one_minus_alpha = a.rsub_scalar(1.0).pow_tensor_scalar(0.5);
    sqrt_alpha * original + sqrt_one_minus_alpha * noise
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> StepOutput {
        let t = self.timesteps[step_index] as i64;
        let prev_t = t - self.step_ratio;
        let alpha_prod_t = self.alpha_at(t);
        let alpha_prod_t_prev = if prev_t >= 0 { self.alpha_at(prev_t) } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        // float32 scalars, exactly as diffusers' 0-dim tensors; no upcast of the sample.
        let (sqrt_a, sqrt_b) = (sqrt32(alpha_prod_t) as f64, sqrt32(beta_prod_t) as f64);
        let (mut pred_original, pred_epsilon) = match self.prediction {
            PredictionType::Epsilon => ((sample - model_output * sqrt_b) / sqrt_a, model_output.shallow_clone()),
            PredictionType::Sample => {
                let x0 = model_output.shallow_clone();
                let eps = (sample - &x0 * sqrt_a) / sqrt_b;
                (x0, eps)
            }
            PredictionType::VPrediction => {
                (sample * sqrt_a - model_output * sqrt_b, model_output * sqrt_a + sample * sqrt_b)
            }
        };
        if let Some(r) = self.clip {
            pred_original = pred_original.clamp(-r as f64, r as f64);
        }
        // eta = 0: std_dev_t is 0, the direction coefficient √(1 − ᾱ_prev − 0).
        let direction = pred_epsilon * sqrt32(1.0 - alpha_prod_t_prev) as f64;
        let prev_sample = &pred_original * sqrt32(alpha_prod_t_prev) as f64 + direction;
        StepOutput { prev_sample, pred_original_sample: pred_original }
    }

    fn pred_original(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        alpha_x0(self.prediction, model_output, sample, self.alpha_at(self.timesteps[step_index] as i64))
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Tensor {
        alpha_add_noise(self.alpha_at(self.timesteps[step_index] as i64), original, noise)
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod_f64
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }
}
