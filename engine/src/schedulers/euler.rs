//! diffusers' EulerDiscreteScheduler with its default churn (s_churn = 0): gamma is 0, so
//! step() never draws generator noise.
use super::{
    coefficient, get, numpy, scalar, spaced_timesteps, sqrt32, to_f32_vec, train_sigmas, ClassConfig, PredictionType,
    Scheduler, Spacing, StepOutput,
};
use anyhow::{bail, Result};
use serde_json::json;
use tch::{Kind, Tensor};

/// Euler and Euler ancestral: the same sigma schedule state, two update rules.
pub struct Euler {
    pub(super) timesteps: Vec<f64>,
    pub(super) sigmas: Vec<f32>,
    pub(super) alphas_cumprod: Vec<f64>,
    pub(super) prediction: PredictionType,
    pub(super) init_noise_sigma: f32,
    /// Euler ancestral's update (see euler_ancestral.rs), which consumes step noise.
    pub(super) ancestral: bool,
}

impl Euler {
    pub(super) fn new(c: &ClassConfig, karras: bool, n: usize) -> Result<Self> {
        c.unsupported("use_exponential_sigmas", json!(false))?;
        c.unsupported("use_beta_sigmas", json!(false))?;
        let prediction = c.prediction_type()?;
        let spacing = c.spacing("linspace")?;
        let alphas_cumprod = to_f32_vec(&c.alphas_cumprod(true)?);
        let train = train_sigmas(&alphas_cumprod);
        let log_sigmas: Vec<f32> = train.iter().map(|&s| numpy::logf(s)).collect();

        // float32 timesteps (linspace keeps its fractions).
        let mut timesteps: Vec<f64> = spaced_timesteps(spacing, c.num_train_timesteps(), n, get!(c, steps_offset, 0))
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        let mut sigmas: Vec<f64> = match get!(c, interpolation_type, "linear".into()).as_str() {
            "linear" => timesteps.iter().map(|&t| numpy::interp(t, &train)).collect(),
            // torch.linspace(log σ_max, log σ_min, n + 1).exp() — n + 1 sigmas for n timesteps,
            // as diffusers does.
            "log_linear" => {
                let (hi, lo) = (numpy::logf(train[train.len() - 1]), numpy::logf(train[0]));
                let ramp = Tensor::linspace(hi as f64, lo as f64, n as i64 + 1, (Kind::Float, tch::Device::Cpu));
                to_f32_vec(&ramp.exp()).into_iter().map(f64::from).collect()
            }
            other => {
                bail!("EulerDiscreteScheduler interpolation_type \"{other}\" is not supported (linear, log_linear)")
            }
        };
        if karras || get!(c, use_karras_sigmas, false) {
            let sigma_min = get!(c, sigma_min, sigmas[sigmas.len() - 1]);
            let sigma_max = get!(c, sigma_max, sigmas[0]);
            sigmas = numpy::karras(sigma_min, sigma_max, n);
            timesteps = sigmas.iter().map(|&s| numpy::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        sigmas.push(match get!(c, final_sigmas_type, "zero".into()).as_str() {
            "zero" => 0.0,
            "sigma_min" => sqrt32((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]) as f64,
            other => bail!("EulerDiscreteScheduler final_sigmas_type \"{other}\" is not supported (zero, sigma_min)"),
        });
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        match get!(c, timestep_type, "discrete".into()).as_str() {
            "discrete" => {}
            // EDM-style models take 0.25·log σ as their timestep (computed per 0-dim tensor).
            "continuous" if prediction == PredictionType::VPrediction => {
                timesteps =
                    sigmas[..sigmas.len() - 1].iter().map(|&s| (scalar(s).log() * 0.25).double_value(&[])).collect();
            }
            "continuous" => {}
            other => bail!("EulerDiscreteScheduler timestep_type \"{other}\" is not supported (discrete, continuous)"),
        }
        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma =
            if spacing == Spacing::Leading { sqrt32(max_sigma * max_sigma + 1.0) } else { max_sigma };
        Ok(Self {
            timesteps,
            sigmas,
            alphas_cumprod: alphas_cumprod.iter().map(|&a| a as f64).collect(),
            prediction,
            init_noise_sigma,
            ancestral: false,
        })
    }
}

/// Euler's x̂0 from the model output at sigma (sample already float32).
pub(super) fn denoised(prediction: PredictionType, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Tensor {
    match prediction {
        PredictionType::Epsilon => sample - model_output * sigma as f64,
        PredictionType::VPrediction => {
            let c_out = -sigma / sqrt32(sigma * sigma + 1.0);
            model_output * c_out as f64 + sample / (sigma * sigma + 1.0) as f64
        }
        PredictionType::Sample => model_output.shallow_clone(),
    }
}

/// sample / √(σ² + 1), the input scaling both Euler schedulers apply.
fn scale_input(sample: &Tensor, sigma: f32) -> Tensor {
    sample / sqrt32(sigma * sigma + 1.0) as f64
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| s as f64).collect()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor {
        scale_input(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> StepOutput {
        if self.ancestral {
            return super::euler_ancestral::step(self, model_output, step_index, sample, noise);
        }
        let sample = sample.to_kind(Kind::Float);
        // gamma = 0: sigma_hat = sigma · (0 + 1) = sigma.
        let sigma_hat = self.sigmas[step_index];
        let pred_original = denoised(self.prediction, model_output, &sample, sigma_hat);
        let derivative = (&sample - &pred_original) / sigma_hat as f64;
        let dt = self.sigmas[step_index + 1] - sigma_hat;
        let prev_sample = (&sample + derivative * dt as f64).to_kind(model_output.kind());
        StepOutput { prev_sample, pred_original_sample: pred_original }
    }

    fn needs_step_noise(&self, _step_index: usize) -> bool {
        self.ancestral
    }

    fn pred_original(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        denoised(self.prediction, model_output, &sample.to_kind(Kind::Float), self.sigmas[step_index])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Tensor {
        original + noise * coefficient(self.sigmas[step_index], original)
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }
}
