//! diffusers' UniPCMultistepScheduler with x̂0 prediction (`predict_x0`, its default): the
//! UniP predictor of any order with the UniC corrector, B(h) = e^h − 1 (bh2) or h (bh1).
//! Deterministic: no generator noise. Its coefficient maths (log, expm1, the small linear
//! solve, einsum) runs in libtorch on 0-dim float32 tensors, as diffusers'.
use super::dpm_solver::{alpha_sigma, lambda, multistep_timesteps, sigma_add_noise, x0_at_sigma};
use super::{get, numpy, sqrt32, to_f32_vec, train_sigmas, ClassConfig, PredictionType, Scheduler, StepOutput};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    alphas_cumprod: Vec<f64>,
    prediction: PredictionType,
    order: usize,
    /// solver_type "bh2" (B(h) = e^h − 1), else "bh1" (B(h) = h).
    bh2: bool,
    lower_order_final: bool,
    /// Step indices whose following step runs no corrector.
    disable_corrector: Vec<i64>,
    /// The last `order` converted model outputs (x̂0), oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The (corrected) sample the previous step started from, and that step's order.
    last_sample: Option<Tensor>,
    this_order: usize,
}

/// The coefficients one UniP or UniC update shares, from the step t_idx − 1 → t_idx.
struct Update {
    /// σ_t/σ_s0 and α_t·(e^(−h) − 1), the first-order terms.
    sample_coeff: Tensor,
    x0_coeff: Tensor,
    /// α_t·B(h), the scale of the higher-order corrections.
    correction_coeff: Tensor,
    /// The Vandermonde matrix R of the ratios r_k and the right-hand side b.
    r: Tensor,
    b: Tensor,
    /// The scaled differences (m_k − m0)/r_k stacked on dim 1, if the order is above 1.
    d1s: Option<Tensor>,
}

