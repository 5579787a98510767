//! tune_probe --model MODEL_DIR: inference settings and heatmap policies are chosen on a tuning
//! set, never on eval_tiny's held-out prompts.
//! A research tool for the recipe and the inference defaults (docs/shapes-model-journal.md),
//! not part of the product.
//! The tuning set is single-object scenes from `--seed-base` (default 100_000; eval_tiny uses
//! seeds 0..200 and 700_000..700_200).
//! Prints the judge's colour / shape / position rates (and shape per shape) for one setting;
//! with `--dump FILE` it also writes, for every render with the right colour and shape, the
//! fast Grad-SAM maps of the shape word at steps nearest t ∈ TIMESTEPS for each
//! cross-attention layer alone ([T, L, C, h, w]) and the judge's mask of that object, so that
//! threshold policies can be compared offline (research/heat_sweep.py); `--dump-layers last`
//! keeps only the last layer (L = 1), for `heat_sweep.py --last-layer`.
//! `--strength S` (< 1) starts each render from its true scene (SDEdit), which says at which
//! noise level a shape is lost; `--protect true` runs eval_tiny's protect task instead, on
//! tuning cases from seed 800_000, at `--strength` (eval_tiny uses 0.9); with `--explain
//! fast|exact` it adds `make run`'s Grad-SAM latent manipulation on the wanted shape's word
//! (`--explain-subject auto`: the prompt's content words).
//!   cargo run -p frisket-trainer --example tune_probe -- --model models/shapes --guidance 5
use anyhow::{Context, Result};
use frisket_shapes::{check_object, generate, judge, parse_prompt, GenConfig, ObjectQuery};
use frisket_trainer::engine::explain::{self, ExplainMode, ExplainParams, SubjectSpec};
use frisket_trainer::engine::image_io::tensor_to_rgb;
use frisket_trainer::engine::model::StableDiffusion;
use frisket_trainer::engine::pipeline::{self, Flow, GenerateParams};
use frisket_trainer::engine::schedulers::SchedulerKind;
use frisket_trainer::flags::Flags;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

const TIMESTEPS: [f64; 6] = [900.0, 700.0, 500.0, 300.0, 100.0, 50.0];

