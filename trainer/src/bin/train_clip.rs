//! train_clip: trains the shapes contrastive image–text model (a transformers `CLIPModel`) from
//! nothing and writes it as a Hugging Face folder.
//!
//!   train_clip [--out models/shapes-clip] [--tokenizer models/shapes/tokenizer] [--seed 0]
//!              [--steps 4000] [--batch 128] [--pool 20000] [--lr 1e-3] [--warmup 150]
//!              [--weight-decay 0.05] [--presence-weight 4]
//!
//! The model is frisket-eval's `Clip` (the forward `frisket-eval clip-score` runs) over
//! trainable leaves; `shapes_clip::config()` gives its size. It draws a pool of `--pool` scenes
//! (training seeds, disjoint from the evaluation's); each step takes `--batch` of them at
//! random, each with a text drawn anew (`shapes_clip::training_text`: captions and object
//! phrases), and minimises the symmetric
//! InfoNCE loss with a learnable temperature (CLIP's `logit_scale`, at most ln 100), plus
//! `--presence-weight` × the sigmoid "object present" loss over two object phrases per scene (one
//! of its objects and an absent variant: `shapes_clip::presence_loss`,
//! with its own learnable scale and bias, which the saved model does not keep); AdamW with
//! linear warm-up and cosine decay. Writes config.json, preprocessor_config.json, the tokenizer
//! files, model.safetensors (fp16), training.json, loss.csv and loss.png into --out.
use anyhow::{Context, Result};
use frisket_eval::clip::{Clip, ClipConfig, Preprocessing};
use frisket_shapes::rng::Rng;
use frisket_shapes::Scene;
use frisket_trainer::engine::tokenizer::ClipTokenizer;
use frisket_trainer::flags::Flags;
use frisket_trainer::params::{AdamW, Params};
use frisket_trainer::plot;
use frisket_trainer::shapes_clip::{
    self, info_nce, object_phrase, pixels, presence_loss, presence_questions, training_scenes, training_text,
};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const TOKENIZER_FILES: [&str; 4] = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"];
/// CLIP's cap on the learned temperature: exp(logit_scale) ≤ 100.
const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;
/// The presence loss's learnable scale (log) and bias, with their initial values.
const PRESENCE_HEAD: [(&str, f32); 2] = [("presence_scale", std::f32::consts::LN_10), ("presence_bias", 0.0)];

/// Token ids [n, max_length] cut after the last row's end token: the text tower is causal and
/// pools at the first end token, so the padding after it changes nothing but the time.
fn unpadded(ids: &Tensor, eos: i64) -> Tensor {
    let first_eos = ids.eq(eos).to_kind(Kind::Int).argmax(-1, false);
    ids.narrow(1, 0, first_eos.max().int64_value(&[]) + 1)
}

