//! Which model family a single-file checkpoint holds, from its tensor names and shapes
//! (the header only). The checks follow diffusers' `infer_diffusers_model_type`.
use super::safetensors::Header;
use super::Family;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

pub const UNET: &str = "model.diffusion_model.";
pub const VAE: &str = "first_stage_model.";
pub const CLIP_SD1: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_SD2: &str = "cond_stage_model.model.";
pub const CLIP_SDXL: &str = "conditioner.embedders.0.transformer.";
pub const OPEN_CLIP_SDXL: &str = "conditioner.embedders.1.model.";
const OPEN_CLIP_REFINER: &str = "conditioner.embedders.0.model.";

/// The family of the checkpoint described by `h`, or why it cannot be used.
pub fn detect(h: &Header) -> Result<Family> {
    let file = h.path.display();
    let conv_in = format!("{UNET}input_blocks.0.0.weight");
    let Some(shape) = h.shape(&conv_in) else {
        bail!(
            "{file} holds no Stable Diffusion UNet (no `{conv_in}`); it has {}. A VAE or LoRA file cannot be \
             loaded as a model",
            prefixes(h)
        );
    };
    let in_channels = shape.get(1).copied().unwrap_or(0);
    let has = |prefix: &str, leaf: &str| h.contains(&format!("{prefix}{leaf}"));
    let clip = |p: &str| has(p, "text_model.embeddings.token_embedding.weight");
    let open_clip = |p: &str| has(p, "token_embedding.weight");
    let family = if clip(CLIP_SD1) {
        Family::Sd1
    } else if open_clip(OPEN_CLIP_SD2) {
        Family::Sd2
    } else if clip(CLIP_SDXL) && open_clip(OPEN_CLIP_SDXL) {
        Family::Sdxl
    } else if open_clip(OPEN_CLIP_REFINER) {
        bail!(
            "{file} is an SDXL refiner (one OpenCLIP text encoder at {OPEN_CLIP_REFINER}); refiners are not supported"
        )
    } else {
        bail!("{file}: unknown architecture: no text encoder this engine knows; the file has {}", prefixes(h))
    };
    if in_channels == 9 {
        bail!(
            "{file} is a {} inpainting checkpoint (the UNet takes 9 input channels); inpainting models are not \
             supported, use the base model",
            family.name()
        );
    }
    if in_channels != 4 {
        bail!("{file}: the UNet takes {in_channels} input channels (`{conv_in}`); only 4-channel text-to-image models are supported");
    }
    Ok(family)
}

/// The tensor-name prefixes of a file with their counts, for error messages.
pub fn prefixes(h: &Header) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for name in h.tensors.keys() {
        let depth = if name.starts_with("conditioner.embedders.") { 3 } else { 2 };
        let prefix: Vec<&str> = name.split('.').take(depth).collect();
        *counts.entry(prefix.join(".")).or_default() += 1;
    }
    if counts.is_empty() {
        return "no tensors".into();
    }
    let mut list: Vec<String> = counts.iter().take(12).map(|(p, n)| format!("{p}.* ({n})")).collect();
    if counts.len() > 12 {
        list.push(format!("… {} more prefixes", counts.len() - 12));
    }
    format!("tensors {}", list.join(", "))
}
