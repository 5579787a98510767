//! eval_tiny: scores a shapes model with the judge, through the server's own pipeline, and
//! writes eval-LABEL.json, samples.png and protect_samples.png into the model folder
//! (model_card turns them into the card).
//!
//!   eval_tiny [--model models/shapes] [--n 200] [--exact-n 200] [--guidance 5] [--steps 20]
//!             [--strength 0.9] [--run-label first] [--ceilings-only false]
//!
//! What is measured:
//!  * single-object prompts: the captions of the held-out scenes (seeds 0..n, never trained
//!    on), txt2img 64×64 with DDIM; the judge's colour / shape / position verdicts;
//!  * protect: a one-object reference scene with that object protected, and a prompt for a
//!    second object (other colour, other cell, chosen by the generator so the scene is valid);
//!    protected pixels bit-exact, and whether the judge finds the requested object;
//!  * heatmap truth: Grad-SAM of the shape word against the judge's mask of that object in
//!    the rendered image; mIoU over the renders where the judge found it. The headline mask
//!    is `mask::pixel_masks` (bicubic to pixels, ≥ 0.15 × the maximum) of the last
//!    cross-attention layer at the step nearest t = 100; that policy was chosen on a
//!    separate tuning set (trainer/research/: tune_probe + heat_sweep.py, seeds 100_000..),
//!    never on these prompts. Also reported, for comparison: the engine's manipulation mask
//!    and DAAM's τ = 0.4, last layer, t = 500.
use anyhow::{Context, Result};
use frisket_shapes::{check_object, judge, parse_prompt, Mask, ObjectQuery};
use frisket_trainer::data;
use frisket_trainer::engine::explain::{self, mask, ExplainMode, MaskParams};
use frisket_trainer::engine::image_io::tensor_to_rgb;
use frisket_trainer::engine::model::StableDiffusion;
use frisket_trainer::engine::pipeline::{self, Flow, GenerateParams};
use frisket_trainer::flags::Flags;
use image::RgbImage;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

struct Args {
    model: PathBuf,
    n: u64,
    exact_n: u64,
    guidance: f64,
    steps: usize,
    strength: f64,
    label: String,
    /// Stop after the judge/VAE ceilings (a quick check of a new VAE).
    ceilings_only: bool,
}

fn parse_args() -> Result<Args> {
    let known = ["model", "n", "exact-n", "guidance", "steps", "strength", "run-label", "ceilings-only"];
    let f = Flags::from_env(&known, "the doc comment of trainer/src/bin/eval_tiny.rs")?;
    Ok(Args {
        model: f.get("model", "models/shapes".into())?,
        n: f.get("n", 200)?,
        exact_n: f.get("exact-n", 200)?,
        guidance: f.get("guidance", 5.0)?,
        steps: f.get("steps", 20)?,
        strength: f.get("strength", 0.9)?,
        label: f.get("run-label", "first".into())?,
        ceilings_only: f.get("ceilings-only", false)?,
    })
}

/// Token position of `word` in `prompt` (its first token).
fn word_position(model: &StableDiffusion, prompt: &str, word: &str) -> Option<usize> {
    model.tokenizer.tokens(prompt).into_iter().find(|t| t.word.as_deref() == Some(word)).map(|t| t.position)
}

/// Grad-SAM pixel masks (64×64) of one subject word, from the latent entering `step`: the
/// engine's own manipulation mask (blur, dilation, threshold mean + K·std over the latent,
/// any channel; upsampled nearest) and DAAM's convention (channel sum, normalised by its
/// maximum, bilinear upsampling, threshold τ = 0.4, fixed in advance, not tuned here).
fn heatmap_masks(
    model: &StableDiffusion,
    p: &GenerateParams,
    latents_in: &Tensor,
    step: usize,
    timestep: f64,
    subject: usize,
    mode: ExplainMode,
) -> Result<(Mask, Mask)> {
    let (scheduler, _) = pipeline::schedule(&model.scheduler_config, p.scheduler, p.karras, p.steps, None)?;
    let cond = model.text_context(&p.prompt, None, &p.size_conditioning());
    let last = model.unet.cross_attention_layer_count() - 1;
    let maps =
        explain::attribute(model, &*scheduler, latents_in, step, timestep, &cond, &[last], &[subject], mode, None)?;
    let to_mask = |t: Tensor| -> Result<Mask> {
        let values: Vec<f32> = Vec::try_from(t.flatten(0, -1))?;
        Ok(Mask::from_threshold(p.width as u32, p.height as u32, &values, 0.5))
    };
    let size = [p.height, p.width];
    let engine = mask::subject_masks(&maps, &MaskParams::default()).any_dim(1, false).to_kind(Kind::Float); // [1, h, w]
    let engine = to_mask(engine.unsqueeze(0).upsample_nearest2d(size, None, None).squeeze())?;
    let summed = maps.sum_dim_intlist([1i64].as_slice(), true, Kind::Float).relu(); // [1, 1, h, w]
    let norm = &summed / summed.max().clamp_min(1e-12);
    let daam = norm.upsample_bilinear2d(size, false, None, None).squeeze().ge(0.4).to_kind(Kind::Float);
    Ok((engine, to_mask(daam)?))
}

