//! Noise schedulers, ported from diffusers 0.42.1 to give the same numbers: DDIM, DDPM,
//! Euler, Euler ancestral, DPM-Solver++ (multistep, ODE and SDE) and UniPC, each built the
//! way diffusers' `XScheduler.from_config(scheduler_config.json)` builds it — the file may
//! have been saved by another class; unknown keys are ignored and missing ones take *this*
//! class's default.
//!
//! Numerics follow diffusers' dtypes: betas/ᾱ in torch float32 (computed with libtorch, so
//! linspace/cumprod round identically), timesteps in numpy float64 (see `numpy.rs`), sigmas
//! float32, step arithmetic in the sample dtype with float32 scalars.
//!
//! Generator noise: step() of three schedulers draws from the pipeline's generator, one
//! `randn(latents.shape)` per drawing step, after the initial latents — Euler ancestral on
//! every step, the last included (model output dtype); DDPM on every step whose timestep is
//! above 0 (model output dtype); DPM-Solver++ SDE on every step (float32).
//! `Scheduler::needs_step_noise` says which steps draw. DDIM (eta 0), Euler (s_churn 0),
//! DPM-Solver++ (ODE) and UniPC draw nothing.
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod euler_ancestral;
#[doc(hidden)]
pub mod numpy;
mod unipc;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Ddpm,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    /// DPMSolverMultistepScheduler with algorithm_type "sde-dpmsolver++".
    DpmSolverSde,
    UniPc,
}

/// Every scheduler name a job accepts: (name, kind, karras sigmas). The one list of names;
/// the server's model metadata and the error messages take theirs from it.
const TABLE: [(&str, SchedulerKind, bool); 11] = [
    ("ddim", SchedulerKind::Ddim, false),
    ("ddpm", SchedulerKind::Ddpm, false),
    ("euler", SchedulerKind::Euler, false),
    ("euler-karras", SchedulerKind::Euler, true),
    ("euler-a", SchedulerKind::EulerAncestral, false),
    ("dpm++", SchedulerKind::DpmSolverMultistep, false),
    ("dpm++-karras", SchedulerKind::DpmSolverMultistep, true),
    ("dpm++-sde", SchedulerKind::DpmSolverSde, false),
    ("dpm++-sde-karras", SchedulerKind::DpmSolverSde, true),
    ("unipc", SchedulerKind::UniPc, false),
    ("unipc-karras", SchedulerKind::UniPc, true),
];

/// The scheduler names, in [`TABLE`]'s order.
pub const NAMES: [&str; TABLE.len()] = {
    let mut names = [""; TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        names[i] = TABLE[i].0;
        i += 1;
    }
    names
};

impl SchedulerKind {
    /// Parses a scheduler name; a `-karras` name is its kind with karras sigmas (the bool).
    pub fn parse_with_karras(name: &str) -> Result<(Self, bool)> {
        match TABLE.iter().find(|(n, _, _)| *n == name) {
            Some(&(_, kind, karras)) => Ok((kind, karras)),
            None => bail!("unknown scheduler {} (expected one of {})", crate::text::quote(name), NAMES.join(", ")),
        }
    }

    /// The name of this kind with or without karras sigmas, if it has one.
    pub fn name(self, karras: bool) -> Option<&'static str> {
        TABLE.iter().find(|&&(_, k, c)| k == self && c == karras).map(|(n, _, _)| *n)
    }

    /// The diffusers class this kind reproduces.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmSolverMultistep | Self::DpmSolverSde => "DPMSolverMultistepScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
        }
    }
}

/// `"dpm++-karras"` parses as `DpmSolverMultistep`; use `parse_with_karras` to keep the flag.
impl FromStr for SchedulerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(Self::parse_with_karras(s)?.0)
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name(false).expect("every kind has a plain name"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    /// The name diffusers' configs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        [Self::Epsilon, Self::VPrediction, Self::Sample].into_iter().find(|p| p.name() == name).with_context(|| {
            format!("unknown prediction type {} (expected epsilon, v_prediction or sample)", crate::text::quote(name))
        })
    }
}

