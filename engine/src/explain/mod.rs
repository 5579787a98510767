//! Grad-SAM explainable latent manipulation.
//!
//! At chosen timesteps the latent `z_t` entering the step is explained: for each subject
//! token s, the importance of every latent element,
//!
//! ```text
//! I_s[c,i,j] = Σ_{l∈L} Σ_{h,q} A_l[h,q,s] · |∂x̂0[c,i,j] / ∂A_l[h,q,s]|
//! ```
//!
//! where `A_l` are the post-softmax probabilities of cross-attention layer l for the
//! prompt's *conditional* embedding only (batch 1, no CFG) and `x̂0` is the scheduler's own
//! prediction of the clean latent at that step (`Scheduler::pred_original`, without
//! clipping). For DDIM that is `(z − √(1−ᾱ)·ε)/√ᾱ` (ε-prediction) or `√ᾱ·z − √(1−ᾱ)·v`;
//! for the σ-space schedulers (Euler, Euler-a) the UNet sees `scale_model_input(z)` and
//! `x̂0 = z − σ·ε` (or the v form) with `z` in their parameterisation; for DPM-Solver++
//! its converted model output. x̂0 is affine in the UNet output with a factor b that is
//! constant within a step, so the maps of the different schedulers differ by |b| only.
//!
//! `exact` computes the definition with one backward pass per latent element (batched);
//! `fast` computes the same map from one extra forward pass (see `fast.rs` for the formula
//! and its cost). The maps become a mask (`mask.rs`), and the latent is replaced outside
//! the mask by the reference noised to that step: `z ← m⊙z + (1−m)⊙add_noise(E(ref), ε, k)`.
pub mod dump;
pub mod edit;
mod exact;
mod fast;
pub mod mask;

pub use mask::MaskParams;

use super::model::StableDiffusion;
use super::schedulers::Scheduler;
use super::tokenizer::{ClipTokenizer, TokenInfo};
use super::unet::CrossContext;
use anyhow::{bail, ensure, Result};
use std::str::FromStr;
use tch::{Kind, Tensor};

/// How the importance maps are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExplainMode {
    /// The definition: one backward pass per latent element. For small latents and checks.
    Exact,
    /// The factorised computation of `fast.rs`: one extra forward (+ small backward) pass.
    Fast,
}

impl FromStr for ExplainMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "exact" => Self::Exact,
            "fast" => Self::Fast,
            other => bail!("unknown explain mode {} (expected exact or fast)", crate::text::quote(other)),
        })
    }
}

impl std::fmt::Display for ExplainMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Exact => "exact",
            Self::Fast => "fast",
        })
    }
}

/// Which cross-attention layers (attn2, numbered in forward order from 0) enter the sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerChoice {
    /// The last one in forward order (the paper's choice).
    Last,
    All,
    List(Vec<usize>),
}

impl FromStr for LayerChoice {
    type Err = anyhow::Error;
    /// `last`, `all` or a comma-separated list of layer numbers (`0,5,10`).
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "last" => Self::Last,
            "all" => Self::All,
            list => {
                let layers =
                    list.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>().map_err(
                        |_| {
                            anyhow::anyhow!(
                                "explain layers {}: expected last, all or a list like 0,5,10",
                                crate::text::quote(s)
                            )
                        },
                    )?;
                Self::List(layers)
            }
        })
    }
}

impl LayerChoice {
    /// The layer numbers for a UNet with `count` cross-attention layers.
    pub fn resolve(&self, count: usize) -> Result<Vec<usize>> {
        ensure!(count > 0, "this model's UNet has no cross-attention layer to explain");
        Ok(match self {
            Self::Last => vec![count - 1],
            Self::All => (0..count).collect(),
            Self::List(list) => {
                ensure!(!list.is_empty(), "the list of explain layers is empty");
                let mut out: Vec<usize> = Vec::new();
                for &l in list {
                    ensure!(
                        l < count,
                        "cross-attention layer {l} does not exist: this model has {count} (0 to {})",
                        count - 1
                    );
                    if !out.contains(&l) {
                        out.push(l);
                    }
                }
                out.sort_unstable();
                out
            }
        })
    }
}