fn main() -> Result<()> {
    let known = [
        "model",
        "n",
        "seed-base",
        "guidance",
        "steps",
        "scheduler",
        "dump",
        "dump-layers",
        "vae-only",
        "strength",
        "protect",
        "explain",
        "explain-subject",
    ];
    let f = Flags::from_env(&known, "the doc comment of trainer/research/tune_probe.rs")?;
    let model_dir: std::path::PathBuf = f.get("model", "models/shapes".into())?;
    let n: u64 = f.get("n", 120)?;
    let seed_base: u64 = f.get("seed-base", 100_000)?;
    let (scheduler, karras) = SchedulerKind::parse_with_karras(&f.get::<String>("scheduler", "ddim".into())?)?;
    let dump: String = f.get("dump", String::new())?;
    // `--dump-layers last`: only the last layer's maps ([T, 1, C, h, w]), the layer where fast
    // Grad-SAM is exact; about six times cheaper than all layers.
    let dump_last_only = match f.get::<String>("dump-layers", "all".into())?.as_str() {
        "all" => false,
        "last" => true,
        other => anyhow::bail!("--dump-layers: all or last, got {other:?}"),
    };
    tch::set_num_threads(2);
    let model = StableDiffusion::load(&model_dir, Device::Cpu)?;
    let base = GenerateParams {
        steps: f.get("steps", 20)?,
        guidance: f.get("guidance", 5.0)?,
        scheduler,
        karras,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let layers = model.unet.cross_attention_layer_count();
    let first_dumped_layer = if dump_last_only { layers - 1 } else { 0 };
    let cfg = GenConfig::default().with_objects(1);
    if f.get("vae-only", false)? {
        // The decoder's ceiling per shape: the judge on VAE round trips of the true scenes.
        let mut per_shape: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for i in 0..n {
            let scene = generate(seed_base + i, &cfg).map_err(anyhow::Error::msg)?;
            let q = parse_prompt(&scene.meta.caption).map_err(anyhow::Error::msg)?.objects[0];
            let x = frisket_trainer::data::image_tensor(&scene).unsqueeze(0).to_kind(model.kind);
            let y = tch::no_grad(|| model.vae.decode(&model.vae.encode(&x).mean));
            let c = check_object(&judge(&tensor_to_rgb(&(y.squeeze_dim(0).to_kind(Kind::Float) / 2.0 + 0.5))?), &q);
            let e = per_shape.entry(q.shape.name()).or_default();
            e.0 += c.shape_right as u64;
            e.1 += 1;
        }
        println!(
            "[tune] VAE round trip, shape right per shape: {}",
            per_shape.iter().map(|(k, (h, t))| format!("{k} {h}/{t}")).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    let strength: f64 = f.get("strength", 1.0)?;
    if f.get("protect", false)? {
        // eval_tiny's protect task on its own tuning cases (seeds 800_000..): does the
        // requested object appear, at this --strength?
        let (mut appears, mut at_position) = (0u64, 0u64);
        let mut per_shape: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for i in 0..n {
            let case = frisket_trainer::data::protect_case(800_000 + i)?;
            let mut p = frisket_trainer::data::protect_params(&case, &base, i, strength);
            p.explain = explain_params(&f, &case)?;
            let out = model.generate(model.prepare(&p)?, &mut |_| Flow::Continue)?;
            let c = check_object(&judge(&tensor_to_rgb(&out.image)?), &ObjectQuery::from_info(&case.wanted));
            appears += (c.colour_right && c.shape_right) as u64;
            at_position += c.all_right() as u64;
            let e = per_shape.entry(case.wanted.shape.name()).or_default();
            e.0 += (c.colour_right && c.shape_right) as u64;
            e.1 += 1;
        }
        println!(
            "[tune] protect, {n} cases, strength {strength}: appears {:.1} % (at its position {:.1} %)",
            100.0 * appears as f64 / n as f64,
            100.0 * at_position as f64 / n as f64
        );
        println!(
            "[tune] appears per shape: {}",
            per_shape.iter().map(|(k, (h, t))| format!("{k} {h}/{t}")).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    let (mut colour, mut shape, mut position) = (0u64, 0u64, 0u64);
    let mut per_shape: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut dumped: Vec<(String, Tensor)> = Vec::new();
    for i in 0..n {
        let scene = generate(seed_base + i, &cfg).map_err(anyhow::Error::msg)?;
        let prompt = scene.meta.caption.clone();
        let q = parse_prompt(&prompt).map_err(anyhow::Error::msg)?.objects[0];
        let mut p = GenerateParams { prompt: prompt.clone(), seed: seed_base + i, ..base.clone() };
        // --strength S < 1: SDEdit from the true scene, so the rate says at which noise level
        // the model loses (or keeps) a shape it is shown.
        if strength < 1.0 {
            p.reference = Some(frisket_trainer::data::image_tensor(&scene).unsqueeze(0).to_kind(model.kind));
            p.strength = strength;
        }
        let mut kept: Vec<(Tensor, usize, f64)> = Vec::new();
        let out = model.generate(model.prepare(&p)?, &mut |e| {
            if !dump.is_empty() {
                kept.push((e.latents_in.copy(), e.index, e.timestep));
            }
            Flow::Continue
        })?;
        let image = tensor_to_rgb(&out.image)?;
        let j = judge(&image);
        let c = check_object(&j, &q);
        colour += c.colour_right as u64;
        shape += c.shape_right as u64;
        position += c.position_right.unwrap_or(false) as u64;
        let e = per_shape.entry(q.shape.name()).or_default();
        e.0 += c.shape_right as u64;
        e.1 += 1;
        if let (false, true, true, Some(found)) = (dump.is_empty(), c.colour_right, c.shape_right, c.found) {
            let subject = model
                .tokenizer
                .tokens(&prompt)
                .into_iter()
                .find(|t| t.word.as_deref() == Some(q.shape.name()))
                .map(|t| t.position)
                .context("shape word not in the prompt")?;
            let (scheduler, _) = pipeline::schedule(&model.scheduler_config, p.scheduler, p.karras, p.steps, None)?;
            let cond = model.text_context(&prompt, None, &p.size_conditioning());
            let mut per_t = Vec::new();
            for target in TIMESTEPS {
                let (lat, step, t) = kept
                    .iter()
                    .min_by(|a, b| (a.2 - target).abs().total_cmp(&(b.2 - target).abs()))
                    .context("no step ran")?;
                let per_layer: Vec<Tensor> = (first_dumped_layer..layers)
                    .map(|l| {
                        explain::attribute(
                            &model,
                            &*scheduler,
                            lat,
                            *step,
                            *t,
                            &cond,
                            &[l],
                            &[subject],
                            ExplainMode::Fast,
                            None,
                        )
                    })
                    .collect::<Result<_>>()?;
                per_t.push(Tensor::cat(&per_layer, 0)); // [L, C, h, w]
            }
            let truth = Tensor::from_slice(&j.objects[found].mask.to_gray().into_raw()).view([64, 64]);
            dumped.push((format!("maps_{i}"), Tensor::stack(&per_t, 0).to_kind(Kind::Float)));
            dumped.push((format!("truth_{i}"), truth));
        }
    }
    let pct = |k: u64| 100.0 * k as f64 / n as f64;
    println!(
        "[tune] {} prompts from seed {seed_base}, guidance {} {} steps {}: colour {:.1} % shape {:.1} % position {:.1} %",
        n, base.guidance, base.steps, f.get::<String>("scheduler", "ddim".into())?, pct(colour), pct(shape), pct(position)
    );
    println!(
        "[tune] shape right per shape: {}",
        per_shape.iter().map(|(k, (h, t))| format!("{k} {h}/{t}")).collect::<Vec<_>>().join(", ")
    );
    if !dump.is_empty() {
        let named: Vec<(&str, &Tensor)> = dumped.iter().map(|(k, t)| (k.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &dump)?;
        println!("[tune] wrote {} heat-map sets to {dump}", dumped.len() / 2);
    }
    Ok(())
}

/// `--explain none|fast|exact` (protect task only): Grad-SAM latent manipulation as `make run`
/// asks for it, on `--explain-subject shape` (the wanted shape's word, as the demo's
/// `--subject`) or `auto` (the prompt's content words).
fn explain_params(f: &Flags, case: &frisket_trainer::data::ProtectCase) -> Result<Option<ExplainParams>> {
    let mode = match f.get::<String>("explain", "none".into())?.as_str() {
        "none" => return Ok(None),
        "fast" => ExplainMode::Fast,
        "exact" => ExplainMode::Exact,
        other => anyhow::bail!("--explain: none, fast or exact, got {other:?}"),
    };
    let subjects = match f.get::<String>("explain-subject", "shape".into())?.as_str() {
        "shape" => vec![SubjectSpec::Word(case.wanted.shape.name().to_string())],
        "auto" => Vec::new(),
        other => anyhow::bail!("--explain-subject: shape or auto, got {other:?}"),
    };
    Ok(Some(ExplainParams { mode, subjects, ..Default::default() }))
}