/// A model's scheduler/scheduler_config.json. Every field is optional: what a field means
/// when absent depends on the scheduler class (`from_config` semantics, see `build`).
/// Keys without a field land in `other` and are checked by each class that knows them.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SchedulerConfig {
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub steps_offset: Option<i64>,
    pub timestep_spacing: Option<String>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    /// Keys the saving class left at its defaults: from_config drops them, so the loading
    /// class's own defaults apply.
    #[serde(rename = "_use_default_values", default)]
    pub use_default_values: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl SchedulerConfig {
    /// Parses a scheduler_config.json, accepting the `NaN`/`Infinity`/`-Infinity` that
    /// Python's json writes (DPMSolverMultistepScheduler saves `lambda_min_clipped: -Infinity`)
    /// — plain serde_json rejects those files.
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(&quote_non_finite(text))?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Turns the bare tokens NaN, Infinity and -Infinity (outside strings) into JSON strings.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(tok) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
                out.push_str(&format!("\"{tok}\""));
                rest = &rest[tok.len()..];
                continue;
            }
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The config as one scheduler class's `from_config` sees it.
struct ClassConfig<'a> {
    cfg: &'a SchedulerConfig,
    class: &'static str,
}

/// `get!(c, field, default)`: the field's value, or the class default when absent, null or
/// listed in `_use_default_values`.
macro_rules! get {
    ($c:expr, $field:ident, $default:expr) => {
        $c.get(stringify!($field), &$c.cfg.$field).unwrap_or($default)
    };
}
pub(crate) use get;

impl ClassConfig<'_> {
    fn get<T: Clone>(&self, key: &str, value: &Option<T>) -> Option<T> {
        if self.cfg.use_default_values.iter().any(|k| k == key) {
            None
        } else {
            value.clone()
        }
    }

    /// An option of this class we do not implement, in `other`: fine while it holds the
    /// class default (or null), an error otherwise.
    fn unsupported(&self, key: &str, default: Value) -> Result<()> {
        match self.cfg.other.get(key) {
            Some(v) if !v.is_null() && *v != default && !self.cfg.use_default_values.iter().any(|k| k == key) => {
                bail!("{} option {key} = {v} is not supported (only {default})", self.class)
            }
            _ => Ok(()),
        }
    }

    /// A key of this class kept in `other`: its value, or None when absent, null or listed
    /// in `_use_default_values` (the class default applies).
    fn other(&self, key: &str) -> Option<&Value> {
        if self.cfg.use_default_values.iter().any(|k| k == key) {
            return None;
        }
        self.cfg.other.get(key).filter(|v| !v.is_null())
    }

    fn unsupported_value(&self, key: &str, value: &str, supported: &[&str]) -> Result<()> {
        if !supported.contains(&value) {
            bail!("{} option {key} = \"{value}\" is not supported (expected one of {supported:?})", self.class);
        }
        Ok(())
    }

    fn num_train_timesteps(&self) -> usize {
        get!(self, num_train_timesteps, 1000)
    }

    fn prediction_type(&self) -> Result<PredictionType> {
        Ok(match get!(self, prediction_type, "epsilon".into()).as_str() {
            // EulerDiscreteScheduler also accepts the old name `original_sample`.
            "original_sample" if self.class == "EulerDiscreteScheduler" => PredictionType::Sample,
            other => match PredictionType::parse(other) {
                Ok(p) => p,
                Err(_) => bail!("{} prediction_type \"{other}\" is not supported", self.class),
            },
        })
    }

    fn spacing(&self, default: &str) -> Result<Spacing> {
        Ok(match get!(self, timestep_spacing, default.into()).as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => {
                bail!("{} timestep_spacing \"{other}\" is not supported (leading, trailing, linspace)", self.class)
            }
        })
    }

    /// The train-time ᾱ_t in float32, as diffusers' __init__ computes it (CPU libtorch).
    /// `zsnr_floor`: Euler/DPM (not DDIM) then set the last ᾱ to 2^-24 under zero-SNR.
    fn alphas_cumprod(&self, zsnr_floor: bool) -> Result<Tensor> {
        let n = self.num_train_timesteps();
        let opts = (Kind::Float, Device::Cpu);
        let schedule = get!(self, beta_schedule, "linear".into());
        let mut betas = if let Some(trained) = self.get("trained_betas", &self.cfg.trained_betas) {
            Tensor::from_slice(&trained).to_kind(Kind::Float)
        } else {
            let (start, end) = (get!(self, beta_start, 0.0001), get!(self, beta_end, 0.02));
            match schedule.as_str() {
                "linear" => Tensor::linspace(start, end, n as i64, opts),
                "scaled_linear" => {
                    Tensor::linspace(start.powf(0.5), end.powf(0.5), n as i64, opts).pow_tensor_scalar(2)
                }
                "squaredcos_cap_v2" => Tensor::from_slice(&betas_for_alpha_bar(n)).to_kind(Kind::Float),
                other => bail!("{} beta_schedule \"{other}\" is not supported", self.class),
            }
        };
        let zsnr = get!(self, rescale_betas_zero_snr, false);
        if zsnr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = betas.rsub_scalar(1.0).cumprod(0, Kind::Float);
        if zsnr && zsnr_floor {
            let _ = alphas_cumprod.get(n as i64 - 1).fill_(2f64.powi(-24));
        }
        Ok(alphas_cumprod)
    }
}