/// A subject as the request names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectSpec {
    /// Every token of this word of the prompt (case-insensitive).
    Word(String),
    /// A position among the prompt's tokens (77 for SD); 0 is the start token.
    Index(usize),
}

/// Grad-SAM settings of a job.
#[derive(Clone, Debug)]
pub struct ExplainParams {
    pub mode: ExplainMode,
    pub layers: LayerChoice,
    /// Empty: chosen automatically from the prompt (content words, see `auto_subjects`).
    pub subjects: Vec<SubjectSpec>,
    /// Timesteps to manipulate at, each snapped to the nearest timestep the job runs.
    /// Empty: those of the paper's [`DEFAULT_TIMESTEPS`] that lie within the job's
    /// schedule (a short img2img schedule, e.g. strength 0.6, does not reach 780).
    pub timesteps: Vec<f64>,
    pub mask: MaskParams,
    /// Exact mode: latent elements per backward pass (the batch of replicated latents).
    /// None: chosen from the latent size (`exact::default_batch`).
    pub exact_batch: Option<usize>,
}

/// The paper's manipulation timesteps.
pub const DEFAULT_TIMESTEPS: [f64; 3] = crate::pipeline::defaults::TIMESTEPS;

impl Default for ExplainParams {
    fn default() -> Self {
        Self {
            mode: ExplainMode::Fast,
            layers: LayerChoice::Last,
            subjects: Vec::new(),
            timesteps: Vec::new(),
            mask: MaskParams::default(),
            exact_batch: None,
        }
    }
}

/// One subject token, as chosen for the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Position among the prompt's tokens (77 for SD; 0 = start token).
    pub token_index: usize,
    /// The token id (the padding id past the prompt's end).
    pub id: i64,
    /// Index of the prompt word it came from, if any.
    pub word_index: Option<usize>,
    /// The token as in the vocabulary ("star</w>"), or "(padding)" past the prompt's end.
    pub token: String,
    /// The prompt word it came from (lower-cased), if any.
    pub word: Option<String>,
}

impl Subject {
    /// A short label: the word, else the token without its end-of-word mark.
    pub fn label(&self) -> String {
        self.word.clone().unwrap_or_else(|| self.token.trim_end_matches("</w>").to_string())
    }
}

/// A manipulation step of the job.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedStep {
    /// 0-based index among the steps this job runs (StepEvent::index).
    pub index: usize,
    pub timestep: f64,
    /// The timestep(s) the request asked for that snapped to this one.
    pub requested: Vec<f64>,
}

/// What Grad-SAM will do in a job, resolved against the model and the job's schedule.
#[derive(Clone, Debug)]
pub struct ExplainPlan {
    pub mode: ExplainMode,
    /// Cross-attention layers in the sum (ascending).
    pub layers: Vec<usize>,
    pub subjects: Vec<Subject>,
    /// True when the subjects were picked automatically from the prompt.
    pub subjects_auto: bool,
    /// Ascending in index (descending in timestep).
    pub steps: Vec<PlannedStep>,
    pub mask: MaskParams,
    pub exact_batch: Option<usize>,
}

impl ExplainPlan {
    /// Validates `params` and resolves them for `prompt` on `model`, for a job that runs
    /// the timesteps `run`.
    pub fn new(model: &StableDiffusion, prompt: &str, params: &ExplainParams, run: &[f64]) -> Result<Self> {
        params.mask.validate()?;
        if let Some(b) = params.exact_batch {
            ensure!(b >= 1, "the exact-mode batch must be at least 1");
        }
        let (subjects, subjects_auto) = resolve_subjects(&model.tokenizer, prompt, &params.subjects)?;
        Ok(Self {
            mode: params.mode,
            layers: params.layers.resolve(model.unet.cross_attention_layer_count())?,
            subjects,
            subjects_auto,
            steps: snap_timesteps(&params.timesteps, run)?,
            mask: params.mask.clone(),
            exact_batch: params.exact_batch,
        })
    }

