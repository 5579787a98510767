//! eval_clip: scores the shapes CLIP folder on held-out scenes and writes its eval.json and
//! model card (README.md).
//!
//!   eval_clip [--model models/shapes-clip] [--groups 5] [--tune 300] [--test 500]
//!
//! Loads the folder as `frisket-eval clip-score` does (the shipped fp16 weights) and measures
//! (shapes_clip.rs): caption retrieval top-1, each image against the captions of its group of
//! 100 held-out scenes (--groups groups); agreement with the shapes judge on "is this object
//! present" for a present and an absent plain object phrase per scene, the threshold on the CLIP
//! score chosen on --tune scenes and the agreement measured on --test other scenes.
use anyhow::Result;
use frisket_eval::clip::Clip;
use frisket_trainer::flags::Flags;
use frisket_trainer::shapes_clip::{
    presence, read_json, retrieval, Presence, Retrieval, PRESENCE_BAR, PRESENCE_TEST_SEED, PRESENCE_TUNE_SEED,
    RETRIEVAL_BAR, RETRIEVAL_SEED,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn main() -> Result<()> {
    let f = Flags::from_env(&["model", "groups", "tune", "test"], "trainer/src/bin/eval_clip.rs")?;
    let dir = PathBuf::from(f.get("model", "models/shapes-clip".to_string())?);
    let (groups, tune, test): (usize, usize, usize) = (f.get("groups", 5)?, f.get("tune", 300)?, f.get("test", 500)?);
    tch::set_num_threads(2);
    let start = Instant::now();
    let clip = Clip::load(&dir)?;
    let r = retrieval(&clip, groups);
    let p = presence(&clip, tune, test);
    let eval = json!({
        "retrieval": r,
        "retrieval_seeds": format!("{RETRIEVAL_SEED}..{}", RETRIEVAL_SEED + r.scenes as u64),
        "presence": p,
        "presence_seeds": {
            "tune": format!("{PRESENCE_TUNE_SEED}..{}", PRESENCE_TUNE_SEED + tune as u64),
            "test": format!("{PRESENCE_TEST_SEED}..{}", PRESENCE_TEST_SEED + test as u64),
        },
        "bars": {"retrieval_top1": RETRIEVAL_BAR, "presence_agreement": PRESENCE_BAR},
        "seconds": start.elapsed().as_secs_f64(),
    });
    std::fs::write(dir.join("eval.json"), serde_json::to_string_pretty(&eval)? + "\n")?;
    let training = read_json(&dir.join("training.json"))?;
    std::fs::write(dir.join("README.md"), card(&dir, &training, &r, &p)?)?;
    println!(
        "retrieval top-1 {:.1} % (text→image {:.1} %), presence agreement with the judge {:.1} %",
        100.0 * r.image_to_text_top1,
        100.0 * r.text_to_image_top1,
        100.0 * p.agreement_with_judge
    );
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// The model card, from the folder's config, training.json and this evaluation.
fn card(dir: &Path, t: &Value, r: &Retrieval, p: &Presence) -> Result<String> {
    let c = read_json(&dir.join("config.json"))?;
    let (tc, vc) = (&c["text_config"], &c["vision_config"]);
    let size = std::fs::metadata(dir.join("model.safetensors"))?.len() as f64 / 1e6;
    let minutes = t["seconds"].as_f64().unwrap_or(0.0) / 60.0;
    Ok(format!(
        "# shapes-clip: a contrastive image–text model of the shapes world

A small CLIP (transformers `CLIPModel`, fp16 safetensors, {size:.1} MB) trained from nothing on
scenes of the shapes world (`frisket-shapes`), so that CLIP-style adherence and a domain FID
mean something offline: `frisket-eval clip-score --clip models/shapes-clip` and
`CLIPModel.from_pretrained` load this folder. Written by `eval_clip` (trainer/src/bin/eval_clip.rs);
`make train-clip` retrains and rewrites it.

## Architecture

| tower | layers | width | heads | MLP | input |
|---|---|---|---|---|---|
| text | {tl} | {tw} | {th} | {ti} | shapes tokenizer (models/shapes/tokenizer, vocab {vocab}, {pos} positions) |
| vision (ViT) | {vl} | {vw} | {vh} | {vi} | {img}×{img} px, {patch}-px patches |

Both project to {proj} dimensions; learnable temperature (`logit_scale`). {params} parameters.
Preprocessing (preprocessor_config.json): CLIPImageProcessor with size and crop {img} (a shapes
scene passes unchanged; other sizes are resized and cropped as CLIP does), OpenAI CLIP's mean
and std.

## Training

{steps} steps × {batch} scenes sampled from a pool of {pool} (`generate_default`, 1–3 objects,
seeds from 2³² up, disjoint from every evaluation seed), each time with a new text: {mix}. Symmetric InfoNCE (texts that repeat
within a batch are all positives) plus {pw} × a sigmoid \"object present\" loss (per scene, one of its
objects' plain phrase and that object with its colour or shape changed to one the scene lacks,
with a learnable scale and bias that the saved model does not keep: the loss that makes the CLIP
score answer \"is it there\" at one threshold), AdamW lr {lr} with {warmup} warm-up steps and cosine decay,
weight decay {wd}. Final loss {loss:.3}, temperature 1/{temp:.1}.
Training time {minutes:.1} min on {hw}. Loss curve: loss.png (loss.csv).

## Results (held-out scenes)

| measure | value | bar |
|---|---|---|
| caption retrieval top-1, image → text (each image vs the captions of its group of {cand} scenes; {n} scenes) | {i2t} | ≥ {rb} ({rm}) |
| caption retrieval top-1, text → image (same groups) | {t2i} | |
| agreement with the shapes judge on \"object present\" ({test} scenes × 2 plain phrases \"a red circle\", one present, one absent) | {agree} | ≥ {pb} ({pm}) |
| same questions, agreement with the generator's truth | {truth} | |
| the judge's own agreement with the generator's truth there | {jt} | |
| present phrases said present | {pa} | |
| absent phrases with a changed colour said absent | {cr} | |
| absent phrases with a changed shape said absent | {sr} | |

\"Object present\" is CLIP score (100 · cos) > {thr:.2}, the threshold that agrees best with the
judge on {tune} separate tuning scenes ({tune_agree} there). An absent phrase is the scene's
object with its colour or its shape changed to one that no object in the scene has.
eval.json has the numbers and the seeds.
",
        tl = tc["num_hidden_layers"],
        tw = tc["hidden_size"],
        th = tc["num_attention_heads"],
        ti = tc["intermediate_size"],
        vocab = tc["vocab_size"],
        pos = tc["max_position_embeddings"],
        vl = vc["num_hidden_layers"],
        vw = vc["hidden_size"],
        vh = vc["num_attention_heads"],
        vi = vc["intermediate_size"],
        img = vc["image_size"],
        patch = vc["patch_size"],
        proj = c["projection_dim"],
        params = t["parameters"],
        steps = t["steps"],
        batch = t["batch"],
        pool = t["pool"],
        mix = t["text_mix"].as_str().unwrap_or(""),
        lr = t["lr"],
        warmup = t["warmup"],
        wd = t["weight_decay"],
        pw = t["presence_weight"],
        loss = t["final_loss"].as_f64().unwrap_or(f64::NAN),
        temp = t["final_logit_scale"].as_f64().unwrap_or(f64::NAN).exp(),
        hw = t["hardware"].as_str().unwrap_or(""),
        cand = r.candidates,
        n = r.scenes,
        i2t = pct(r.image_to_text_top1),
        t2i = pct(r.text_to_image_top1),
        rb = pct(RETRIEVAL_BAR),
        rm = mark(r.image_to_text_top1 >= RETRIEVAL_BAR),
        test = p.test_scenes,
        agree = pct(p.agreement_with_judge),
        pb = pct(PRESENCE_BAR),
        pm = mark(p.agreement_with_judge >= PRESENCE_BAR),
        truth = pct(p.agreement_with_truth),
        pa = pct(p.present_accepted),
        cr = pct(p.colour_changed_rejected),
        sr = pct(p.shape_changed_rejected),
        jt = pct(p.judge_vs_truth),
        thr = p.threshold,
        tune = p.tune_scenes,
        tune_agree = pct(p.tune_agreement),
    ))
}
