//! train_tiny: trains the tiny "shapes" model from nothing and writes it as a diffusers folder.
//!
//!   train_tiny [--out models/shapes] [--work target/train-tiny] [--seed 0]
//!              [--vae-steps 3000] [--unet-steps 8800] [--batch 32] [--device cpu|cuda]
//!              [--zero-snr true] [--te-pretrain-steps 1500] [--te-lr-scale 0.2] [--aux-weight 0.1]
//!              [--ground-early-weight 0.05] [--ground-from 2000] [--ground-weight 0.5]
//!              [--focus-steps 2000] [--focus-lr 2e-4] [--focus-shapes star,cross,diamond,triangle]
//!              [--focus-ema 0.998] [--heads 2] [--polish-steps 2000] [--polish-lr 2e-4]
//!              [--polish-only false] [--polish-object-weight 4]
//!
//! Stages (each resumable: a finished stage's checkpoint in --work is loaded, not redone):
//!  1. tokenizer: byte-level BPE over the caption vocabulary (bpe.rs);
//!  2. VAE (KL, factor 4): L1 + ½·MSE + 1e-6·KL on scenes drawn on the fly, object pixels
//!     weighted 1 + OBJECT_WEIGHT; then scaling_factor = 1/std(latents), as SD did;
//!  3. text encoder pre-training: an attention-readout classifier (text_aux.rs) must read
//!     every object's colour, shape, size and position and the background from its output;
//!  4. UNet + text encoder jointly (encoder at te-lr-scale × the UNet's rate, the classifier's
//!     loss kept at aux-weight), v-prediction on SD's noise schedule rescaled to zero terminal
//!     SNR (x₀-weight min(SNR + 1, 6)), plus the attention grounding loss (grounding.rs:
//!     each object's words attend to its cells) at ground-weight; 10 % empty captions (for
//!     classifier-free guidance), 20 % subject-only
//!     captions, two thirds of the batches single-object; EMA of the weights (saved);
//!     then a focus phase (fresh optimisers, its own lr schedule) in which half of the
//!     single-object scenes show a shape the model drew worst on the tuning set;
//!  5. export: fp16 diffusers folder (+ training.json, loss.csv, loss.png) in --out;
//!  6. polish (when --polish-steps > 0): the exported UNet trained on alone, text encoder
//!     frozen, on the focus phase's scenes (object cells' loss weighted 1 + polish-object-
//!     weight), then exported again. It reads only --out, so
//!     `--polish-only true` runs it on an existing export (a shipped model) and makes the
//!     files a from-scratch run makes. It keeps no checkpoint: an interrupted polish is redone.
//!
//! Progress with ETA goes to stdout. Everything is seeded (trainer/README.md, Determinism).
use anyhow::{bail, Context, Result};
use frisket_shapes::Shape;
use frisket_trainer::data::{self, BatchSpec};
use frisket_trainer::engine::tokenizer::ClipTokenizer;
use frisket_trainer::engine::unet::{Capture, CrossContext, UNet2DConditionModel, UNetOutput};
use frisket_trainer::flags::Flags;
use frisket_trainer::params::{AdamW, Params};
use frisket_trainer::text_aux::{self, CaptionClassifier};
use frisket_trainer::{bpe, configs, grounding, plot};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Eval prompts (trainer/src/bin/eval_tiny.rs) that training never sees.
const HELD_OUT_SCENES: u64 = 200;
const VAE_BLOCKS: [i64; 3] = [32, 64, 64];
const UNET_BLOCKS: [i64; 3] = [64, 128, 128];
const TEXT_WIDTH: i64 = 64;
const TEXT_LAYERS: i64 = 4;
/// Extra VAE loss weight on object pixels (and a one-pixel rim).
const OBJECT_WEIGHT: f64 = 4.0;
/// The UNet's loss, in x₀ terms, weighs each timestep min(SNR + 1, V_WEIGHT_CAP): v-prediction
/// with its plain loss up to the cap (see the comment at the loss).
const V_WEIGHT_CAP: f64 = 6.0;

struct Args {
    out: PathBuf,
    work: PathBuf,
    seed: u64,
    vae_steps: u64,
    vae_batch: usize,
    unet_steps: u64,
    batch: usize,
    device: Device,
    /// Train (and ship a scheduler config) with zero terminal SNR, so that t = 999 is pure noise
    /// as at sampling time, and the layout there can only come from the caption.
    zero_snr: bool,
    /// Steps of text-encoder pre-training with the caption classifier (batch 64).
    te_pretrain_steps: u64,
    /// The text encoder's learning rate during UNet training, relative to the UNet's.
    te_lr_scale: f64,
    /// Weight of the caption classifier's loss during UNet training.
    aux_weight: f64,
    /// Weight of the attention grounding loss (grounding.rs): ground_early_weight before step
    /// ground_from, ground_weight from it on.
    ground_weight: f64,
    ground_early_weight: f64,
    ground_from: u64,
    /// A last phase after unet_steps: fresh optimisers, its own warm-up and cosine from
    /// focus_lr, and half of the single-object scenes showing one of focus_shapes.
    focus_steps: u64,
    focus_lr: f64,
    focus_shapes: Vec<Shape>,
    /// The EMA's decay during the focus phase. It is shorter than the main phase's 0.999 (a
    /// memory of about 1000 steps), which would keep a large share of pre-phase weights in the
    /// export and hide part of what the phase taught.
    focus_ema: f64,
    /// The UNet's attention heads per layer (SD 1.x's `attention_head_dim`): 2 gives heads 32
    /// and 64 wide. The CPU's flash attention is slow on narrow heads (8 heads are 8 and 16
    /// wide), and attention is the largest single part of a training step.
    heads: i64,
    /// Stage 6, after the export: the exported UNet trained on (text encoder frozen, fresh
    /// AdamW, warm-up 100 and cosine from polish_lr, focus batches, EMA at focus_ema from the
    /// exported weights), then exported again. It reads only the exported folder, so
    /// `--polish-only true` runs it on an existing export and makes the same files.
    polish_steps: u64,
    polish_lr: f64,
    polish_only: bool,
    /// The polish's extra denoising-loss weight on latent cells covered by objects (0: none).
    /// A star's points are sub-cell detail in a 3-cell blob, and objects are ~7 % of the cells,
    /// so the plain mean spends most of the loss on backgrounds the model already draws.
    polish_object_weight: f64,
}

