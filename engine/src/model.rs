//! A Stable Diffusion model, from a diffusers folder or a single-file checkpoint, loaded
//! onto one device.
use super::checkpoint::{self, Component, Converted, Family, LoadOptions};
use super::clip::{ClipTextConfig, ClipTextModel};
use super::schedulers::SchedulerConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKl, VaeConfig};
use super::weights::Weights;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

pub struct StableDiffusion {
    /// The model folder or checkpoint file it was loaded from.
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKl,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
    /// Text-encoder outputs of recent prompts, most recently used last (`encode_prompts`).
    prompt_cache: Mutex<Vec<(Vec<i64>, Tensor)>>,
}

/// How many prompt encodings `StableDiffusion` keeps (≈ 77·D floats each: 0.3 MB for SD 2).
const PROMPT_CACHE_SIZE: usize = 16;

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

/// The components of a model, before they become a `StableDiffusion`.
struct Parts {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKl,
    scheduler_config: SchedulerConfig,
}

/// A diffusers folder; `opts.vae` replaces its VAE.
fn load_folder(dir: &Path, opts: &LoadOptions, device: Device, kind: Kind) -> Result<Parts> {
    let component = |name: &str| -> Result<PathBuf> {
        let sub = dir.join(name);
        if !sub.join("config.json").is_file() && name != "tokenizer" && name != "scheduler" {
            bail!("{} is not a diffusers model folder: {name}/config.json is missing", dir.display());
        }
        Ok(sub)
    };
    let tokenizer = ClipTokenizer::from_dir(&component("tokenizer")?).context("loading tokenizer/")?;
    let text_encoder =
        ClipTextModel::load(&component("text_encoder")?, device, kind).context("loading text_encoder/")?;
    let unet = UNet2DConditionModel::load(&component("unet")?, device, kind).context("loading unet/")?;
    let vae = match opts.vae {
        None => AutoencoderKl::load(&component("vae")?, device, kind).context("loading vae/")?,
        Some(file) => {
            let own = VaeConfig::from_dir(&component("vae")?)?;
            let c = checkpoint::load_vae(file, own.scaling_factor, own.sample_size, device, kind)?;
            vae_from(c)?
        }
    };
    let scheduler_config =
        SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json")).context("loading scheduler/")?;
    Ok(Parts { tokenizer, text_encoder, unet, vae, scheduler_config })
}

/// An SD 1.x or 2.x single-file checkpoint; tokenizer and scheduler from the family's
/// defaults.
fn load_file(path: &Path, opts: &LoadOptions, device: Device, kind: Kind) -> Result<Parts> {
    if checkpoint::inspect(path, opts.prediction)?.family == Family::Sdxl {
        bail!("SDXL checkpoints are recognised but this engine cannot run SDXL models yet");
    }
    let converted = checkpoint::convert(path, opts, device, kind)?;
    let Converted { unet, vae, mut text_encoders, scheduler, pad_tokens, .. } = converted;
    let text = text_encoders.pop().context("no text encoder")?;
    let tokenizer = ClipTokenizer::standard(pad_tokens[0])?;
    let text_cfg = ClipTextConfig::from_value(text.config)?;
    let text_encoder = ClipTextModel::new(&Weights::from_map(text.tensors, device, kind).root(), &text_cfg)
        .context("building the text encoder")?;
    let unet_cfg = UNetConfig::from_value(unet.config)?;
    let unet = UNet2DConditionModel::new(&Weights::from_map(unet.tensors, device, kind).root(), &unet_cfg)
        .context("building the UNet")?;
    let vae = vae_from(vae)?;
    Ok(Parts { tokenizer, text_encoder, unet, vae, scheduler_config: scheduler })
}

fn vae_from(c: Component) -> Result<AutoencoderKl> {
    let device_kind = c.tensors.values().next().map(|t| (t.device(), t.kind()));
    let (device, kind) = device_kind.context("the VAE has no tensors")?;
    let cfg = VaeConfig::from_value(c.config)?;
    AutoencoderKl::new(&Weights::from_map(c.tensors, device, kind).root(), &cfg).context("building the VAE")
}

pub fn default_kind(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::Half
    } else {
        Kind::Float
    }
}

