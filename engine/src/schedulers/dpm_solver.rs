//! diffusers' DPMSolverMultistepScheduler, algorithms "dpmsolver++" (deterministic) and
//! "sde-dpmsolver++" (orders 1–3, midpoint or heun). The SDE variant's step() draws
//! `randn(model_output.shape)` in float32 from the pipeline's generator on every step; the
//! pipeline passes that draw in as `noise`. Its coefficient maths (log, exp on 0-dim
//! float32 tensors) runs in libtorch so it rounds exactly as diffusers'.
use super::{
    coefficient, get, numpy, scalar, sqrt32, to_f32_vec, train_sigmas, ClassConfig, PredictionType, Scheduler,
    StepOutput,
};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

pub struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    alphas_cumprod: Vec<f64>,
    prediction: PredictionType,
    order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// sde-dpmsolver++: each update adds σ_t·√(1 − e^(−2h))·noise.
    sde: bool,
    /// The last `order` converted model outputs (x̂0), oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

/// (α_t, σ_t) of a sigma, diffusers' `_sigma_to_alpha_sigma_t` on 0-dim tensors.
pub(super) fn alpha_sigma(sigma: f32) -> (Tensor, Tensor) {
    let sigma = scalar(sigma);
    // `1 / x` on a tensor is x.reciprocal() * 1 in torch.
    let alpha = (sigma.pow_tensor_scalar(2) + 1.0).pow_tensor_scalar(0.5).reciprocal();
    let sigma_t = &sigma * &alpha;
    (alpha, sigma_t)
}

pub(super) fn lambda(alpha: &Tensor, sigma: &Tensor) -> Tensor {
    alpha.log() - sigma.log()
}