fn parse_args() -> Result<Args> {
    let known = [
        "out",
        "work",
        "seed",
        "vae-steps",
        "vae-batch",
        "unet-steps",
        "batch",
        "device",
        "zero-snr",
        "te-pretrain-steps",
        "te-lr-scale",
        "aux-weight",
        "ground-weight",
        "ground-early-weight",
        "ground-from",
        "focus-steps",
        "focus-lr",
        "focus-shapes",
        "focus-ema",
        "heads",
        "polish-steps",
        "polish-lr",
        "polish-only",
        "polish-object-weight",
    ];
    let f = Flags::from_env(&known, "the doc comment of trainer/src/bin/train_tiny.rs")?;
    Ok(Args {
        out: f.get("out", "models/shapes".into())?,
        work: f.get("work", "target/train-tiny".into())?,
        seed: f.get("seed", 0)?,
        vae_steps: f.get("vae-steps", 3000)?,
        vae_batch: f.get("vae-batch", 16)?,
        unet_steps: f.get("unet-steps", 8800)?,
        batch: f.get("batch", 32)?,
        zero_snr: f.get("zero-snr", true)?,
        te_pretrain_steps: f.get("te-pretrain-steps", 1500)?,
        te_lr_scale: f.get("te-lr-scale", 0.2)?,
        aux_weight: f.get("aux-weight", 0.1)?,
        ground_weight: f.get("ground-weight", 0.5)?,
        ground_early_weight: f.get("ground-early-weight", 0.05)?,
        ground_from: f.get("ground-from", 2000)?,
        focus_steps: f.get("focus-steps", 2000)?,
        focus_lr: f.get("focus-lr", 2e-4)?,
        focus_ema: f.get("focus-ema", 0.998)?,
        heads: f.get("heads", 2)?,
        polish_steps: f.get("polish-steps", 2000)?,
        polish_lr: f.get("polish-lr", 2e-4)?,
        polish_only: f.get("polish-only", false)?,
        polish_object_weight: f.get("polish-object-weight", 4.0)?,
        focus_shapes: f
            .get::<String>("focus-shapes", "star,cross,diamond,triangle".into())?
            .split(',')
            .map(|n| Shape::from_name(n.trim()).with_context(|| format!("--focus-shapes: unknown shape {n:?}")))
            .collect::<Result<_>>()?,
        device: match f.get("device", "cpu".to_string())?.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            _ => bail!("--device is cpu or cuda"),
        },
    })
}