    pub fn step_at(&self, index: usize) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.index == index)
    }

    pub fn subject_indices(&self) -> Vec<usize> {
        self.subjects.iter().map(|s| s.token_index).collect()
    }
}

/// Words that are never picked as subjects: function words and words that place, size or
/// count things rather than name them. Colours, shapes and other nouns stay.
const STOP_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "those",
    "some",
    "any",
    "each",
    "every",
    "no",
    "of",
    "in",
    "on",
    "at",
    "to",
    "from",
    "by",
    "with",
    "without",
    "for",
    "into",
    "onto",
    "over",
    "under",
    "above",
    "below",
    "behind",
    "between",
    "near",
    "next",
    "beside",
    "around",
    "across",
    "through",
    "inside",
    "outside",
    "up",
    "down",
    "off",
    "out",
    "and",
    "or",
    "but",
    "nor",
    "so",
    "as",
    "than",
    "then",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "am",
    "has",
    "have",
    "had",
    "do",
    "does",
    "did",
    "it",
    "its",
    "it's",
    "he",
    "she",
    "they",
    "them",
    "their",
    "his",
    "her",
    "we",
    "our",
    "you",
    "your",
    "i",
    "my",
    "me",
    "there",
    "here",
    "very",
    "too",
    "also",
    "just",
    "not",
    "one",
    "two",
    "three",
    "four",
    "five",
    "many",
    "few",
    "several",
    "lots",
    "lot",
    "top",
    "bottom",
    "left",
    "right",
    "middle",
    "center",
    "centre",
    "corner",
    "side",
    "front",
    "back",
    "background",
    "foreground",
    "small",
    "large",
    "big",
    "tiny",
    "huge",
    "little",
    "image",
    "photo",
    "picture",
    "scene",
    "view",
    "style",
    "high",
    "low",
    "quality",
    "detailed",
    "while",
    "where",
    "which",
    "who",
    "what",
    "when",
    "all",
];

/// The prompt's content words (alphabetic, not a stop word), each with all its tokens.
pub fn auto_subjects(tokens: &[TokenInfo]) -> Vec<Subject> {
    tokens
        .iter()
        .filter(|t| {
            t.word
                .as_deref()
                .is_some_and(|w| w.chars().all(char::is_alphabetic) && !STOP_WORDS.contains(&w.to_lowercase().as_str()))
        })
        .map(Subject::from_token)
        .collect()
}

impl Subject {
    fn from_token(t: &TokenInfo) -> Self {
        Self {
            token_index: t.position,
            id: t.id,
            word_index: t.word_index,
            token: t.text.clone(),
            word: t.word.clone(),
        }
    }
}

/// Resolves the request's subjects against the prompt's tokens. Returns (subjects, auto).
pub fn resolve_subjects(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    specs: &[SubjectSpec],
) -> Result<(Vec<Subject>, bool)> {
    let tokens = tokenizer.tokens(prompt);
    let max = tokenizer.max_length();
    let words = || {
        let mut w: Vec<String> = tokens.iter().filter_map(|t| t.word.clone()).collect();
        w.dedup();
        crate::text::quote(&w.join(", "))
    };
    if specs.is_empty() {
        let subjects = auto_subjects(&tokens);
        ensure!(
            !subjects.is_empty(),
            "no subject found in the prompt (words: {}); name one by word or by token index",
            words()
        );
        return Ok((subjects, true));
    }
    let mut out: Vec<Subject> = Vec::new();
    for spec in specs {
        let found: Vec<Subject> = match spec {
            SubjectSpec::Word(word) => {
                let wanted = word.trim().to_lowercase();
                ensure!(!wanted.is_empty(), "an empty subject word");
                let hits: Vec<Subject> = tokens
                    .iter()
                    .filter(|t| {
                        t.word.as_deref().is_some_and(|w| w.to_lowercase() == wanted)
                            || (t.word.is_some() && t.text.trim_end_matches("</w>").to_lowercase() == wanted)
                    })
                    .map(Subject::from_token)
                    .collect();
                ensure!(
                    !hits.is_empty(),
                    "subject word {} is not in the prompt (its words: {})",
                    crate::text::quote(word),
                    words()
                );
                hits
            }
            SubjectSpec::Index(i) => {
                ensure!(
                    *i < max,
                    "subject token index {i} is out of range: a prompt has {max} token positions, 0 to {} (0 is the start token)",
                    max - 1
                );
                let subject = match tokens.get(*i) {
                    Some(t) => Subject::from_token(t),
                    None => Subject {
                        token_index: *i,
                        id: tokenizer.pad_id(),
                        word_index: None,
                        token: "(padding)".into(),
                        word: None,
                    },
                };
                vec![subject]
            }
        };
        for s in found {
            if !out.iter().any(|o| o.token_index == s.token_index) {
                out.push(s);
            }
        }
    }
    Ok((out, false))
}