/// The headline pixel mask (`mask::pixel_masks`): the last cross-attention layer (the
/// paper's, and the one where fast Grad-SAM is exact, so one policy serves both modes), the
/// step nearest t = 100, threshold τ × the maximum with the τ the server streams
/// (`mask::SUBJECT_MASK_TAU`). Chosen on the tuning set (trainer/research/heat_sweep.py).
const PIXEL_MASK_TIMESTEP: f64 = 100.0;

/// A latent entering a step: (latent, step index, timestep).
type StepLatent = (Tensor, usize, f64);

struct Render {
    image: RgbImage,
    secs: f64,
    /// The latents entering the steps nearest t = 500 and t = PIXEL_MASK_TIMESTEP.
    mid: StepLatent,
    late: StepLatent,
}

fn render(model: &StableDiffusion, p: &GenerateParams) -> Result<Render> {
    let t0 = Instant::now();
    let (mut mid, mut late): (Option<StepLatent>, Option<StepLatent>) = (None, None);
    let (mut best_mid, mut best_late) = (f64::INFINITY, f64::INFINITY);
    let out = model.generate(model.prepare(p)?, &mut |e| {
        if (e.timestep - 500.0).abs() < best_mid {
            best_mid = (e.timestep - 500.0).abs();
            mid = Some((e.latents_in.copy(), e.index, e.timestep));
        }
        if (e.timestep - PIXEL_MASK_TIMESTEP).abs() < best_late {
            best_late = (e.timestep - PIXEL_MASK_TIMESTEP).abs();
            late = Some((e.latents_in.copy(), e.index, e.timestep));
        }
        Flow::Continue
    })?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(Render {
        image: tensor_to_rgb(&out.image)?,
        secs,
        mid: mid.context("no step ran")?,
        late: late.context("no step ran")?,
    })
}

/// The headline heatmap mask: `mask::pixel_masks` of `layers` at the step `late` was taken
/// from.
fn pixel_mask(
    model: &StableDiffusion,
    p: &GenerateParams,
    late: &StepLatent,
    layers: &[usize],
    subject: usize,
    mode: ExplainMode,
) -> Result<Mask> {
    let (scheduler, _) = pipeline::schedule(&model.scheduler_config, p.scheduler, p.karras, p.steps, None)?;
    let cond = model.text_context(&p.prompt, None, &p.size_conditioning());
    let (lat, step, t) = late;
    let maps = explain::attribute(model, &*scheduler, lat, *step, *t, &cond, layers, &[subject], mode, None)?;
    let m = mask::pixel_masks(&maps, p.width, p.height, mask::SUBJECT_MASK_TAU).get(0).to_kind(Kind::Float);
    let values: Vec<f32> = Vec::try_from(m.flatten(0, -1))?;
    Ok(Mask::from_threshold(p.width as u32, p.height as u32, &values, 0.5))
}