/// Makes glibc's malloc keep the memory of freed CPU tensors for reuse instead of handing
/// it back to the kernel. Every UNet call allocates and frees the same large activations;
/// by default glibc maps the biggest ones afresh each time and returns freed heap tops
/// (and whole per-thread heaps), so each step paid again for page faults on memory it had
/// just freed (about 7% of a step on the CPU). Process-wide and idempotent; the cost is
/// that the process keeps up to its peak working set mapped between jobs.
pub fn tune_cpu_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            extern "C" {
                fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
            }
            const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
            const M_TOP_PAD: std::ffi::c_int = -2;
            const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
            const MIB: std::ffi::c_int = 1 << 20;
            // SAFETY: mallopt only changes malloc's tunables; any value is valid to pass
            // (out-of-range ones are refused with 0, which leaves the default in place).
            unsafe {
                // Serve blocks up to 32 MiB (the largest glibc allows) from the heap.
                mallopt(M_MMAP_THRESHOLD, 32 * MIB);
                // Do not trim the heap top unless over 1 GiB is free there.
                mallopt(M_TRIM_THRESHOLD, 1024 * MIB);
                // Grow heaps 64 MiB at a time; a pad this large also keeps glibc from
                // unmapping a non-main thread's heap (the service's engine thread) as soon
                // as it is empty.
                mallopt(M_TOP_PAD, 64 * MIB);
            }
        });
    }
}

impl StableDiffusion {
    /// Loads a diffusers model folder or a single-file `.safetensors` checkpoint.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        Self::load_with_kind(path, device, default_kind(device))
    }

    pub fn load_with_kind(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_with(path, &LoadOptions::default(), device, kind)
    }

    /// A folder or a single file, with `opts` (prediction type of a single file; a VAE file
    /// that replaces the model's own VAE).
    pub fn load_with(path: &Path, opts: &LoadOptions, device: Device, kind: Kind) -> Result<Self> {
        if device == Device::Cpu {
            tune_cpu_allocator();
        }
        let parts = if path.is_file() {
            load_file(path, opts, device, kind).with_context(|| format!("loading the checkpoint {}", path.display()))?
        } else if path.is_dir() {
            load_folder(path, opts, device, kind)?
        } else {
            bail!("model {} does not exist (expected a diffusers folder or a .safetensors file)", path.display());
        };
        Ok(Self {
            dir: path.to_path_buf(),
            tokenizer: parts.tokenizer,
            text_encoder: parts.text_encoder,
            unet: parts.unet,
            vae: parts.vae,
            scheduler_config: parts.scheduler_config,
            device,
            kind,
            prompt_cache: Mutex::new(Vec::new()),
        })
    }

    /// Pixels per latent element along each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.config().scale_factor()
    }

    /// The text encoder's last hidden state for one prompt, [1, 77, D].
    pub fn encode_prompt(&self, prompt: &str) -> Tensor {
        self.encode_prompts(&[prompt])
    }

    /// The same for several prompts, [prompts, 77, D] in order. Prompts encoded recently
    /// (the same token ids) are taken from a small cache: jobs often repeat a prompt with
    /// other seeds or settings, and most share the negative prompt. The others go through
    /// the text encoder in one batch (the negative and positive prompt of classifier-free
    /// guidance together). Each row depends only on its own prompt, so caching and
    /// batching give the same values as encoding each prompt alone.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Tensor {
        assert!(!prompts.is_empty(), "encode_prompts needs at least one prompt");
        let ids: Vec<Vec<i64>> = prompts.iter().map(|p| self.tokenizer.encode_padded(p)).collect();
        let mut cache = self.prompt_cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut rows: Vec<Option<Tensor>> =
            ids.iter().map(|key| cache.iter().find(|(k, _)| k == key).map(|(_, t)| t.shallow_clone())).collect();
        let mut missing: Vec<&Vec<i64>> = Vec::new();
        for (key, row) in ids.iter().zip(&rows) {
            if row.is_none() && !missing.contains(&key) {
                missing.push(key);
            }
        }
        if !missing.is_empty() {
            let batch: Vec<Tensor> = missing.iter().map(|k| Tensor::from_slice(k)).collect();
            let encoded =
                self.text_encoder.forward(&Tensor::stack(&batch, 0).to_device(self.device)).to_kind(self.kind);
            for (i, key) in missing.iter().enumerate() {
                let row = encoded.narrow(0, i as i64, 1).contiguous();
                for (k, slot) in ids.iter().zip(rows.iter_mut()) {
                    if k == *key && slot.is_none() {
                        *slot = Some(row.shallow_clone());
                    }
                }
                cache.push(((*key).clone(), row));
            }
        }
        // Most recently used last; the least recently used go first.
        for key in &ids {
            if let Some(pos) = cache.iter().position(|(k, _)| k == key) {
                let entry = cache.remove(pos);
                cache.push(entry);
            }
        }
        let excess = cache.len().saturating_sub(PROMPT_CACHE_SIZE);
        cache.drain(..excess);
        drop(cache);
        // A fresh tensor, so that callers may modify it without touching the cache.
        let rows: Vec<Tensor> = rows.into_iter().map(|r| r.expect("every prompt encoded")).collect();
        Tensor::cat(&rows, 0)
    }
}