/// Linear warm-up, then cosine decay to 10 % of the peak.
fn lr_at(step: u64, steps: u64, peak: f64, warmup: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

struct Progress {
    name: &'static str,
    steps: u64,
    t0: Instant,
    acc: f64,
    n: u64,
}

impl Progress {
    fn new(name: &'static str, steps: u64) -> Self {
        Self { name, steps, t0: Instant::now(), acc: 0.0, n: 0 }
    }
    fn add(&mut self, step: u64, loss: f64, extra: &str) {
        self.acc += loss;
        self.n += 1;
        if step.is_multiple_of(25) || step + 1 == self.steps {
            let el = self.t0.elapsed().as_secs_f64();
            let per = el / (step + 1) as f64;
            let eta = per * (self.steps - step - 1) as f64;
            println!(
                "[{}] step {:5}/{} ({:3.0} %) loss {:.4} {extra} {:.3} s/step, elapsed {:.0} min, eta {:.0} min {:02.0} s",
                self.name, step + 1, self.steps, 100.0 * (step + 1) as f64 / self.steps as f64,
                self.acc / self.n as f64, per, el / 60.0, (eta / 60.0).floor(), eta % 60.0
            );
            let _ = std::io::stdout().flush();
            self.acc = 0.0;
            self.n = 0;
        }
    }
}

/// The full captions of the single-object eval scenes. (Subject-only phrases such as "a red
/// circle on the right" cannot be held out: there are only 1,701 of them, and the protect eval
/// uses them with new scenes.)
fn held_out_captions() -> HashSet<String> {
    data::eval_single_object_scenes(HELD_OUT_SCENES).into_iter().map(|s| s.meta.caption).collect()
}

/// Stage 2. Returns (losses, seconds).
fn train_vae(
    a: &Args,
    params: &Params,
    vae: &frisket_trainer::engine::vae::AutoencoderKl,
    held_out: &HashSet<String>,
) -> Result<(Vec<f64>, f64)> {
    let peak = 5e-4;
    let mut opt = AdamW::new(params, peak, 0.0);
    let mut prog = Progress::new("vae", a.vae_steps);
    let mut losses = Vec::new();
    for step in 0..a.vae_steps {
        opt.lr = lr_at(step, a.vae_steps, peak, 100);
        let spec =
            BatchSpec { run_seed: a.seed, step, size: a.vae_batch, single_object: step % 2 == 0, held_out, focus: &[] };
        let (x, owners, _) = data::batch_with_objects(&spec);
        let x = x.to_device(a.device);
        // Objects are a few percent of the pixels but all of what the judge reads (shape
        // corners, edges): weight them and a one-pixel rim around them 1 + OBJECT_WEIGHT.
        let w = object_pixels(&owners, a.device) * OBJECT_WEIGHT + 1.0;
        let w = &w / w.mean(Kind::Float);
        let post = vae.encode(&x);
        let z = post.sample_with(&post.mean.randn_like());
        let y = vae.decode(&z);
        let l1 = ((&y - &x).abs() * &w).mean(Kind::Float);
        let mse = ((&y - &x).square() * &w).mean(Kind::Float);
        let kl =
            ((post.mean.square() + post.logvar.exp() - 1.0 - &post.logvar) * 0.5).sum(Kind::Float) / a.vae_batch as f64;
        let loss = &l1 + &mse * 0.5 + &kl * 1e-6;
        params.zero_grad();
        loss.backward();
        opt.step(params);
        let lv = loss.double_value(&[]);
        losses.push(lv);
        let psnr = 10.0 * (4.0 / (&y - &x).square().mean(Kind::Float).double_value(&[])).log10();
        prog.add(step, lv, &format!("psnr {psnr:5.2} dB"));
    }
    Ok((losses, prog.t0.elapsed().as_secs_f64()))
}

/// The UNet's losses on one batch of clean latents: each is noised at a random timestep,
/// then the x₀-weighted v-prediction MSE (each latent cell weighted by `cell_weights`
/// [B, 1, h, w], mean 1 per sample, when given), and the grounding loss on the attention
/// captured at `capture` when `ground` is given (zero otherwise).
fn denoising_losses(
    unet: &UNet2DConditionModel,
    alphas: &Tensor,
    latents: &Tensor,
    ehs: &Tensor,
    capture: &[usize],
    ground: Option<&grounding::Targets>,
    cell_weights: Option<&Tensor>,
) -> (Tensor, Tensor) {
    let bsz = latents.size()[0];
    let t = Tensor::randint(1000, [bsz], (Kind::Int64, latents.device()));
    let noise = latents.randn_like();
    let ac = alphas.index_select(0, &t).view([bsz, 1, 1, 1]);
    let one_minus = -&ac + 1.0;
    let noisy = latents * ac.sqrt() + &noise * one_minus.sqrt();
    let t = t.to_kind(Kind::Float);
    let UNetOutput { sample: pred, probs, .. } =
        unet.forward(&noisy, &t, &CrossContext::new(ehs), Capture::layers(capture));
    // v-prediction (v = √ᾱ·ε − √(1−ᾱ)·x₀). The layout (which shape goes where) is decided
    // at high noise, where ε-prediction's loss barely sees x₀: in x₀ terms ε-MSE weighs a
    // timestep by its SNR (0.005 at t = 999 on SD's schedule), v-MSE by SNR + 1 (≥ 1), so an
    // ε-model learns colour but leaves placement to chance. Capped at low noise (min-SNR's
    // idea, Hang et al. 2023): weight min(SNR + 1, cap)/(SNR + 1) on the v-MSE.
    let target = &noise * ac.sqrt() - latents * one_minus.sqrt();
    let snr = &ac / &one_minus;
    let w = (&snr + 1.0).clamp_max(V_WEIGHT_CAP) / (&snr + 1.0);
    let err = (pred - &target).square();
    let err = match cell_weights {
        Some(w) => err * w,
        None => err,
    };
    let per_sample = err.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float);
    let diffusion = (per_sample * w.view([bsz])).mean(Kind::Float);
    let ground = match ground {
        Some(targets) => grounding::loss(&probs, targets),
        None => Tensor::zeros([], (Kind::Float, latents.device())),
    };
    (diffusion, ground)
}

/// 1 on object pixels and a one-pixel rim around them, 0 elsewhere. `owners`: [B, 1, H, W]
/// object ids (0 background).
fn object_pixels(owners: &Tensor, device: Device) -> Tensor {
    owners.gt(0.0).to_kind(Kind::Float).to_device(device).max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)
}

/// Per latent cell 1 + `extra` × the share of its pixels that are `object_pixels` (the VAE
/// stage's weighted pixels), scaled to mean 1 per sample so that the loss keeps its size.
fn object_cell_weights(owners: &Tensor, latents: &Tensor, extra: f64) -> Tensor {
    let (h, w) = (latents.size()[2], latents.size()[3]);
    let cover = object_pixels(owners, latents.device()).adaptive_avg_pool2d([h, w]);
    let weights = cover * extra + 1.0;
    &weights / weights.mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float)
}

/// A drawn batch, encoded by the frozen VAE: the posterior, the per-pixel object owners and
/// the captions. Each serves two consecutive steps (`pair` = step / 2; fresh timesteps, noise
/// and caption dropout in each): the encode is a sizeable part of a step on the CPU. Two
/// thirds of the batches are single-object scenes, as the eval's main prompts are.
type EncodedBatch = (frisket_trainer::engine::vae::DiagonalGaussian, Tensor, Vec<String>);

fn encode_batch(
    a: &Args,
    vae: &frisket_trainer::engine::vae::AutoencoderKl,
    pair: u64,
    held_out: &HashSet<String>,
    focus: &[Shape],
) -> EncodedBatch {
    let spec = BatchSpec { run_seed: a.seed, step: pair, size: a.batch, single_object: pair % 3 != 2, held_out, focus };
    let (x, owners, caps) = data::batch_with_objects(&spec);
    let post = tch::no_grad(|| vae.encode(&x.to_device(a.device)));
    (post, owners.to_device(a.device), caps)
}

/// Padded token ids of `texts`, one row each.
fn token_ids(tokenizer: &ClipTokenizer, texts: &[&str], device: Device) -> Tensor {
    let ids: Vec<Tensor> = texts.iter().map(|t| Tensor::from_slice(&tokenizer.encode_padded(t))).collect();
    Tensor::stack(&ids, 0).to_device(device)
}