/// Snaps each requested timestep to the nearest of `run` (the timesteps the job runs, in
/// order); one outside [min, max] of `run` is an error. Returns steps ascending in index.
pub fn snap_timesteps(requested: &[f64], run: &[f64]) -> Result<Vec<PlannedStep>> {
    ensure!(!run.is_empty(), "the job runs no step");
    let lo = run.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = run.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let defaults: Vec<f64>;
    let requested = if requested.is_empty() {
        defaults = DEFAULT_TIMESTEPS.iter().copied().filter(|t| (lo..=hi).contains(t)).collect();
        ensure!(
            !defaults.is_empty(),
            "none of the default manipulation timesteps 780, 520, 320 lies within this job's schedule \
             (t={hi} down to t={lo}); name timesteps, or raise strength or steps"
        );
        &defaults[..]
    } else {
        requested
    };
    let mut steps: Vec<PlannedStep> = Vec::new();
    for &t in requested {
        ensure!(t.is_finite(), "manipulation timestep {t} is not a number");
        ensure!(
            t >= lo && t <= hi,
            "manipulation timestep {t} is outside this job's schedule: its steps run from t={hi} down to t={lo}"
        );
        let (index, _) = run
            .iter()
            .enumerate()
            .map(|(i, &r)| (i, (r - t).abs()))
            .fold((0, f64::INFINITY), |best, cur| if cur.1 < best.1 { cur } else { best });
        match steps.iter_mut().find(|s| s.index == index) {
            Some(s) => s.requested.push(t),
            None => steps.push(PlannedStep { index, timestep: run[index], requested: vec![t] }),
        }
    }
    steps.sort_by_key(|s| s.index);
    Ok(steps)
}

/// The importance maps I_s of `latents` ([1, C, h, w], the latent entering step
/// `step_index` at `timestep`) for the token positions `subjects`, summed over `layers`:
/// [S, C, h, w] float32 on the model's device. `cond` is the conditioning of the prompt
/// alone: the text embedding [1, keys, D] (77 keys for SD) and, for SDXL, its added
/// conditioning (`StableDiffusion::text_context` without a negative prompt).
#[allow(clippy::too_many_arguments)]
pub fn attribute(
    model: &StableDiffusion,
    scheduler: &dyn Scheduler,
    latents: &Tensor,
    step_index: usize,
    timestep: f64,
    cond: &CrossContext,
    layers: &[usize],
    subjects: &[usize],
    mode: ExplainMode,
    exact_batch: Option<usize>,
) -> Result<Tensor> {
    let size = latents.size();
    ensure!(size.len() == 4 && size[0] == 1, "expected one latent [1, C, h, w], got {size:?}");
    ensure!(cond.states().size().first() == Some(&1), "expected one conditional embedding [1, keys, D]");
    ensure!(!subjects.is_empty(), "no subject to explain");
    ensure!(!layers.is_empty(), "no cross-attention layer to explain");
    let n = model.unet.cross_attention_layer_count();
    ensure!(layers.iter().all(|&l| l < n), "cross-attention layers {layers:?} out of range (the model has {n})");
    let keys = cond.states().size()[1] as usize; // the tokenizer's model_max_length (77 for SD)
    ensure!(
        subjects.iter().all(|&s| s < keys),
        "subject token positions {subjects:?} out of range (0 to {})",
        keys - 1
    );
    let latents = latents.detach().to_kind(model.kind);
    let cond = cond.detached(model.kind);
    let at = AttributionPoint { model, scheduler, latents: &latents, step_index, timestep, cond: &cond };
    let maps = tch::with_grad(|| match mode {
        ExplainMode::Exact => exact::importance(&at, layers, subjects, exact_batch),
        ExplainMode::Fast => fast::importance(&at, layers, subjects),
    })?;
    Ok(maps.detach().to_kind(Kind::Float))
}

