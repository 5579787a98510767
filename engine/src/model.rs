//! A Stable Diffusion model folder (diffusers layout) loaded onto one device.
use super::clip::ClipTextModel;
use super::lora::{AppliedLoras, Component, LoraSet, ParamIndex};
use super::schedulers::SchedulerConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKl;
use super::weights::Weights;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
    /// Text-encoder outputs of recent prompts, most recently used last (`encode_prompts`).
    /// Emptied when a LoRA set change touches the text encoder.
    prompt_cache: Mutex<Vec<(Vec<i64>, Tensor)>>,
    /// The LoRA-able components' weights by diffusers name: the tensors the modules hold.
    params: HashMap<Component, Weights>,
    param_index: ParamIndex,
    loras: AppliedLoras,
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
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Self::load_with_kind(dir, device, default_kind(device))
    }

    pub fn load_with_kind(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        if device == Device::Cpu {
            tune_cpu_allocator();
        }
        let component = |name: &str| -> Result<PathBuf> {
            let sub = dir.join(name);
            if !sub.join("config.json").is_file() && name != "tokenizer" && name != "scheduler" {
                bail!("{} is not a diffusers model folder: {name}/config.json is missing", dir.display());
            }
            Ok(sub)
        };
        let tokenizer = ClipTokenizer::from_dir(&component("tokenizer")?).context("loading tokenizer/")?;
        let (text_encoder, te_weights) = ClipTextModel::load_with_weights(&component("text_encoder")?, device, kind)
            .context("loading text_encoder/")?;
        let (unet, unet_weights) =
            UNet2DConditionModel::load_with_weights(&component("unet")?, device, kind).context("loading unet/")?;
        let params = HashMap::from([(Component::TextEncoder, te_weights), (Component::Unet, unet_weights)]);
        let mut param_index = ParamIndex::default();
        for (component, weights) in &params {
            param_index.add_weights(*component, weights);
        }
        let vae = AutoencoderKl::load(&component("vae")?, device, kind).context("loading vae/")?;
        let scheduler_config =
            SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json")).context("loading scheduler/")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device,
            kind,
            prompt_cache: Mutex::new(Vec::new()),
            params,
            param_index,
            loras: AppliedLoras::default(),
        })
    }

    /// Merges `set` (LoRAs with their weights) into the weights in place of the set merged
    /// before, which is taken out exactly (the touched tensors' original values are kept).
    /// The same set again does nothing. A LoRA that does not fit the model is an error
    /// with a `lora::LoraError` in its chain, and leaves the model as it was.
    pub fn set_loras(&mut self, set: &LoraSet) -> Result<()> {
        let text_encoder_before = self.loras.touches_text_encoder();
        if self.loras.apply(&self.params, &self.param_index, set)?
            && (text_encoder_before || self.loras.touches_text_encoder())
        {
            self.prompt_cache.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
        }
        Ok(())
    }

    /// The names and weights of the LoRAs merged now.
    pub fn loras(&self) -> Vec<(String, f32)> {
        self.loras.names()
    }

    /// A LoRA-able parameter by its diffusers name: the tensor the model computes with.
    pub fn param(&self, component: Component, name: &str) -> Option<Tensor> {
        self.params.get(&component)?.tensor(name)
    }

    /// The names and shapes of the parameters LoRAs may change.
    pub fn param_index(&self) -> &ParamIndex {
        &self.param_index
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