/// diffusers' `betas_for_alpha_bar` (cosine), in Python floats.
fn betas_for_alpha_bar(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powf(2.0);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, op for op in float32.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas_bar_sqrt = betas.rsub_scalar(1.0).cumprod(0, Kind::Float).sqrt();
    let first = alphas_bar_sqrt.get(0).copy();
    let last = alphas_bar_sqrt.get(-1).copy();
    let shifted = &alphas_bar_sqrt - &last;
    let scaled = shifted * (&first / (&first - &last));
    let alphas_bar = scaled.pow_tensor_scalar(2);
    let n = alphas_bar.size()[0];
    let alphas = alphas_bar.narrow(0, 1, n - 1) / alphas_bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[alphas_bar.narrow(0, 0, 1), alphas], 0);
    alphas.rsub_scalar(1.0)
}

fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view(-1)).expect("float tensor")
}

/// The train sigmas √((1−ᾱ)/ᾱ) in float32, ascending in t.
fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    let a = Tensor::from_slice(alphas_cumprod);
    to_f32_vec(&(a.rsub_scalar(1.0) / &a).pow_tensor_scalar(0.5))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The DDIM/Euler `set_timesteps` spacing in float64, before each class's dtype cast:
/// linspace values are not yet rounded (DDIM rounds them, Euler keeps the fractions).
/// Trailing may give one extra timestep (-1): numpy's arange length, as diffusers.
fn spaced_timesteps(spacing: Spacing, train: usize, n: usize, steps_offset: i64) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => numpy::linspace(0.0, (train - 1) as f64, n).into_iter().rev().collect(),
        Spacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio) as f64 + steps_offset as f64).collect()
        }
        Spacing::Trailing => numpy::arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// One denoising step's results.
pub struct StepOutput {
    pub prev_sample: Tensor,
    /// The scheduler's x̂0 (for DPM-Solver++ the converted model output).
    pub pred_original_sample: Tensor,
}

pub trait Scheduler: Send {
    /// Timesteps as diffusers' `scheduler.timesteps` (DDIM/DPM int64, Euler float32 values,
    /// held exactly in f64), one per model call.
    fn timesteps(&self) -> &[f64];
    /// diffusers' `scheduler.sigmas` (float32 values, incl. the final one) for the
    /// σ-space schedulers; empty (the default) for the ᾱ-space ones (DDIM, DDPM).
    fn sigmas(&self) -> Vec<f64> {
        Vec::new()
    }
    /// The standard deviation of the initial noise (1 in ᾱ space, the default).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The model's input at `step_index` (the sample itself in ᾱ space, the default).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// One denoising step for the model call at `step_index` (index into timesteps()).
    /// `noise` is required by ancestral schedulers (shape of sample, standard normal).
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, noise: Option<&Tensor>)
        -> StepOutput;
    /// Whether step() at `step_index` consumes fresh generator noise, one standard normal
    /// draw of the sample's shape (the pipeline pre-draws it in diffusers' order).
    fn needs_step_noise(&self, _step_index: usize) -> bool {
        false
    }
    /// img2img: noise `original` to the timestep at `step_index` (diffusers add_noise with
    /// begin_index = step_index).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Tensor;
    /// Sampling starts at `step_index` (diffusers set_begin_index) – img2img. The schedulers
    /// here take the step index explicitly, so there is nothing to remember.
    fn set_begin_index(&mut self, _step_index: usize) {}
    /// Model calls per timestep entry (diffusers `order`; 1 for all of them).
    fn order(&self) -> usize {
        1
    }
    /// x̂0 as `step` predicts it at `step_index` from `model_output` for `sample` (the
    /// unscaled latent, as passed to `step`), before any clipping: affine in the model
    /// output, and a pure function (no scheduler state), so Grad-SAM can differentiate it.
    /// DDIM/DDPM: (z − √(1−ᾱ)·ε)/√ᾱ or √ᾱ·z − √(1−ᾱ)·v; Euler: z − σ·ε or the v form in
    /// σ space; DPM-Solver++ and UniPC: their converted model output.
    fn pred_original(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor;
    /// Train-time ᾱ_t (float32 values) for t = 0..num_train_timesteps.
    fn alphas_cumprod(&self) -> &[f64];
    fn prediction_type(&self) -> PredictionType;
}