fn main() -> Result<()> {
    let usage = "trainer/src/bin/train_clip.rs";
    let f = Flags::from_env(
        &["out", "tokenizer", "seed", "steps", "batch", "pool", "lr", "warmup", "weight-decay", "presence-weight"],
        usage,
    )?;
    let out = PathBuf::from(f.get("out", "models/shapes-clip".to_string())?);
    let tokenizer_dir = PathBuf::from(f.get("tokenizer", "models/shapes/tokenizer".to_string())?);
    let seed: u64 = f.get("seed", 0)?;
    let steps: u64 = f.get("steps", 4000)?;
    let batch: usize = f.get("batch", 128)?;
    let pool_size: usize = f.get("pool", 20000)?;
    let lr: f64 = f.get("lr", 1e-3)?;
    let warmup: u64 = f.get("warmup", 150)?;
    let weight_decay: f64 = f.get("weight-decay", 0.05)?;
    let presence_weight: f64 = f.get("presence-weight", 4.0)?;
    tch::set_num_threads(2);
    tch::manual_seed(seed as i64);

    let config_json = shapes_clip::config();
    let config = ClipConfig::from_value(&config_json)?;
    let preprocessing: Preprocessing = serde_json::from_value(shapes_clip::preprocessor_config())?;
    let tokenizer = || {
        ClipTokenizer::from_dir(&tokenizer_dir)
            .with_context(|| format!("reading the tokenizer in {}", tokenizer_dir.display()))
    };
    tokenizer()?;
    let mut params =
        Params::discover(Device::Cpu, |w| Clip::new(&w.root(), &config, tokenizer()?, preprocessing.clone()))?;
    let init_scale = config_json["logit_scale_init_value"].as_f64().expect("logit_scale_init_value");
    params.tensors.insert("logit_scale".into(), Tensor::from(init_scale as f32).set_requires_grad(true));
    // The presence loss's scale and bias (exp(scale) = 10, bias 0: its pairs are balanced);
    // trained with the model, dropped before saving.
    for (name, init) in PRESENCE_HEAD {
        params.tensors.insert(name.into(), Tensor::from(init).set_requires_grad(true));
    }
    let clip = Clip::new(&params.weights().root(), &config, tokenizer()?, preprocessing.clone())?;
    println!("shapes CLIP: {} parameters", params.count());
    let eos = config.text.eos_token_id;

    let t0 = Instant::now();
    let pool = training_scenes(seed, pool_size);
    println!("{} training scenes drawn in {:.0} s", pool.len(), t0.elapsed().as_secs_f64());
    let mut rng = Rng::new(seed ^ 0xba7c);

    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut opt = AdamW::new(&params, lr, weight_decay);
    let mut losses = Vec::with_capacity(steps as usize);
    let mut csv = std::fs::File::create(out.join("loss.csv"))?;
    writeln!(csv, "step,loss,presence_loss,logit_scale")?;
    let start = Instant::now();
    for step in 0..steps {
        opt.lr = if step < warmup {
            lr * (step + 1) as f64 / warmup as f64
        } else {
            let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
            lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        };
        let scenes: Vec<Scene> = (0..batch).map(|_| pool[rng.below(pool.len() as u64) as usize].clone()).collect();
        let texts: Vec<String> = scenes.iter().map(|s| training_text(s, step)).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let images = clip.image_features(&pixels(&clip.preprocessing, &scenes));
        let text = clip.text_features(&unpadded(&clip.token_ids(&refs), eos));
        let scale = &params.tensors["logit_scale"];
        let contrastive = info_nce(&images, &text, scale, &texts);
        let questions = presence_questions(&scenes, step);
        let phrases: Vec<String> = questions.iter().map(|&(c, sh)| object_phrase(c, sh)).collect();
        let refs: Vec<&str> = phrases.iter().map(String::as_str).collect();
        let phrase_features = clip.text_features(&unpadded(&clip.token_ids(&refs), eos));
        let presence = presence_loss(
            &images,
            &phrase_features,
            &params.tensors["presence_scale"],
            &params.tensors["presence_bias"],
        );
        let loss = &contrastive + &presence * presence_weight;
        params.zero_grad();
        loss.backward();
        opt.step(&params);
        tch::no_grad(|| {
            let _ = scale.shallow_clone().clamp_(0.0, MAX_LOGIT_SCALE);
        });
        let (l, s) = (loss.double_value(&[]), scale.double_value(&[]));
        let p = presence.double_value(&[]);
        losses.push(l);
        writeln!(csv, "{step},{l:.6},{p:.6},{s:.4}")?;
        if step % 50 == 0 || step + 1 == steps {
            let el = start.elapsed().as_secs_f64();
            let per = el / (step + 1) as f64;
            println!(
                "step {step:5}/{steps} loss {l:.4} (presence {p:.4}) temperature 1/{:.1} lr {:.2e} {per:.3} s/step, eta {:.1} min",
                s.exp(),
                opt.lr,
                per * (steps - step - 1) as f64 / 60.0
            );
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    for (name, _) in PRESENCE_HEAD {
        params.tensors.remove(name);
    }

    params.save(&out.join("model.safetensors"), Kind::Half)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config_json)? + "\n")?;
    let pre = serde_json::to_string_pretty(&shapes_clip::preprocessor_config())? + "\n";
    std::fs::write(out.join("preprocessor_config.json"), pre)?;
    for name in TOKENIZER_FILES {
        std::fs::copy(tokenizer_dir.join(name), out.join(name))
            .with_context(|| format!("copying {} from {}", name, tokenizer_dir.display()))?;
    }
    plot::loss_curves(&out.join("loss.png"), &[("InfoNCE + presence", losses.as_slice())])?;
    let training = json!({
        "steps": steps,
        "batch": batch,
        "pool": pool_size,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "presence_weight": presence_weight,
        "seed": seed,
        "parameters": params.count(),
        "final_loss": losses.last(),
        "final_logit_scale": params.tensors["logit_scale"].double_value(&[]),
        "seconds": seconds,
        "hardware": format!("{}, {} threads", frisket_trainer::cpu_name(), tch::get_num_threads()),
        "text_mix": "6/10 generator captions, 3/10 plain object phrases, 1/10 object phrases with size and position",
        "presence_loss": "sigmoid over each scene and its own two object phrases: a present object and its absent variant",
    });
    std::fs::write(out.join("training.json"), serde_json::to_string_pretty(&training)? + "\n")?;
    println!("trained in {:.1} min; wrote {}", seconds / 60.0, out.display());
    Ok(())
}
