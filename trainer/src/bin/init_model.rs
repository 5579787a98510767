//! init_model OUT_DIR: writes a complete diffusers-format folder with freshly initialised
//! weights (fp16) at the recommended sizes, plus the BPE tokenizer: the saving path of the
//! trainer, checkable against diffusers before any training (scripts/check_folder.py).
use anyhow::Result;
use frisket_trainer::{bpe, configs};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use tch::{Device, Kind};

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/init_model".into()));
    tch::manual_seed(0);
    // Tokenizer from the caption vocabulary (word counts are irrelevant to the result's
    // coverage: every word ends up one token).
    let mut freq: BTreeMap<String, u64> = BTreeMap::new();
    for w in frisket_shapes::vocabulary().into_iter().chain(["center", "middle"]) {
        freq.insert(w.to_string(), 1);
    }
    let merges = bpe::learn_merges(&freq);
    let vocab = bpe::write_tokenizer(&out.join("tokenizer"), &merges, 48)? as i64;
    let write = |dir: &str, cfg: &serde_json::Value, p: &frisket_trainer::params::Params, file: &str| -> Result<()> {
        let d = out.join(dir);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
        p.save(&d.join(file), Kind::Half)
    };
    let vae_cfg = configs::vae(&[32, 64, 64], 1, 16, 1.0);
    let (p, _, _) = frisket_trainer::vae(&vae_cfg, Device::Cpu)?;
    write("vae", &vae_cfg, &p, "diffusion_pytorch_model.safetensors")?;
    let unet_cfg = configs::unet(&[64, 128, 128], 1, 8, 64, 32, 16);
    let (p, _, _) = frisket_trainer::unet(&unet_cfg, Device::Cpu)?;
    write("unet", &unet_cfg, &p, "diffusion_pytorch_model.safetensors")?;
    let te_cfg = configs::text_encoder(vocab, 64, 4, 4, 48);
    let (p, _, _) = frisket_trainer::text_encoder(&te_cfg, Device::Cpu)?;
    write("text_encoder", &te_cfg, &p, "model.safetensors")?;
    std::fs::create_dir_all(out.join("scheduler"))?;
    std::fs::write(out.join("scheduler/scheduler_config.json"), serde_json::to_string_pretty(&configs::scheduler())?)?;
    let index: HashMap<&str, serde_json::Value> = HashMap::from([
        ("_class_name", "StableDiffusionPipeline".into()),
        ("_diffusers_version", "0.35.1".into()),
        ("requires_safety_checker", false.into()),
        ("safety_checker", serde_json::json!([null, null])),
        ("feature_extractor", serde_json::json!([null, null])),
        ("tokenizer", serde_json::json!(["transformers", "CLIPTokenizer"])),
        ("text_encoder", serde_json::json!(["transformers", "CLIPTextModel"])),
        ("unet", serde_json::json!(["diffusers", "UNet2DConditionModel"])),
        ("vae", serde_json::json!(["diffusers", "AutoencoderKL"])),
        ("scheduler", serde_json::json!(["diffusers", "PNDMScheduler"])),
    ]);
    std::fs::write(out.join("model_index.json"), serde_json::to_string_pretty(&index)?)?;
    // The engine loads every component back (fp16 files → float32 on the CPU).
    use frisket_trainer::engine::{clip::ClipTextModel, tokenizer::ClipTokenizer, unet::UNet2DConditionModel, vae::AutoencoderKl};
    ClipTokenizer::from_dir(&out.join("tokenizer"))?;
    ClipTextModel::load(&out.join("text_encoder"), Device::Cpu, Kind::Float)?;
    UNet2DConditionModel::load(&out.join("unet"), Device::Cpu, Kind::Float)?;
    AutoencoderKl::load(&out.join("vae"), Device::Cpu, Kind::Float)?;
    println!("wrote {} (vocab {vocab}); the engine loads it back", out.display());
    Ok(())
}