/// Builds a scheduler like `XScheduler.from_config(config)` + `set_timesteps(steps)`.
/// `karras` overrides `use_karras_sigmas` to true (Euler, DPM-Solver++ and UniPC only);
/// false leaves the config's own value.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    karras: bool,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let cfg = ClassConfig { cfg: config, class: kind.class_name() };
    if num_inference_steps == 0 {
        bail!("the number of inference steps must be at least 1");
    }
    if num_inference_steps > cfg.num_train_timesteps() && matches!(kind, SchedulerKind::Ddim | SchedulerKind::Ddpm) {
        bail!("{num_inference_steps} inference steps exceed the {} train timesteps", cfg.num_train_timesteps());
    }
    if karras && matches!(kind, SchedulerKind::Ddim | SchedulerKind::Ddpm | SchedulerKind::EulerAncestral) {
        bail!("karras sigmas are not available for the {kind} scheduler (only euler, dpm++, dpm++-sde and unipc)");
    }
    let built: Box<dyn Scheduler> = match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&cfg, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(&cfg, karras, num_inference_steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::new(&cfg, num_inference_steps)?),
        SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(&cfg, num_inference_steps)?),
        SchedulerKind::DpmSolverMultistep => {
            Box::new(dpm_solver::DpmSolver::new(&cfg, karras, false, num_inference_steps)?)
        }
        SchedulerKind::DpmSolverSde => Box::new(dpm_solver::DpmSolver::new(&cfg, karras, true, num_inference_steps)?),
        SchedulerKind::UniPc => Box::new(unipc::UniPc::new(&cfg, karras, num_inference_steps)?),
    };
    Ok(built)
}

/// A float32 value as a 0-dim CPU tensor — diffusers' scheduler scalars are such tensors
/// (`self.sigmas[i]`). Ops that are not exactly rounded must run in libtorch: log, exp, and
/// even sqrt (libtorch's CPU float sqrt is not IEEE-exact).
fn scalar(v: f32) -> Tensor {
    Tensor::from(v)
}

/// `x ** 0.5` on a float32 0-dim CPU tensor.
fn sqrt32(x: f32) -> f32 {
    scalar(x).pow_tensor_scalar(0.5).double_value(&[]) as f32
}

/// A 1-element tensor of `v` in the sample's dtype and device, shaped to broadcast over it
/// — how diffusers' add_noise holds its coefficients.
fn coefficient(v: f32, like: &Tensor) -> Tensor {
    Tensor::from_slice(&[v]).to_kind(like.kind()).to_device(like.device()).view(vec![1i64; like.dim()].as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(
            SchedulerKind::parse_with_karras("dpm++-karras").unwrap(),
            (SchedulerKind::DpmSolverMultistep, true)
        );
        assert_eq!(SchedulerKind::parse_with_karras("dpm++-sde-karras").unwrap(), (SchedulerKind::DpmSolverSde, true));
        assert_eq!("euler-a".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
        assert_eq!("unipc".parse::<SchedulerKind>().unwrap(), SchedulerKind::UniPc);
        let err = "pndm".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains(&NAMES.join(", ")), "{err}");
        for name in NAMES {
            let (kind, karras) = SchedulerKind::parse_with_karras(name).unwrap();
            assert_eq!(kind.name(karras), Some(name));
            // Every name builds from an empty config (each class's defaults).
            build(kind, &SchedulerConfig::default(), karras, 10).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn python_json_infinities_parse() {
        let c = SchedulerConfig::from_json(
            r#"{"lambda_min_clipped": -Infinity, "x": "NaN-Infinity\"", "steps_offset": 1}"#,
        )
        .unwrap();
        assert_eq!(c.other["lambda_min_clipped"], Value::String("-Infinity".into()));
        assert_eq!(c.other["x"], Value::String("NaN-Infinity\"".into()));
        assert_eq!(c.steps_offset, Some(1));
    }
}
