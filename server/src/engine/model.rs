//! A Stable Diffusion model folder (diffusers layout) loaded onto one device.
use super::clip::ClipTextModel;
use super::schedulers::SchedulerConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKl;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKl,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
}

/// Where the engine runs. fp16 on CUDA (what SD weights ship as); fp32 on the CPU, where
/// libtorch has no Half convolutions.
pub fn parse_device(spec: &str) -> Result<Device> {
    let device = match spec {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => bail!("unknown device `{other}` (expected auto, cpu, cuda or cuda:N)"),
        },
    };
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            bail!("device cuda:{n} requested but {count} CUDA device(s) are available");
        }
    }
    Ok(device)
}

pub fn default_kind(device: Device) -> Kind {
    if device.is_cuda() { Kind::Half } else { Kind::Float }
}

impl StableDiffusion {
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Self::load_with_kind(dir, device, default_kind(device))
    }

    pub fn load_with_kind(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let component = |name: &str| -> Result<PathBuf> {
            let sub = dir.join(name);
            if !sub.join("config.json").is_file() && name != "tokenizer" && name != "scheduler" {
                bail!("{} is not a diffusers model folder: {name}/config.json is missing", dir.display());
            }
            Ok(sub)
        };
        let tokenizer = ClipTokenizer::from_dir(&component("tokenizer")?).context("loading tokenizer/")?;
        let text_encoder = ClipTextModel::load(&component("text_encoder")?, device, kind).context("loading text_encoder/")?;
        let unet = UNet2DConditionModel::load(&component("unet")?, device, kind).context("loading unet/")?;
        let vae = AutoencoderKl::load(&component("vae")?, device, kind).context("loading vae/")?;
        let scheduler_config =
            SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json")).context("loading scheduler/")?;
        Ok(Self { dir: dir.to_path_buf(), tokenizer, text_encoder, unet, vae, scheduler_config, device, kind })
    }

    /// Pixels per latent element along each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.config().scale_factor()
    }

    /// The text encoder's last hidden state for one prompt, [1, 77, D].
    pub fn encode_prompt(&self, prompt: &str) -> Tensor {
        let ids = self.tokenizer.encode_padded(prompt);
        let ids = Tensor::from_slice(&ids).unsqueeze(0).to_device(self.device);
        self.text_encoder.forward(&ids).to_kind(self.kind)
    }
}