impl UniPc {
    pub(super) fn new(c: &ClassConfig, karras: bool, n: usize) -> Result<Self> {
        for key in
            ["thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"]
        {
            c.unsupported(key, json!(false))?;
        }
        c.unsupported("predict_x0", json!(true))?;
        c.unsupported("solver_p", Value::Null)?;
        let solver_type = get!(c, solver_type, "bh2".into());
        // diffusers maps the DPM-Solver solver types to bh2.
        c.unsupported_value("solver_type", &solver_type, &["bh1", "bh2", "midpoint", "heun", "logrho"])?;
        let order = get!(c, solver_order, 2);
        if order == 0 {
            bail!("UniPCMultistepScheduler solver_order must be at least 1");
        }
        let disable_corrector = match c.other("disable_corrector") {
            None => Vec::new(),
            Some(Value::Array(steps)) => steps
                .iter()
                .map(|v| v.as_i64().ok_or_else(|| anyhow::anyhow!("not an integer: {v}")))
                .collect::<Result<_>>()
                .map_err(|e| anyhow::anyhow!("UniPCMultistepScheduler option disable_corrector: {e}"))?,
            Some(v) => bail!("UniPCMultistepScheduler option disable_corrector = {v} is not a list of step indices"),
        };
        let prediction = c.prediction_type()?;
        let alphas_cumprod = to_f32_vec(&c.alphas_cumprod(true)?);
        let train = train_sigmas(&alphas_cumprod);
        let final_sigmas_type = get!(c, final_sigmas_type, "zero".into());
        c.unsupported_value("final_sigmas_type", &final_sigmas_type, &["zero", "sigma_min"])?;
        let mut timesteps = multistep_timesteps(c, c.num_train_timesteps(), n)?;
        let mut sigmas: Vec<f64>;
        let sigma_last;
        if karras || get!(c, use_karras_sigmas, false) {
            let sigma_min = get!(c, sigma_min, train[0] as f64);
            let sigma_max = get!(c, sigma_max, train[train.len() - 1] as f64);
            let log_sigmas: Vec<f32> = train.iter().map(|&s| numpy::logf(s)).collect();
            sigmas = numpy::karras(sigma_min, sigma_max, n);
            timesteps = sigmas.iter().map(|&s| numpy::sigma_to_t(s, &log_sigmas).round_ties_even()).collect();
            // Here sigma_min is the last karras sigma.
            sigma_last = sigmas[sigmas.len() - 1];
        } else {
            sigmas = timesteps.iter().map(|&t| numpy::interp(t, &train)).collect();
            sigma_last = sqrt32((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]) as f64;
        }
        sigmas.push(if final_sigmas_type == "zero" { 0.0 } else { sigma_last });
        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            alphas_cumprod: alphas_cumprod.iter().map(|&a| a as f64).collect(),
            prediction,
            order,
            bh2: solver_type != "bh1",
            lower_order_final: get!(c, lower_order_final, true),
            disable_corrector,
            model_outputs: (0..order).map(|_| None).collect(),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
        })
    }

    /// The k-th newest stored x̂0 (k = 0: the newest).
    fn model_output(&self, k: usize) -> &Tensor {
        self.model_outputs[self.model_outputs.len() - 1 - k].as_ref().expect("stored model output")
    }

    /// diffusers' shared part of `multistep_uni_p_bh_update` and `multistep_uni_c_bh_update`
    /// for the step from sigma index `t_idx − 1` to `t_idx`, with the newest stored x̂0 as m0
    /// and the older ones at sigma indices `t_idx − 1 − k`.
    fn update(&self, t_idx: usize, order: usize) -> Update {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t_idx]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[t_idx - 1]);
        let lambda_s0 = lambda(&alpha_s0, &sigma_s0);
        let h = lambda(&alpha_t, &sigma_t) - &lambda_s0;
        let m0 = self.model_output(0);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let (alpha_si, sigma_si) = alpha_sigma(self.sigmas[t_idx - 1 - k]);
            let rk = (lambda(&alpha_si, &sigma_si) - &lambda_s0) / &h;
            d1s.push((self.model_output(k) - m0) / &rk);
            rks.push(rk);
        }
        rks.push(Tensor::ones([], (Kind::Float, tch::Device::Cpu)));
        let rks = Tensor::stack(&rks, 0);
        let hh = -&h;
        let h_phi_1 = hh.expm1();
        let mut h_phi_k = &h_phi_1 / &hh - 1.0;
        let b_h = if self.bh2 { hh.expm1() } else { hh.shallow_clone() };
        let (mut r, mut b) = (Vec::new(), Vec::new());
        let mut factorial: i64 = 1;
        for k in 1..=order as i64 {
            r.push(rks.pow_tensor_scalar(k - 1));
            b.push(&h_phi_k * factorial / &b_h);
            factorial *= k + 1;
            h_phi_k = &h_phi_k / &hh - 1.0 / factorial as f64;
        }
        Update {
            sample_coeff: &sigma_t / &sigma_s0,
            x0_coeff: &alpha_t * &h_phi_1,
            correction_coeff: &alpha_t * &b_h,
            r: Tensor::stack(&r, 0),
            b: Tensor::stack(&b, 0),
            d1s: (!d1s.is_empty()).then(|| Tensor::stack(&d1s, 1)),
        }
    }

    /// Σ_k ρ_k·D1_k over the batch, diffusers' einsum.
    fn weighted(rhos: &Tensor, d1s: &Tensor) -> Tensor {
        Tensor::einsum("k,bkc...->bc...", &[rhos, d1s], None::<&[i64]>)
    }

    /// UniP: the predictor from the step's sample to sigma index `i + 1`.
    fn predict(&self, sample: &Tensor, i: usize, order: usize) -> Tensor {
        let u = self.update(i + 1, order);
        let x_t = &u.sample_coeff * sample - &u.x0_coeff * self.model_output(0);
        let pred_res = match &u.d1s {
            // Without history diffusers subtracts α_t·B(h)·0 (NaN where B(h) is infinite).
            None => return (x_t - &u.correction_coeff * 0.0).to_kind(sample.kind()),
            Some(d1s) => {
                let rhos = if order == 2 {
                    Tensor::ones([1], (sample.kind(), sample.device())) * 0.5
                } else {
                    let k = order as i64 - 1;
                    Tensor::linalg_solve(&u.r.narrow(0, 0, k).narrow(1, 0, k), &u.b.narrow(0, 0, k), true)
                        .to_device(sample.device())
                        .to_kind(sample.kind())
                };
                Self::weighted(&rhos, d1s)
            }
        };
        (x_t - &u.correction_coeff * pred_res).to_kind(sample.kind())
    }

    /// UniC: the step's sample (at sigma index `i`) corrected with its new x̂0 `model_t`,
    /// recomputed from the previous step's sample.
    fn correct(&self, model_t: &Tensor, last_sample: &Tensor, i: usize, order: usize) -> Tensor {
        let u = self.update(i, order);
        let m0 = self.model_output(0);
        let x_t = &u.sample_coeff * last_sample - &u.x0_coeff * m0;
        let rhos = if order == 1 {
            Tensor::ones([1], (last_sample.kind(), last_sample.device())) * 0.5
        } else {
            Tensor::linalg_solve(&u.r, &u.b, true).to_device(last_sample.device()).to_kind(last_sample.kind())
        };
        let d1_t = model_t - m0;
        let last = order as i64 - 1;
        let last_term = rhos.get(last) * d1_t;
        // Without history diffusers adds the Python int 0.
        let corr = match &u.d1s {
            Some(d1s) => Self::weighted(&rhos.narrow(0, 0, last), d1s) + last_term,
            None => last_term + 0.0,
        };
        (x_t - &u.correction_coeff * corr).to_kind(last_sample.kind())
    }
}

impl Scheduler for UniPc {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| s as f64).collect()
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: Option<&Tensor>) -> StepOutput {
        let x0 = x0_at_sigma(self.prediction, self.sigmas[i], model_output, sample);
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i as i64 - 1));
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(&x0, last, i, self.this_order),
            _ => sample.shallow_clone(),
        };
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.shallow_clone()));
        let this_order = if self.lower_order_final { self.order.min(self.timesteps.len() - i) } else { self.order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev_sample = self.predict(&sample, i, self.this_order);
        self.last_sample = Some(sample);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        StepOutput { prev_sample, pred_original_sample: x0 }
    }

    fn pred_original(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        x0_at_sigma(self.prediction, self.sigmas[step_index], model_output, sample)
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