/// Where an attribution is taken: the model, the job's scheduler, the latent entering
/// `step_index` (at `timestep`) and the conditional embedding. Shared by both modes.
#[derive(Clone, Copy)]
pub(super) struct AttributionPoint<'a> {
    pub model: &'a StableDiffusion,
    pub scheduler: &'a dyn Scheduler,
    pub latents: &'a Tensor,
    pub step_index: usize,
    pub timestep: f64,
    pub cond: &'a CrossContext,
}

/// The factor b of x̂0 = a·z + b·(model output) at `step_index` (all schedulers' x̂0 is
/// affine in the model output).
pub(crate) fn output_coefficient(scheduler: &dyn Scheduler, step_index: usize) -> f64 {
    let opts = (Kind::Float, tch::Device::Cpu);
    let ones = Tensor::ones([1], opts);
    let zeros = Tensor::zeros([1], opts);
    let b = scheduler.pred_original(&ones, step_index, &zeros).double_value(&[0]);
    let zero = scheduler.pred_original(&zeros, step_index, &zeros).double_value(&[0]);
    b - zero
}

/// For a layer with `queries` tokens on a latent of `h`×`w`: its grid (hl, wl) and the
/// factor f with hl = ⌈h/f⌉ (stride-2 downsampling with padding 1 rounds up).
pub(crate) fn layer_grid(queries: i64, h: i64, w: i64) -> Result<(i64, i64, i64)> {
    let mut f = 1;
    while f <= h.max(w) * 2 {
        let (hl, wl) = ((h + f - 1) / f, (w + f - 1) / f);
        if hl * wl == queries {
            return Ok((hl, wl, f));
        }
        f *= 2;
    }
    bail!("a cross-attention layer with {queries} queries does not fit a {h}×{w} latent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapping() {
        let run = [881.0, 861.0, 841.0, 781.0, 521.0, 321.0, 1.0];
        let s = snap_timesteps(&[780.0, 520.0, 320.0, 790.0], &run).unwrap();
        assert_eq!(s.iter().map(|s| s.index).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(s[0].requested, vec![780.0, 790.0]);
        let err = snap_timesteps(&[900.0], &run).unwrap_err().to_string();
        assert!(err.contains("outside this job's schedule"), "{err}");
        assert!(snap_timesteps(&[0.5], &run).is_err());
    }

    #[test]
    fn layers_parse_and_resolve() {
        assert_eq!("last".parse::<LayerChoice>().unwrap().resolve(11).unwrap(), vec![10]);
        assert_eq!("all".parse::<LayerChoice>().unwrap().resolve(3).unwrap(), vec![0, 1, 2]);
        assert_eq!("5, 0,5".parse::<LayerChoice>().unwrap().resolve(11).unwrap(), vec![0, 5]);
        assert!("11".parse::<LayerChoice>().unwrap().resolve(11).is_err());
        assert!("x".parse::<LayerChoice>().is_err());
    }

    #[test]
    fn grids() {
        assert_eq!(layer_grid(192, 12, 16).unwrap(), (12, 16, 1));
        assert_eq!(layer_grid(48, 12, 16).unwrap(), (6, 8, 2));
        assert_eq!(layer_grid(6, 12, 20).unwrap(), (2, 3, 8));
        assert!(layer_grid(7, 12, 16).is_err());
    }
}