/// The caption the text encoder sees for a scene caption at (step, i): 10 % empty (for
/// classifier-free guidance), 20 % subject-only, else the full caption.
fn caption_variant(r: f64, c: &str) -> &str {
    if r < 0.1 {
        ""
    } else if r < 0.3 {
        data::subject_only(c)
    } else {
        c
    }
}

/// Stage 3: the text encoder learns to keep every attribute word apart before the UNet sees
/// it. Returns (losses, seconds, per-question accuracy over the last 100 steps).
fn pretrain_text_encoder(
    a: &Args,
    te: &frisket_trainer::engine::clip::ClipTextModel,
    te_params: &Params,
    aux: &CaptionClassifier,
    tokenizer: &ClipTokenizer,
    held_out: &HashSet<String>,
) -> Result<(Vec<f64>, f64, Vec<f64>)> {
    const BATCH: usize = 64;
    let peak = 1e-3;
    let mut te_opt = AdamW::new(te_params, peak, 0.01);
    let mut aux_opt = AdamW::new(&aux.params, peak, 0.0);
    let mut prog = Progress::new("text", a.te_pretrain_steps);
    let mut losses = Vec::new();
    let mut acc_sum = vec![0.0; text_aux::questions().len()];
    let mut acc_n = 0.0f64;
    for step in 0..a.te_pretrain_steps {
        let lr = lr_at(step, a.te_pretrain_steps, peak, 100);
        te_opt.lr = lr;
        aux_opt.lr = lr;
        let caps = data::captions(&BatchSpec {
            run_seed: a.seed ^ 0x7e47,
            step,
            size: BATCH,
            single_object: step % 3 != 2,
            held_out,
            focus: &[],
        });
        let rng = |i: usize| frisket_shapes::rng::Rng::new(a.seed ^ 0x7e47 ^ (step << 16) ^ i as u64).unit();
        let texts: Vec<&str> = caps.iter().enumerate().map(|(i, c)| caption_variant(rng(i), c)).collect();
        let hidden = te.forward(&token_ids(tokenizer, &texts, a.device));
        let (loss, acc) = aux.loss(&hidden, &text_aux::label_tensor(&texts, a.device));
        te_params.zero_grad();
        aux.params.zero_grad();
        loss.backward();
        te_opt.step(te_params);
        aux_opt.step(&aux.params);
        let lv = loss.double_value(&[]);
        losses.push(lv);
        if step + 100 >= a.te_pretrain_steps {
            acc_sum.iter_mut().zip(&acc).for_each(|(s, v)| *s += v);
            acc_n += 1.0;
        }
        let pos_acc = acc[3];
        prog.add(step, lv, &format!("object0 position acc {pos_acc:.2}"));
    }
    Ok((losses, prog.t0.elapsed().as_secs_f64(), acc_sum.iter().map(|s| s / acc_n.max(1.0)).collect()))
}

/// Exponential moving average of a parameter set (the weights that get shipped).
struct Ema {
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    fn new(p: &Params) -> Self {
        Self { shadow: p.tensors.iter().map(|(k, v)| (k.clone(), v.detach().copy())).collect() }
    }
    fn update(&mut self, p: &Params, decay: f64) {
        let _g = tch::no_grad_guard();
        for (k, v) in &p.tensors {
            let s = self.shadow.get_mut(k).unwrap();
            let _ = s.g_mul_scalar_(decay).g_add_(&(v.detach() * (1.0 - decay)));
        }
    }
    fn params(&self, device: Device) -> Params {
        Params { tensors: self.shadow.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect(), device }
    }
}

