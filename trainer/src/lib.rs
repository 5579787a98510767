//! Trainer for Frisket's tiny "shapes" model. trainer/README.md states the recipe and why.
pub mod bpe;
pub mod configs;
pub mod data;
pub mod flags;
pub mod grounding;
pub mod params;
pub mod plot;
pub mod shapes_clip;
pub mod text_aux;

/// The engine's model code (the frisket-engine crate): training runs exactly the forward the server runs.
pub use frisket_engine as engine;

use anyhow::Result;
use engine::clip::{ClipTextConfig, ClipTextModel};
use engine::unet::{UNet2DConditionModel, UNetConfig};
use engine::vae::{AutoencoderKl, VaeConfig};
use tch::Device;

/// A trainable VAE: its parameters and the engine model built over them.
pub fn vae(cfg_json: &serde_json::Value, device: Device) -> Result<(params::Params, AutoencoderKl, VaeConfig)> {
    let cfg: VaeConfig = serde_json::from_value(cfg_json.clone())?;
    let p = params::Params::discover(device, |w| AutoencoderKl::new(&w.root(), &cfg))?;
    let m = AutoencoderKl::new(&p.weights().root(), &cfg)?;
    Ok((p, m, cfg))
}

pub fn unet(
    cfg_json: &serde_json::Value,
    device: Device,
) -> Result<(params::Params, UNet2DConditionModel, UNetConfig)> {
    let cfg: UNetConfig = serde_json::from_value(cfg_json.clone())?;
    let p = params::Params::discover(device, |w| UNet2DConditionModel::new(&w.root(), &cfg))?;
    let m = UNet2DConditionModel::new(&p.weights().root(), &cfg)?;
    Ok((p, m, cfg))
}

pub fn text_encoder(
    cfg_json: &serde_json::Value,
    device: Device,
) -> Result<(params::Params, ClipTextModel, ClipTextConfig)> {
    let cfg: ClipTextConfig = serde_json::from_value(cfg_json.clone())?;
    let p = params::Params::discover(device, |w| ClipTextModel::new(&w.root(), &cfg))?;
    let m = ClipTextModel::new(&p.weights().root(), &cfg)?;
    Ok((p, m, cfg))
}

/// The CPU's model name (/proc/cpuinfo), for the records that time things: training and
/// render times differ markedly between CPUs with the same thread count, so a time means
/// little without the machine that took it.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}