/// The int64 timesteps of the multistep solvers (DPM-Solver++, UniPC) before any karras
/// conversion: `n + 1` points over `[0, last_timestep)`, reversed, the t = 0 end dropped.
pub(super) fn multistep_timesteps(c: &ClassConfig, last_timestep: usize, n: usize) -> Result<Vec<f64>> {
    let train_n = c.num_train_timesteps();
    Ok(match c.spacing("linspace")? {
        super::Spacing::Linspace => numpy::linspace(0.0, (last_timestep - 1) as f64, n + 1)
            .into_iter()
            .skip(1)
            .rev()
            .map(f64::round_ties_even)
            .collect(),
        super::Spacing::Leading => {
            let ratio = last_timestep / (n + 1);
            let steps_offset = get!(c, steps_offset, 0);
            (1..=n).rev().map(|i| (i * ratio) as f64 + steps_offset as f64).collect()
        }
        super::Spacing::Trailing => numpy::arange(last_timestep as f64, 0.0, -(train_n as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    })
}

/// `convert_model_output` with x̂0 prediction (DPM-Solver++, UniPC's predict_x0): the model
/// output as x̂0 at `sigma`.
pub(super) fn x0_at_sigma(prediction: PredictionType, sigma: f32, model_output: &Tensor, sample: &Tensor) -> Tensor {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        PredictionType::Epsilon => (sample - &sigma_t * model_output) / &alpha_t,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => &alpha_t * sample - &sigma_t * model_output,
    }
}

/// α_t·x0 + σ_t·ε at `sigma`, the coefficients in the sample's dtype and device, as the
/// multistep solvers' add_noise.
pub(super) fn sigma_add_noise(sigma: f32, original: &Tensor, noise: &Tensor) -> Tensor {
    let sigma = coefficient(sigma, original);
    let alpha_t = (sigma.pow_tensor_scalar(2) + 1.0).pow_tensor_scalar(0.5).reciprocal();
    let sigma_t = &sigma * &alpha_t;
    alpha_t * original + sigma_t * noise
}

/// The SDE terms of an update over a step of log-SNR length `h`: e^(−h), 1 − e^(−2h) and the
/// noise coefficient σ_t·√(1 − e^(−2h)), each as diffusers writes it.
struct SdeTerms {
    exp_neg_h: Tensor,
    one_minus_exp_2h: Tensor,
    noise_coeff: Tensor,
}

fn sde_terms(h: &Tensor, sigma_t: &Tensor) -> SdeTerms {
    let one_minus_exp_2h = (h * -2.0).exp().rsub_scalar(1.0);
    let noise_coeff = sigma_t * (h * -2.0).exp().rsub_scalar(1.0).sqrt();
    SdeTerms { exp_neg_h: (-h).exp(), one_minus_exp_2h, noise_coeff }
}

impl DpmSolver {
    /// `sde` selects algorithm_type "sde-dpmsolver++" whatever the config says (the
    /// `dpm++-sde` names); otherwise the config's algorithm_type applies.
    pub(super) fn new(c: &ClassConfig, karras: bool, sde: bool, n: usize) -> Result<Self> {
        for key in [
            "thresholding",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            c.unsupported(key, json!(false))?;
        }
        // Learned variances make diffusers drop output channels; other values are unused.
        if let Some(v) = c.other("variance_type").and_then(Value::as_str) {
            if v.starts_with("learned") {
                bail!("DPMSolverMultistepScheduler option variance_type = \"{v}\" is not supported");
            }
        }
        let algorithm = if sde { "sde-dpmsolver++".into() } else { get!(c, algorithm_type, "dpmsolver++".into()) };
        // diffusers maps the "deis" algorithm to dpmsolver++ and UniPC/DEIS solver types to midpoint.
        c.unsupported_value("algorithm_type", &algorithm, &["dpmsolver++", "deis", "sde-dpmsolver++"])?;
        let solver_type = get!(c, solver_type, "midpoint".into());
        c.unsupported_value("solver_type", &solver_type, &["midpoint", "heun", "logrho", "bh1", "bh2"])?;
        let order = get!(c, solver_order, 2);
        if !(1..=3).contains(&order) {
            bail!("DPMSolverMultistepScheduler solver_order {order} is not supported (1, 2 or 3)");
        }
        let prediction = c.prediction_type()?;
        let train_n = c.num_train_timesteps();
        let alphas_cumprod_t = c.alphas_cumprod(true)?;
        let alphas_cumprod = to_f32_vec(&alphas_cumprod_t);

        // lambda_min_clipped trims the noisy end of the schedule (default -inf: nothing).
        let last_timestep = match c
            .cfg
            .other
            .get("lambda_min_clipped")
            .filter(|_| !c.cfg.use_default_values.iter().any(|k| k == "lambda_min_clipped"))
        {
            None | Some(Value::Null) => train_n,
            Some(Value::String(s)) if s == "-Infinity" => train_n,
            Some(Value::Number(v)) => {
                let v = v.as_f64().unwrap_or(f64::NEG_INFINITY);
                let lambda_t = lambda(&alphas_cumprod_t.sqrt(), &alphas_cumprod_t.rsub_scalar(1.0).sqrt());
                let idx = Tensor::searchsorted_scalar(&lambda_t.flip([0]), v, false, false, "left", None::<Tensor>);
                train_n - idx.int64_value(&[]) as usize
            }
            Some(v) => bail!("DPMSolverMultistepScheduler lambda_min_clipped = {v} is not a number"),
        };
        let mut timesteps = multistep_timesteps(c, last_timestep, n)?;
        let train = train_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f64>;
        if karras || get!(c, use_karras_sigmas, false) {
            // Not options of this class, but from_config registers every file key on the
            // config, and the karras conversion looks them up: a file's sigma_min/max apply.
            let sigma_min = get!(c, sigma_min, train[0] as f64);
            let sigma_max = get!(c, sigma_max, train[train.len() - 1] as f64);
            let log_sigmas: Vec<f32> = train.iter().map(|&s| numpy::logf(s)).collect();
            sigmas = numpy::karras(sigma_min, sigma_max, n);
            let cosine = get!(c, beta_schedule, "linear".into()) == "squaredcos_cap_v2";
            timesteps = sigmas
                .iter()
                .map(|&s| numpy::sigma_to_t(s, &log_sigmas))
                .map(|t| if cosine { t } else { t.round_ties_even() })
                .map(f64::trunc) // .to(torch.int64)
                .collect();
        } else {
            sigmas = timesteps.iter().map(|&t| numpy::interp(t, &train)).collect();
        }
        let final_sigmas_type = get!(c, final_sigmas_type, "zero".into());
        sigmas.push(match final_sigmas_type.as_str() {
            "zero" => 0.0,
            "sigma_min" => sqrt32((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]) as f64,
            other => {
                bail!("DPMSolverMultistepScheduler final_sigmas_type \"{other}\" is not supported (zero, sigma_min)")
            }
        });
        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            alphas_cumprod: alphas_cumprod.iter().map(|&a| a as f64).collect(),
            prediction,
            order,
            heun: solver_type == "heun",
            lower_order_final: get!(c, lower_order_final, true),
            euler_at_final: get!(c, euler_at_final, false),
            final_sigma_zero: final_sigmas_type == "zero",
            sde: algorithm == "sde-dpmsolver++",
            model_outputs: (0..order).map(|_| None).collect(),
            lower_order_nums: 0,
        })
    }

    /// `convert_model_output` for dpmsolver++: the model output as x̂0.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, step_index: usize) -> Tensor {
        x0_at_sigma(self.prediction, self.sigmas[step_index], model_output, sample)
    }

    fn first_order(&self, x0: &Tensor, sample: &Tensor, i: usize, noise: Option<&Tensor>) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(&alpha_t, &sigma_t) - lambda(&alpha_s, &sigma_s);
        match noise {
            None => (&sigma_t / &sigma_s) * sample - (&alpha_t * ((-&h).exp() - 1.0)) * x0,
            Some(noise) => {
                let e = sde_terms(&h, &sigma_t);
                ((&sigma_t / &sigma_s) * &e.exp_neg_h) * sample
                    + (&alpha_t * &e.one_minus_exp_2h) * x0
                    + &e.noise_coeff * noise
            }
        }
    }

    fn second_order(&self, sample: &Tensor, i: usize, noise: Option<&Tensor>) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lambda_t, lambda_s0, lambda_s1) =
            (lambda(&alpha_t, &sigma_t), lambda(&alpha_s0, &sigma_s0), lambda(&alpha_s1, &sigma_s1));
        let m = &self.model_outputs;
        let (m0, m1) = (m[m.len() - 1].as_ref().unwrap(), m[m.len() - 2].as_ref().unwrap());
        let (h, h_0) = (&lambda_t - &lambda_s0, &lambda_s0 - &lambda_s1);
        let r0 = &h_0 / &h;
        let d1 = r0.reciprocal() * (m0 - m1);
        if let Some(noise) = noise {
            let e = sde_terms(&h, &sigma_t);
            let base = ((&sigma_t / &sigma_s0) * &e.exp_neg_h) * sample + (&alpha_t * &e.one_minus_exp_2h) * m0;
            let d1_term = if self.heun {
                (&alpha_t * (&e.one_minus_exp_2h / (&h * -2.0) + 1.0)) * d1
            } else {
                ((&alpha_t * &e.one_minus_exp_2h) * 0.5) * d1
            };
            return base + d1_term + &e.noise_coeff * noise;
        }
        let em1 = (-&h).exp() - 1.0;
        let base = (&sigma_t / &sigma_s0) * sample - (&alpha_t * &em1) * m0;
        if self.heun {
            base + (&alpha_t * (&em1 / &h + 1.0)) * d1
        } else {
            base - ((&alpha_t * &em1) * 0.5) * d1
        }
    }

    fn third_order(&self, sample: &Tensor, i: usize, noise: Option<&Tensor>) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(&alpha_t, &sigma_t);
        let lambda_s0 = lambda(&alpha_s0, &sigma_s0);
        let lambda_s1 = lambda(&alpha_s1, &sigma_s1);
        let lambda_s2 = lambda(&alpha_s2, &sigma_s2);
        let m = &self.model_outputs;
        let (m0, m1, m2) =
            (m[m.len() - 1].as_ref().unwrap(), m[m.len() - 2].as_ref().unwrap(), m[m.len() - 3].as_ref().unwrap());
        let (h, h_0, h_1) = (&lambda_t - &lambda_s0, &lambda_s0 - &lambda_s1, &lambda_s1 - &lambda_s2);
        let (r0, r1) = (&h_0 / &h, &h_1 / &h);
        let d1_0 = r0.reciprocal() * (m0 - m1);
        let d1_1 = r1.reciprocal() * (m1 - m2);
        let r_sum = &r0 + &r1;
        let d1 = &d1_0 + (&r0 / &r_sum) * (&d1_0 - &d1_1);
        let d2 = r_sum.reciprocal() * (&d1_0 - &d1_1);
        if let Some(noise) = noise {
            let e = sde_terms(&h, &sigma_t);
            let two_h = &h * 2.0;
            return ((&sigma_t / &sigma_s0) * &e.exp_neg_h) * sample
                + (&alpha_t * &e.one_minus_exp_2h) * m0
                + (&alpha_t * (&e.one_minus_exp_2h / (&h * -2.0) + 1.0)) * d1
                + (&alpha_t * ((&e.one_minus_exp_2h - &two_h) / two_h.pow_tensor_scalar(2) - 0.5)) * d2
                + &e.noise_coeff * noise;
        }
        let em1 = (-&h).exp() - 1.0;
        (&sigma_t / &sigma_s0) * sample - (&alpha_t * &em1) * m0 + (&alpha_t * (&em1 / &h + 1.0)) * d1
            - (&alpha_t * ((&em1 + &h) / h.pow_tensor_scalar(2) - 0.5)) * d2
    }
}

impl Scheduler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| s as f64).collect()
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> StepOutput {
        let n = self.timesteps.len();
        let lower_order_final =
            i == n - 1 && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;
        let x0 = self.convert(model_output, sample, i);
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.shallow_clone()));
        let sample = sample.to_kind(Kind::Float);
        let noise = self
            .sde
            .then(|| noise.expect("the dpm++-sde scheduler needs step noise (needs_step_noise)").to_kind(Kind::Float));
        let noise = noise.as_ref();
        let prev_sample = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&x0, &sample, i, noise)
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&sample, i, noise)
        } else {
            self.third_order(&sample, i, noise)
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        StepOutput { prev_sample: prev_sample.to_kind(model_output.kind()), pred_original_sample: x0 }
    }

    fn needs_step_noise(&self, _step_index: usize) -> bool {
        self.sde
    }

    fn pred_original(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        self.convert(model_output, sample, step_index)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Tensor {
        sigma_add_noise(self.sigmas[step_index], original, noise)
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }
}
