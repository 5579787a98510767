//! diffusers' EulerAncestralDiscreteScheduler. Its step() draws `randn(model_output.shape)`
//! from the pipeline's generator after the Euler update, on every step (the last one too,
//! where sigma_up is 0); here the pipeline passes that draw in as `noise`.
use super::euler::{denoised, Euler};
use super::{
    get, numpy, spaced_timesteps, sqrt32, to_f32_vec, train_sigmas, ClassConfig, PredictionType, Spacing, StepOutput,
};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// EulerAncestralDiscreteScheduler.from_config: its own timestep and sigma rules, run by
/// [`Euler`] with the ancestral update.
pub(super) fn new(c: &ClassConfig, n: usize) -> Result<Euler> {
    let prediction = c.prediction_type()?;
    if prediction == PredictionType::Sample {
        // diffusers raises NotImplementedError in step().
        bail!("EulerAncestralDiscreteScheduler does not support prediction_type \"sample\"");
    }
    let spacing = c.spacing("linspace")?;
    let alphas_cumprod = to_f32_vec(&c.alphas_cumprod(true)?);
    let train = train_sigmas(&alphas_cumprod);
    let timesteps: Vec<f64> = spaced_timesteps(spacing, c.num_train_timesteps(), n, get!(c, steps_offset, 0))
        .into_iter()
        .map(|t| t as f32 as f64)
        .collect();
    let sigmas: Vec<f32> =
        timesteps.iter().map(|&t| numpy::interp(t, &train) as f32).chain(std::iter::once(0.0)).collect();
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = if spacing == Spacing::Leading { sqrt32(max_sigma * max_sigma + 1.0) } else { max_sigma };
    Ok(Euler {
        timesteps,
        sigmas,
        alphas_cumprod: alphas_cumprod.iter().map(|&a| a as f64).collect(),
        prediction,
        init_noise_sigma,
        ancestral: true,
    })
}

/// The ancestral update: Euler down to sigma_down, then fresh noise scaled by sigma_up.
pub(super) fn step(
    e: &Euler,
    model_output: &Tensor,
    step_index: usize,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> StepOutput {
    let noise = noise.expect("the euler-a scheduler needs step noise (needs_step_noise)");
    let (sigma_from, sigma_to) = (e.sigmas[step_index], e.sigmas[step_index + 1]);
    let sample = sample.to_kind(Kind::Float);
    let pred_original = denoised(e.prediction, model_output, &sample, sigma_from);
    // float32 scalar arithmetic in diffusers' order.
    let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
    let sigma_up = sqrt32(to2 * (from2 - to2) / from2);
    let sigma_down = sqrt32(to2 - sigma_up * sigma_up);
    let derivative = (&sample - &pred_original) / sigma_from as f64;
    let dt = sigma_down - sigma_from;
    let prev_sample = &sample + derivative * dt as f64;
    let noise = noise.to_kind(model_output.kind());
    let prev_sample = (prev_sample + noise * sigma_up as f64).to_kind(model_output.kind());
    StepOutput { prev_sample, pred_original_sample: pred_original }
}