#[derive(Default)]
struct Tally {
    n: u64,
    hits: u64,
}
impl Tally {
    fn add(&mut self, hit: bool) {
        self.n += 1;
        self.hits += hit as u64;
    }
    fn pct(&self) -> f64 {
        100.0 * self.hits as f64 / self.n.max(1) as f64
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn main() -> Result<()> {
    let a = parse_args()?;
    tch::set_num_threads(2);
    let t_all = Instant::now();
    let model = StableDiffusion::load(&a.model, Device::Cpu)?;
    let base = GenerateParams { steps: a.steps, guidance: a.guidance, width: 64, height: 64, ..Default::default() };

    // Ceilings: what the judge scores on the held-out scenes themselves, and on their VAE round
    // trips (no diffusion model can beat the decoder it paints through).
    let (mut truth_all, mut vae_shape, mut vae_position, mut vae_all) =
        (Tally::default(), Tally::default(), Tally::default(), Tally::default());
    for scene in data::eval_single_object_scenes(a.n) {
        let q = parse_prompt(&scene.meta.caption).map_err(anyhow::Error::msg)?.objects[0];
        truth_all.add(check_object(&judge(&scene.image), &q).all_right());
        let x = data::image_tensor(&scene).unsqueeze(0).to_kind(model.kind);
        let y = tch::no_grad(|| model.vae.decode(&model.vae.encode(&x).mean));
        let c = check_object(&judge(&tensor_to_rgb(&(y.squeeze_dim(0).to_kind(Kind::Float) / 2.0 + 0.5))?), &q);
        vae_shape.add(c.shape_right);
        vae_position.add(c.position_right.unwrap_or(false));
        vae_all.add(c.all_right());
    }
    println!(
        "[eval] ceilings: judge on the true scenes {:.1} % all right; on VAE round trips shape {:.1} % position {:.1} % all {:.1} %",
        truth_all.pct(), vae_shape.pct(), vae_position.pct(), vae_all.pct()
    );
    if a.ceilings_only {
        return Ok(());
    }

    // Single-object prompts + heatmaps.
    let (mut colour, mut shape, mut position, mut all) =
        (Tally::default(), Tally::default(), Tally::default(), Tally::default());
    let (mut iou_fast, mut iou_exact) = (Vec::new(), Vec::new());
    let (mut iou_fast_pixel, mut iou_exact_pixel) = (Vec::new(), Vec::new());
    let pixel_layers = [model.unet.cross_attention_layer_count() - 1];
    let (mut iou_fast_daam, mut iou_exact_daam) = (Vec::new(), Vec::new());
    let mut secs = Vec::new();
    let mut samples: Vec<RgbImage> = Vec::new();
    let mut rows = Vec::new();
    for (i, scene) in data::eval_single_object_scenes(a.n).iter().enumerate() {
        let prompt = scene.meta.caption.clone();
        let q = parse_prompt(&prompt).map_err(anyhow::Error::msg)?.objects[0];
        let p = GenerateParams { prompt: prompt.clone(), seed: i as u64, ..base.clone() };
        let r = render(&model, &p)?;
        secs.push(r.secs);
        let j = judge(&r.image);
        let c = check_object(&j, &q);
        colour.add(c.colour_right);
        shape.add(c.shape_right);
        position.add(c.position_right.unwrap_or(false));
        all.add(c.all_right());
        let mut row = json!({"prompt": prompt, "seed": i, "colour": c.colour_right, "shape": c.shape_right,
                             "position": c.position_right, "secs": r.secs});
        if let (true, true, Some(found)) = (c.colour_right, c.shape_right, c.found) {
            let truth = &j.objects[found].mask;
            let subject = word_position(&model, &prompt, q.shape.name()).context("shape word not in the prompt")?;
            let (lat, step, t) = &r.mid;
            let (engine, daam) = heatmap_masks(&model, &p, lat, *step, *t, subject, ExplainMode::Fast)?;
            let (fast, fast_daam) = (engine.iou(truth), daam.iou(truth));
            iou_fast.push(fast);
            iou_fast_daam.push(fast_daam);
            row["iou_fast"] = json!(fast);
            row["iou_fast_daam"] = json!(fast_daam);
            let fast_pixel = pixel_mask(&model, &p, &r.late, &pixel_layers, subject, ExplainMode::Fast)?.iou(truth);
            iou_fast_pixel.push(fast_pixel);
            row["iou_fast_pixel"] = json!(fast_pixel);
            if (i as u64) < a.exact_n {
                let (engine, daam) = heatmap_masks(&model, &p, lat, *step, *t, subject, ExplainMode::Exact)?;
                let (exact, exact_daam) = (engine.iou(truth), daam.iou(truth));
                iou_exact.push(exact);
                iou_exact_daam.push(exact_daam);
                row["iou_exact"] = json!(exact);
                row["iou_exact_daam"] = json!(exact_daam);
                let exact_pixel =
                    pixel_mask(&model, &p, &r.late, &pixel_layers, subject, ExplainMode::Exact)?.iou(truth);
                iou_exact_pixel.push(exact_pixel);
                row["iou_exact_pixel"] = json!(exact_pixel);
            }
        }
        if samples.len() < 32 {
            samples.push(r.image.clone());
        }
        rows.push(row);
        if (i + 1) % 20 == 0 {
            println!(
                "[eval] single {}/{}: colour {:.1} % shape {:.1} % position {:.1} %, mIoU fast {:.3} / {:.3} / {:.3} exact {:.3} / {:.3} / {:.3} (pixel mask / engine mask / DAAM τ 0.4), {:.2} s/render, {:.0} s",
                i + 1, a.n, colour.pct(), shape.pct(), position.pct(), mean(&iou_fast_pixel), mean(&iou_fast), mean(&iou_fast_daam),
                mean(&iou_exact_pixel), mean(&iou_exact), mean(&iou_exact_daam), mean(&secs),
                t_all.elapsed().as_secs_f64()
            );
        }
    }

    // Reference + protected region + subject prompt.
    let (mut appears, mut appears_at, mut exact_kept) = (Tally::default(), Tally::default(), Tally::default());
    let mut protect_rows = Vec::new();
    let mut protect_samples: Vec<RgbImage> = Vec::new();
    for i in 0..a.n {
        let case = data::protect_case(700_000 + i)?;
        let data::ProtectCase { reference, kept, wanted, prompt, .. } = &case;
        let q = ObjectQuery::from_info(wanted);
        let protect_mask = &reference.masks[0];
        let r = render(&model, &data::protect_params(&case, &base, i, a.strength))?;
        let kept_exact = (0..64u32).all(|y| {
            (0..64u32).all(|x| !protect_mask.get(x, y) || r.image.get_pixel(x, y) == reference.image.get_pixel(x, y))
        });
        exact_kept.add(kept_exact);
        let c = check_object(&judge(&r.image), &q);
        appears.add(c.colour_right && c.shape_right);
        appears_at.add(c.all_right());
        protect_rows.push(json!({"prompt": prompt, "kept": format!("{:?} {:?}", kept.colour, kept.shape), "protected_exact": kept_exact,
                                 "appears": c.colour_right && c.shape_right, "at_position": c.position_right}));
        if protect_samples.len() < 16 {
            protect_samples.push(reference.image.clone());
            protect_samples.push(r.image.clone());
        }
        if (i + 1) % 20 == 0 {
            println!(
                "[eval] protect {}/{}: protected bit-exact {:.1} %, requested object appears {:.1} % (at its position {:.1} %), {:.0} s",
                i + 1, a.n, exact_kept.pct(), appears.pct(), appears_at.pct(), t_all.elapsed().as_secs_f64()
            );
        }
    }

    // Render time at the card's yardstick: 64×64, 20 steps (CFG), one job on this CPU.
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median_secs = sorted[sorted.len() / 2];
    write_grid(&a.model.join("samples.png"), &samples, 8)?;
    write_grid(&a.model.join("protect_samples.png"), &protect_samples, 8)?;
    let result = json!({
        "label": a.label,
        "settings": {"n": a.n, "exact_n": a.exact_n, "guidance": a.guidance, "steps": a.steps, "scheduler": "DDIM",
                      "strength": a.strength, "size": 64, "heatmap_timestep": 500, "heatmap_layer": "last",
                      "pixel_mask_timestep": PIXEL_MASK_TIMESTEP, "pixel_mask_layers": pixel_layers, "pixel_mask_tau": mask::SUBJECT_MASK_TAU},
        "single": {"colour": colour.pct(), "shape": shape.pct(), "position": position.pct(), "all": all.pct()},
        "ceilings": {"judge_on_truth_all": truth_all.pct(), "vae_roundtrip_shape": vae_shape.pct(),
                     "vae_roundtrip_position": vae_position.pct(), "vae_roundtrip_all": vae_all.pct()},
        "protect": {"protected_exact": exact_kept.pct(), "appears": appears.pct(), "appears_at_position": appears_at.pct()},
        "heatmap": {"miou_fast": mean(&iou_fast), "n_fast": iou_fast.len(), "miou_exact": mean(&iou_exact), "n_exact": iou_exact.len(),
                    "miou_fast_daam": mean(&iou_fast_daam), "miou_exact_daam": mean(&iou_exact_daam),
                    "miou_fast_pixel": mean(&iou_fast_pixel), "miou_exact_pixel": mean(&iou_exact_pixel)},
        "render_secs": {"median": median_secs, "mean": mean(&secs), "max": sorted[sorted.len() - 1],
                        "cpu": format!("{}, {} threads", frisket_trainer::cpu_name(), tch::get_num_threads())},
        "eval_secs": t_all.elapsed().as_secs_f64(),
        "rows": rows,
        "protect_rows": protect_rows,
    });
    let path = a.model.join(format!("eval-{}.json", a.label));
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    println!(
        "{}",
        serde_json::to_string_pretty(
            &json!({"single": result["single"], "ceilings": result["ceilings"], "protect": result["protect"],
        "heatmap": result["heatmap"], "render_secs": result["render_secs"]})
        )?
    );
    println!("wrote {}", path.display());
    Ok(())
}

fn write_grid(path: &std::path::Path, imgs: &[RgbImage], cols: u32) -> Result<()> {
    if imgs.is_empty() {
        return Ok(());
    }
    let (w, h) = imgs[0].dimensions();
    let rows = (imgs.len() as u32).div_ceil(cols);
    let mut out = RgbImage::from_pixel(cols * (w + 2), rows * (h + 2), image::Rgb([255, 255, 255]));
    for (k, img) in imgs.iter().enumerate() {
        let (cx, cy) = ((k as u32 % cols) * (w + 2), (k as u32 / cols) * (h + 2));
        image::imageops::overlay(&mut out, img, cx as i64, cy as i64);
    }
    out.save(path)?;
    Ok(())
}