fn main() -> Result<()> {
    let a = parse_args()?;
    std::fs::create_dir_all(&a.work)?;
    if a.device == Device::Cpu {
        tch::set_num_threads(2);
    }
    let started = Instant::now();
    let held_out = held_out_captions();
    if a.polish_only {
        return polish(&a, &a.out, &held_out);
    }

    // 1. Tokenizer.
    let tok_dir = a.work.join("tokenizer");
    let vocab = bpe::write_shapes_tokenizer(&tok_dir)? as i64;
    let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
    println!("tokenizer: vocab {vocab}, model_max_length {}", tokenizer.max_length());

    // 2. VAE.
    tch::manual_seed(a.seed as i64);
    let vae_cfg_unscaled = configs::vae(&VAE_BLOCKS, 1, 16, 1.0);
    let (vae_params, vae, _) = frisket_trainer::vae(&vae_cfg_unscaled, a.device)?;
    println!("vae {:?}: {} parameters", VAE_BLOCKS, vae_params.count());
    let vae_ckpt = a.work.join("vae_fp32.safetensors");
    let vae_log = a.work.join("vae.json");
    let vae_resumed = vae_ckpt.exists() && vae_log.exists();
    let (vae_losses, vae_secs): (Vec<f64>, f64) = if vae_resumed {
        vae_params.load(&vae_ckpt)?;
        let j = read_json(&vae_log)?;
        println!("vae: resumed from {}", vae_ckpt.display());
        (serde_json::from_value(j["losses"].clone())?, j["secs"].as_f64().unwrap_or(0.0))
    } else {
        let (l, s) = train_vae(&a, &vae_params, &vae, &held_out)?;
        vae_params.save(&vae_ckpt, Kind::Float)?;
        std::fs::write(&vae_log, json!({"losses": l, "secs": s}).to_string())?;
        (l, s)
    };
    for t in vae_params.tensors.values() {
        let _ = t.shallow_clone().set_requires_grad(false);
    }
    // Latent statistics → scaling_factor (1/std of the posterior mean), as SD did.
    let scaling_factor = tch::no_grad(|| {
        let spec = BatchSpec {
            run_seed: a.seed ^ 0x5ca1e,
            step: 0,
            size: 128,
            single_object: false,
            held_out: &held_out,
            focus: &[],
        };
        let (x, _) = data::batch(&spec);
        1.0 / vae.encode(&x.to_device(a.device)).mean.std(true).double_value(&[])
    });
    println!("vae: scaling_factor {scaling_factor:.4}");

    // 3. Text encoder pre-training.
    tch::manual_seed(a.seed as i64 + 1);
    let unet_cfg = configs::unet(&UNET_BLOCKS, 1, a.heads, TEXT_WIDTH, 32, 16);
    let te_cfg = configs::text_encoder(vocab, TEXT_WIDTH, TEXT_LAYERS, 4, tokenizer.max_length() as i64);
    let (unet_params, unet, _) = frisket_trainer::unet(&unet_cfg, a.device)?;
    let (te_params, te, _) = frisket_trainer::text_encoder(&te_cfg, a.device)?;
    let aux = CaptionClassifier::new(TEXT_WIDTH, a.device);
    println!(
        "unet {:?}: {} parameters; text encoder: {} parameters",
        UNET_BLOCKS,
        unet_params.count(),
        te_params.count()
    );
    let te_pre = a.work.join("te_pretrained.safetensors");
    let te_pre_log = a.work.join("te_pretrain.json");
    let te_resumed = te_pre.exists() && te_pre_log.exists();
    let (te_losses, te_secs, te_acc): (Vec<f64>, f64, Vec<f64>) = if te_resumed {
        te_params.load(&te_pre)?;
        aux.params.load(&a.work.join("aux_pretrained.safetensors"))?;
        let j = read_json(&te_pre_log)?;
        println!("text encoder: pre-training resumed from {}", te_pre.display());
        (
            serde_json::from_value(j["losses"].clone())?,
            j["secs"].as_f64().unwrap_or(0.0),
            serde_json::from_value(j["accuracy"].clone())?,
        )
    } else {
        let (l, s, acc) = pretrain_text_encoder(&a, &te, &te_params, &aux, &tokenizer, &held_out)?;
        te_params.save(&te_pre, Kind::Float)?;
        aux.params.save(&a.work.join("aux_pretrained.safetensors"), Kind::Float)?;
        std::fs::write(&te_pre_log, json!({"losses": l, "secs": s, "accuracy": acc}).to_string())?;
        (l, s, acc)
    };
    let te_accuracy: BTreeMap<String, f64> =
        text_aux::questions().into_iter().map(|q| q.0).zip(te_acc.iter().copied()).collect();
    println!("text encoder: classifier accuracy over its last 100 steps {te_accuracy:?}");

    // 4. UNet + text encoder.
    tch::manual_seed(a.seed as i64 + 2);
    let alphas = alphas_cumprod(a.zero_snr, a.device);
    let peak = 5e-4;
    // Fresh optimisers, at the start and where grounding's weight rises (below).
    let fresh_optimizers = || {
        (
            AdamW::new(&unet_params, peak, 0.01),
            AdamW::new(&te_params, peak * a.te_lr_scale, 0.01),
            AdamW::new(&aux.params, peak, 0.0),
        )
    };
    let (mut unet_opt, mut te_opt, mut aux_opt) = fresh_optimizers();
    let mut unet_ema = Ema::new(&unet_params);
    let mut te_ema = Ema::new(&te_params);
    let ckpt = a.work.join("unet_ckpt");
    let mut start = 0;
    let mut unet_losses: Vec<f64> = Vec::new();
    let mut prior_secs = 0.0;
    // Steps at which this stage was resumed from a checkpoint (the card states them).
    let mut resumed_at: Vec<u64> = Vec::new();
    if ckpt.join("state.json").exists() {
        let st = read_json(&ckpt.join("state.json"))?;
        // A checkpoint trained under the other noise schedule would silently mix the two.
        if let Some(z) = st["zero_snr"].as_bool() {
            if z != a.zero_snr {
                bail!(
                    "{} was trained with --zero-snr {z}; resume with the same flag or use another --work",
                    ckpt.display()
                );
            }
        }
        // The head count changes no weight's shape, so a mismatch would load without error;
        // checkpoints without the field predate the flag and were trained with 8.
        let heads = st["heads"].as_i64().unwrap_or(8);
        if heads != a.heads {
            bail!(
                "{} was trained with --heads {heads}; resume with the same flag or use another --work",
                ckpt.display()
            );
        }
        start = st["step"].as_u64().unwrap_or(0);
        resumed_at = serde_json::from_value(st["resumed_at"].clone()).unwrap_or_default();
        resumed_at.push(start);
        unet_losses = serde_json::from_value(st["losses"].clone())?;
        prior_secs = st["secs"].as_f64().unwrap_or(0.0);
        unet_params.load(&ckpt.join("unet.safetensors"))?;
        te_params.load(&ckpt.join("te.safetensors"))?;
        unet_ema.params(a.device).load(&ckpt.join("unet_ema.safetensors"))?;
        te_ema.params(a.device).load(&ckpt.join("te_ema.safetensors"))?;
        aux.params.load(&ckpt.join("aux.safetensors"))?;
        tch::manual_seed((a.seed + 1 + start) as i64);
        println!("unet: resumed at step {start} (optimizer moments restart)");
    }
    let total_steps = a.unet_steps + a.focus_steps;
    let mut prog = Progress::new("unet", total_steps.saturating_sub(start));
    // Every cross-attention layer is grounded (grounding.rs).
    let ground_layers: Vec<usize> = if a.ground_weight > 0.0 || a.ground_early_weight > 0.0 {
        (0..unet.cross_attention_layer_count()).collect()
    } else {
        Vec::new()
    };
    let unet_t0 = Instant::now();
    // Deterministic per-step choices (caption dropout, batch kind) from the step number.
    let mix = |step: u64, i: u64| frisket_shapes::rng::Rng::new(a.seed ^ (step << 16) ^ i).unit();
    let mut encoded: Option<EncodedBatch> = None;
    for step in start..total_steps {
        // Where grounding's weight rises, and where the focus phase starts, the optimisers start
        // afresh and the noise generator is reseeded, exactly as a resume from that step's
        // checkpoint does, so one process and a resumed run train the same weights. The restart
        // where grounding's weight rises is kept as part of the recipe: a run without it,
        // otherwise identical, did not learn position (docs/shapes-model-journal.md).
        let focusing = step >= a.unet_steps;
        let restart = if step == start {
            None
        } else if step == a.ground_from {
            Some(format!("grounding weight {} → {}", a.ground_early_weight, a.ground_weight))
        } else if step == a.unet_steps {
            Some(format!("focus phase on {:?}", a.focus_shapes))
        } else {
            None
        };
        if let Some(why) = restart {
            (unet_opt, te_opt, aux_opt) = fresh_optimizers();
            tch::manual_seed((a.seed + 1 + step) as i64);
            println!("unet: step {step}, {why}: optimizer moments restart");
        }
        let lr = match focusing {
            false => lr_at(step, a.unet_steps, peak, 200),
            true => lr_at(step - a.unet_steps, a.focus_steps, a.focus_lr, 100),
        };
        unet_opt.lr = lr;
        te_opt.lr = lr * a.te_lr_scale;
        aux_opt.lr = lr;
        if step % 2 == 0 || encoded.is_none() {
            let focus: &[Shape] = if focusing { &a.focus_shapes } else { &[] };
            encoded = Some(encode_batch(&a, &vae, step / 2, &held_out, focus));
        }
        let (post, owners, caps) = encoded.as_ref().unwrap();
        let latents = tch::no_grad(|| post.sample_with(&post.mean.randn_like()) * scaling_factor);
        let texts: Vec<&str> = caps.iter().enumerate().map(|(i, c)| caption_variant(mix(step, i as u64), c)).collect();
        let ehs = te.forward(&token_ids(&tokenizer, &texts, a.device));
        let ground_weight = if step < a.ground_from { a.ground_early_weight } else { a.ground_weight };
        let targets = (ground_weight > 0.0).then(|| grounding::targets(&texts, owners, &tokenizer, a.device));
        let (diffusion_loss, ground_loss) =
            denoising_losses(&unet, &alphas, &latents, &ehs, &ground_layers, targets.as_ref(), None);
        // Keeps every attribute readable from the encoder's output (text_aux.rs).
        let (aux_loss, aux_acc) = aux.loss(&ehs, &text_aux::label_tensor(&texts, a.device));
        let loss = &diffusion_loss + &aux_loss * a.aux_weight + &ground_loss * ground_weight;
        unet_params.zero_grad();
        te_params.zero_grad();
        aux.params.zero_grad();
        loss.backward();
        unet_opt.step(&unet_params);
        te_opt.step(&te_params);
        aux_opt.step(&aux.params);
        let decay = if focusing { a.focus_ema } else { 0.999f64.min((1.0 + step as f64) / (10.0 + step as f64)) };
        unet_ema.update(&unet_params, decay);
        te_ema.update(&te_params, decay);
        let lv = diffusion_loss.double_value(&[]);
        unet_losses.push(lv);
        prog.add(
            step - start,
            lv,
            &format!(
                "lr {lr:.2e} aux {:.3} position acc {:.2} ground {:.3}",
                aux_loss.double_value(&[]),
                aux_acc[3],
                ground_loss.double_value(&[])
            ),
        );
        if (step + 1) % 500 == 0 || step + 1 == a.unet_steps || step + 1 == total_steps {
            std::fs::create_dir_all(&ckpt)?;
            unet_params.save(&ckpt.join("unet.safetensors"), Kind::Float)?;
            te_params.save(&ckpt.join("te.safetensors"), Kind::Float)?;
            unet_ema.params(a.device).save(&ckpt.join("unet_ema.safetensors"), Kind::Float)?;
            te_ema.params(a.device).save(&ckpt.join("te_ema.safetensors"), Kind::Float)?;
            aux.params.save(&ckpt.join("aux.safetensors"), Kind::Float)?;
            let secs = prior_secs + unet_t0.elapsed().as_secs_f64();
            std::fs::write(ckpt.join("state.json"), json!({"step": step + 1, "losses": unet_losses, "secs": secs, "zero_snr": a.zero_snr, "heads": a.heads, "resumed_at": resumed_at}).to_string())?;
        }
    }
    let unet_secs = prior_secs + unet_t0.elapsed().as_secs_f64();

    // 5. Export (EMA weights, fp16).
    let out = &a.out;
    let vae_cfg = configs::vae(&VAE_BLOCKS, 1, 16, scaling_factor);
    write_component(out, "vae", &vae_cfg, &vae_params, "diffusion_pytorch_model.safetensors")?;
    write_component(out, "unet", &unet_cfg, &unet_ema.params(a.device), "diffusion_pytorch_model.safetensors")?;
    write_component(out, "text_encoder", &te_cfg, &te_ema.params(a.device), "model.safetensors")?;
    let tok_out = out.join("tokenizer");
    std::fs::create_dir_all(&tok_out)?;
    for f in std::fs::read_dir(&tok_dir)? {
        let f = f?;
        std::fs::copy(f.path(), tok_out.join(f.file_name()))?;
    }
    std::fs::create_dir_all(out.join("scheduler"))?;
    std::fs::write(
        out.join("scheduler/scheduler_config.json"),
        serde_json::to_string_pretty(&configs::scheduler(a.zero_snr))?,
    )?;
    std::fs::write(out.join("model_index.json"), serde_json::to_string_pretty(&configs::model_index())?)?;
    // The engine loads it back (the eval renders through the server's pipeline).
    frisket_trainer::engine::model::StableDiffusion::load(out, Device::Cpu)
        .with_context(|| format!("the engine cannot load {}", out.display()))?;

    let mut csv = std::fs::File::create(out.join("loss.csv"))?;
    writeln!(csv, "stage,step,loss")?;
    for (i, l) in vae_losses.iter().enumerate() {
        writeln!(csv, "vae,{i},{l:.5}")?;
    }
    for (i, l) in te_losses.iter().enumerate() {
        writeln!(csv, "text,{i},{l:.5}")?;
    }
    for (i, l) in unet_losses.iter().enumerate() {
        writeln!(csv, "unet,{i},{l:.5}")?;
    }
    plot_losses(out, &vae_losses, &te_losses, &unet_losses)?;
    let hardware = hardware(a.device);
    let stage_secs_this_process =
        [(!vae_resumed).then_some(vae_secs), (!te_resumed).then_some(te_secs), Some(unet_secs - prior_secs)];
    let overhead_secs =
        (started.elapsed().as_secs_f64() - stage_secs_this_process.iter().flatten().sum::<f64>()).max(0.0);
    let training = json!({
        "seed": a.seed,
        "hardware": hardware,
        "vae": {"blocks": VAE_BLOCKS, "steps": a.vae_steps, "batch": a.vae_batch, "lr": 5e-4, "object_weight": OBJECT_WEIGHT, "secs": vae_secs,
                "params": vae_params.count(), "final_loss_avg200": tail(&vae_losses), "scaling_factor": scaling_factor},
        "unet": {"blocks": UNET_BLOCKS, "steps": a.unet_steps, "batch": a.batch, "lr": peak, "secs": unet_secs,
                 "params": unet_params.count(), "heads": a.heads, "ema": 0.999, "prediction_type": "v_prediction", "zero_terminal_snr": a.zero_snr, "x0_weight": format!("min(SNR + 1, {V_WEIGHT_CAP})"), "ground_weight": a.ground_weight, "ground_early_weight": a.ground_early_weight, "ground_from_step": a.ground_from, "resumed_at_steps": resumed_at,
                 "focus": {"steps": a.focus_steps, "lr": a.focus_lr, "shapes": a.focus_shapes.iter().map(|s| s.name()).collect::<Vec<_>>(), "share_of_single_object_scenes": 1.0 / data::FOCUS_ONE_IN as f64, "ema": a.focus_ema},
                 "single_object_batches": "2/3", "batch_reused_for_steps": 2, "empty_caption": 0.1, "subject_only_caption": 0.2,
                 "final_loss_avg200": tail(&unet_losses)},
        "text_encoder": {"width": TEXT_WIDTH, "layers": TEXT_LAYERS, "params": te_params.count(), "vocab": vocab,
                         "pretrain_steps": a.te_pretrain_steps, "pretrain_batch": 64, "pretrain_secs": te_secs, "pretrain_accuracy": te_accuracy,
                         "lr_scale_during_unet": a.te_lr_scale, "aux_weight_during_unet": a.aux_weight},
        "held_out_prompts": HELD_OUT_SCENES,
        "generator_hash_seed0": format!("{:016x}", frisket_shapes::generate_default(0).hash()),
        // Stages resumed from --work count with the time they took when they ran.
        "total_secs": vae_secs + te_secs + unet_secs + overhead_secs,
    });
    std::fs::write(out.join("training.json"), serde_json::to_string_pretty(&training)?)?;
    println!("wrote {} in {:.1} min", out.display(), started.elapsed().as_secs_f64() / 60.0);
    if a.polish_steps > 0 {
        polish(&a, out, &held_out)?;
    }
    Ok(())
}

/// The UNet panel shows the polish stage's steps after the UNet stage's.
fn plot_losses(out: &Path, vae: &[f64], te: &[f64], unet: &[f64]) -> Result<()> {
    plot::loss_curves(
        &out.join("loss.png"),
        &[("VAE", vae), ("text encoder (classifier)", te), ("UNet + text encoder", unet)],
    )
}

/// Stage 6 (see Args::polish_steps). Reads everything from the exported folder `out`, so a
/// polish of a shipped export and one inside a from-scratch run start from the same fp16
/// weights and make the same files.
fn polish(a: &Args, out: &Path, held_out: &HashSet<String>) -> Result<()> {
    let started = Instant::now();
    let mut training = read_json(&out.join("training.json"))?;
    if !training["polish"].is_null() {
        bail!("{} is already polished (training.json has a polish entry); export again first", out.display());
    }
    let u = &training["unet"];
    let zero_snr = u["zero_terminal_snr"].as_bool().context("training.json: unet.zero_terminal_snr")?;
    // Scenes continue where the UNet stage's left off: new scenes, same generator.
    let prior_steps = u["steps"].as_u64().unwrap_or(0) + u["focus"]["steps"].as_u64().unwrap_or(0);
    let tokenizer = ClipTokenizer::from_dir(&out.join("tokenizer"))?;
    let vae_cfg = read_json(&out.join("vae/config.json"))?;
    let scaling_factor = vae_cfg["scaling_factor"].as_f64().context("vae/config.json: scaling_factor")?;
    let (vae_params, vae, _) = frisket_trainer::vae(&vae_cfg, a.device)?;
    vae_params.load(&out.join("vae/diffusion_pytorch_model.safetensors"))?;
    let unet_cfg = read_json(&out.join("unet/config.json"))?;
    let (unet_params, unet, _) = frisket_trainer::unet(&unet_cfg, a.device)?;
    unet_params.load(&out.join("unet/diffusion_pytorch_model.safetensors"))?;
    let (te_params, te, _) =
        frisket_trainer::text_encoder(&read_json(&out.join("text_encoder/config.json"))?, a.device)?;
    te_params.load(&out.join("text_encoder/model.safetensors"))?;
    for t in vae_params.tensors.values().chain(te_params.tensors.values()) {
        let _ = t.shallow_clone().set_requires_grad(false);
    }
    let alphas = alphas_cumprod(zero_snr, a.device);
    let ground_layers: Vec<usize> =
        if a.ground_weight > 0.0 { (0..unet.cross_attention_layer_count()).collect() } else { Vec::new() };
    tch::manual_seed(a.seed as i64 + 3);
    let mut opt = AdamW::new(&unet_params, a.polish_lr, 0.01);
    let mut ema = Ema::new(&unet_params);
    let mix = |step: u64, i: u64| frisket_shapes::rng::Rng::new(a.seed ^ (step << 16) ^ i).unit();
    let mut prog = Progress::new("polish", a.polish_steps);
    let mut losses = Vec::new();
    let mut encoded: Option<EncodedBatch> = None;
    println!("polish: {} steps from the export in {} (text encoder frozen)", a.polish_steps, out.display());
    for step in 0..a.polish_steps {
        let global = prior_steps + step;
        opt.lr = lr_at(step, a.polish_steps, a.polish_lr, 100);
        if step % 2 == 0 || encoded.is_none() {
            encoded = Some(encode_batch(a, &vae, global / 2, held_out, &a.focus_shapes));
        }
        let (post, owners, caps) = encoded.as_ref().unwrap();
        let latents = tch::no_grad(|| post.sample_with(&post.mean.randn_like()) * scaling_factor);
        let texts: Vec<&str> =
            caps.iter().enumerate().map(|(i, c)| caption_variant(mix(global, i as u64), c)).collect();
        let ehs = tch::no_grad(|| te.forward(&token_ids(&tokenizer, &texts, a.device)));
        let targets = (a.ground_weight > 0.0).then(|| grounding::targets(&texts, owners, &tokenizer, a.device));
        let cell_weights =
            (a.polish_object_weight > 0.0).then(|| object_cell_weights(owners, &latents, a.polish_object_weight));
        let (diffusion_loss, ground_loss) =
            denoising_losses(&unet, &alphas, &latents, &ehs, &ground_layers, targets.as_ref(), cell_weights.as_ref());
        let loss = &diffusion_loss + &ground_loss * a.ground_weight;
        unet_params.zero_grad();
        loss.backward();
        opt.step(&unet_params);
        ema.update(&unet_params, a.focus_ema);
        let lv = diffusion_loss.double_value(&[]);
        losses.push(lv);
        prog.add(step, lv, &format!("lr {:.2e} ground {:.3}", opt.lr, ground_loss.double_value(&[])));
    }
    let secs = prog.t0.elapsed().as_secs_f64();
    write_component(out, "unet", &unet_cfg, &ema.params(a.device), "diffusion_pytorch_model.safetensors")?;
    frisket_trainer::engine::model::StableDiffusion::load(out, Device::Cpu)
        .with_context(|| format!("the engine cannot load {}", out.display()))?;

    // Loss log and curves: the earlier stages' values are read back from loss.csv.
    let csv = std::fs::read_to_string(out.join("loss.csv"))?;
    let mut by_stage: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in csv.lines().skip(1) {
        let mut f = line.split(',');
        if let (Some(stage), Some(_), Some(v)) = (f.next(), f.next(), f.next()) {
            by_stage.entry(stage.to_string()).or_default().push(v.parse()?);
        }
    }
    let mut file = std::fs::OpenOptions::new().append(true).open(out.join("loss.csv"))?;
    for (i, l) in losses.iter().enumerate() {
        writeln!(file, "polish,{i},{l:.5}")?;
    }
    let unet_then_polish: Vec<f64> =
        by_stage.get("unet").cloned().unwrap_or_default().into_iter().chain(losses.iter().copied()).collect();
    plot_losses(
        out,
        by_stage.get("vae").map_or(&[], |v| v),
        by_stage.get("text").map_or(&[], |v| v),
        &unet_then_polish,
    )?;

    let hardware = hardware(a.device);
    let total = training["total_secs"].as_f64().unwrap_or(0.0) + started.elapsed().as_secs_f64();
    training["polish"] = json!({"steps": a.polish_steps, "batch": a.batch, "lr": a.polish_lr, "ema": a.focus_ema, "seed": a.seed as i64 + 3,
        "shapes": a.focus_shapes.iter().map(|s| s.name()).collect::<Vec<_>>(), "ground_weight": a.ground_weight,
        "text_encoder": "frozen", "object_weight": a.polish_object_weight, "secs": secs, "hardware": hardware, "final_loss_avg200": tail(&losses)});
    training["total_secs"] = json!(total);
    std::fs::write(out.join("training.json"), serde_json::to_string_pretty(&training)?)?;
    println!("polish: wrote {} in {:.1} min", out.display(), started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// ᾱ_t for t = 0..1000, as the trainer's noising reads it.
fn alphas_cumprod(zero_snr: bool, device: Device) -> Tensor {
    let alphas: Vec<f32> = configs::alphas_cumprod(zero_snr).iter().map(|&v| v as f32).collect();
    Tensor::from_slice(&alphas).to_device(device)
}

/// What training.json and the card record as the hardware.
fn hardware(device: Device) -> String {
    match device {
        Device::Cpu => format!("{}, {} threads", frisket_trainer::cpu_name(), tch::get_num_threads()),
        _ => "CUDA device 0".to_string(),
    }
}

/// The mean of the last 200 losses (training.json's final_loss_avg200).
fn tail(losses: &[f64]) -> f64 {
    losses.iter().rev().take(200).sum::<f64>() / losses.len().clamp(1, 200) as f64
}

fn write_component(out: &Path, dir: &str, cfg: &serde_json::Value, p: &Params, file: &str) -> Result<()> {
    let d = out.join(dir);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    p.save(&d.join(file), Kind::Half)
}
