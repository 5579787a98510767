//! A Stable Diffusion model, from a diffusers folder or a single-file checkpoint, loaded
//! onto one device: SD 1.x/2.x (one text encoder) or SDXL (two: CLIP-L and OpenCLIP bigG).
use super::checkpoint::{self, Component, Converted, LoadOptions};
use super::clip::{ClipTextConfig, ClipTextModel};
use super::config::{read_config, PerBlock};
use super::lora::{self, AppliedLoras, LoraSet, ParamIndex};
use super::schedulers::SchedulerConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::{AddedCond, CrossContext, UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKl, VaeConfig};
use super::weights::Weights;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Which Stable Diffusion generation a model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "sd1",
            Self::Sd2 => "sd2",
            Self::Sdxl => "sdxl",
        }
    }

    /// SD 1.x vs 2.x from the text encoder's width (768: CLIP-L, 1024: OpenCLIP-H) and,
    /// for other widths (small or retrained models), the prediction type (2.x: v).
    pub fn single_encoder(text_hidden_size: i64, prediction_type: Option<&str>) -> Self {
        match text_hidden_size {
            768 => Self::Sd1,
            1024 => Self::Sd2,
            _ if prediction_type == Some("v_prediction") => Self::Sd2,
            _ => Self::Sd1,
        }
    }
}

/// SDXL's second text encoder (OpenCLIP bigG, `CLIPTextModelWithProjection`) with its
/// tokenizer (the same vocabulary, padding with "!").
pub struct SecondEncoder {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
}

/// model_index.json: the pipeline class and the SDXL pipeline settings the engine honours.
#[derive(Debug, Default, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// SDXL: an absent negative prompt is the zero embedding (diffusers' default: true).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// SDXL refiner: time ids carry an aesthetic score instead of the target size.
    #[serde(default)]
    pub requires_aesthetics_score: Option<bool>,
}

impl ModelIndex {
    /// model_index.json of `dir`, or the defaults when the folder has none.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        if path.is_file() {
            read_config(&path)
        } else {
            Ok(Self::default())
        }
    }

    pub fn is_sdxl_class(&self) -> bool {
        self.class_name.as_deref().is_some_and(|c| c.starts_with("StableDiffusionXL"))
    }

    /// Whether the folder `dir` (whose model_index.json this is) holds an SDXL pipeline: an
    /// SDXL pipeline class, or a second text encoder.
    pub fn is_sdxl_folder(&self, dir: &Path) -> bool {
        dir.join("text_encoder_2").is_dir() || self.is_sdxl_class()
    }
}

/// Whether `dir` holds an SDXL pipeline: model_index.json names an SDXL pipeline class, or
/// the folder has a second text encoder.
pub fn is_sdxl_folder(dir: &Path) -> bool {
    ModelIndex::read(dir).is_ok_and(|i| i.is_sdxl_folder(dir)) || dir.join("text_encoder_2").is_dir()
}

/// SDXL's size conditioning of a job (the UNet's six time ids), in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeConditioning {
    /// (width, height) the picture notionally had before cropping and resizing.
    pub original: (i64, i64),
    /// (top, left) of the crop.
    pub crop_top_left: (i64, i64),
    /// (width, height) of the output.
    pub target: (i64, i64),
}

impl SizeConditioning {
    /// diffusers' `add_time_ids`: original (h, w), crop (top, left), target (h, w).
    pub fn time_ids(&self) -> [f32; 6] {
        let (ow, oh) = self.original;
        let (top, left) = self.crop_top_left;
        let (tw, th) = self.target;
        [oh, ow, top, left, th, tw].map(|v| v as f32)
    }
}

/// The parts of a model, loaded by `StableDiffusion::load` from a diffusers folder or
/// built by a caller from other sources (e.g. converted single-file checkpoints), and put
/// together by `StableDiffusion::from_components`.
pub struct Components {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second encoder.
    pub text_encoder_2: Option<SecondEncoder>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKl,
    pub scheduler_config: SchedulerConfig,
    /// SDXL: model_index.json's `force_zeros_for_empty_prompt` (default true).
    pub force_zeros_for_empty_prompt: bool,
    /// The weights the UNet and text encoders were built from, whose tensors they hold
    /// (LoRAs merge into them); a component left out takes no LoRA.
    pub params: HashMap<lora::Component, Weights>,
}

pub struct StableDiffusion {
    /// The model folder or checkpoint file it was loaded from.
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second text encoder and tokenizer.
    pub text_encoder_2: Option<SecondEncoder>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKl,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
    /// SDXL: an empty negative prompt is the zero embedding (and zero pooled embedding).
    pub force_zeros_for_empty_prompt: bool,
    family: Family,
    /// Text-encoder outputs of recent prompts, most recently used last (`encode_prompts`).
    /// Emptied when a LoRA set change touches a text encoder.
    prompt_cache: Mutex<Vec<(Vec<i64>, Encoded)>>,
    /// The LoRA-able components' weights by diffusers name: the tensors the modules hold.
    params: HashMap<lora::Component, Weights>,
    param_index: ParamIndex,
    loras: AppliedLoras,
}

/// One prompt's text-encoder output: the UNet's encoder hidden states [1, 77, D] and, for
/// SDXL, the pooled embedding [1, P].
struct Encoded {
    states: Tensor,
    pooled: Option<Tensor>,
}

impl Encoded {
    fn shallow_clone(&self) -> Self {
        Self { states: self.states.shallow_clone(), pooled: self.pooled.as_ref().map(Tensor::shallow_clone) }
    }
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

/// A diffusers folder; `opts.vae` replaces its VAE.
fn load_folder(dir: &Path, opts: &LoadOptions, device: Device, kind: Kind) -> Result<Components> {
    let index = ModelIndex::read(dir).context("reading model_index.json")?;
    let sdxl = index.is_sdxl_folder(dir);
    let component = |name: &str| -> Result<PathBuf> {
        let sub = dir.join(name);
        let needs_config = !name.starts_with("tokenizer") && name != "scheduler";
        if needs_config && !sub.join("config.json").is_file() {
            bail!("{} is not a diffusers model folder: {name}/config.json is missing", dir.display());
        }
        Ok(sub)
    };
    if sdxl {
        ensure!(
            !index.requires_aesthetics_score.unwrap_or(false),
            "{}: SDXL refiner models (requires_aesthetics_score) are not supported",
            dir.display()
        );
    }
    let mut params = HashMap::new();
    let tokenizer = ClipTokenizer::from_dir(&component("tokenizer")?).context("loading tokenizer/")?;
    let (text_encoder, weights) =
        ClipTextModel::load_with_weights(&component("text_encoder")?, device, kind).context("loading text_encoder/")?;
    params.insert(lora::Component::TextEncoder, weights);
    let text_encoder_2 = if sdxl {
        let tokenizer = ClipTokenizer::from_dir(&component("tokenizer_2")?).context("loading tokenizer_2/")?;
        let (text_encoder, weights) = ClipTextModel::load_with_weights(&component("text_encoder_2")?, device, kind)
            .context("loading text_encoder_2/")?;
        params.insert(lora::Component::TextEncoder2, weights);
        Some(SecondEncoder { tokenizer, text_encoder })
    } else {
        None
    };
    let (unet, weights) =
        UNet2DConditionModel::load_with_weights(&component("unet")?, device, kind).context("loading unet/")?;
    params.insert(lora::Component::Unet, weights);
    let vae_dir = component("vae")?;
    let vae_config = VaeConfig::from_dir(&vae_dir).context("loading vae/")?;
    let vae = match opts.vae {
        None => AutoencoderKl::load(&vae_dir, device, vae_kind(sdxl, &vae_config, kind)).context("loading vae/")?,
        Some(file) => {
            let c = checkpoint::load_vae(file, vae_config.scaling_factor, vae_config.sample_size, device, kind)?;
            vae_from(c, sdxl)?
        }
    };
    let scheduler_config =
        SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json")).context("loading scheduler/")?;
    Ok(Components {
        tokenizer,
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        scheduler_config,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
        params,
    })
}

/// A single-file checkpoint; tokenizers and scheduler from the family's defaults.
fn load_file(path: &Path, opts: &LoadOptions, device: Device, kind: Kind) -> Result<Components> {
    let Converted { family, unet, vae, text_encoders, scheduler, pad_tokens, .. } =
        checkpoint::convert(path, opts, device, kind)?;
    let mut params = HashMap::new();
    let mut encoders =
        text_encoders.into_iter().zip(pad_tokens).zip([lora::Component::TextEncoder, lora::Component::TextEncoder2]);
    let mut encoder = |what: &str| -> Result<Option<(ClipTokenizer, ClipTextModel)>> {
        let Some(((c, pad), part)) = encoders.next() else { return Ok(None) };
        let cfg = ClipTextConfig::from_value(c.config)?;
        let weights = Weights::from_map(c.tensors, device, kind);
        let model = ClipTextModel::new(&weights.root(), &cfg).with_context(|| format!("building the {what}"))?;
        params.insert(part, weights);
        Ok(Some((ClipTokenizer::standard(pad)?, model)))
    };
    let (tokenizer, text_encoder) = encoder("text encoder")?.context("no text encoder")?;
    let text_encoder_2 =
        encoder("second text encoder")?.map(|(tokenizer, text_encoder)| SecondEncoder { tokenizer, text_encoder });
    let unet_cfg = UNetConfig::from_value(unet.config)?;
    let weights = Weights::from_map(unet.tensors, device, kind);
    let unet = UNet2DConditionModel::new(&weights.root(), &unet_cfg).context("building the UNet")?;
    params.insert(lora::Component::Unet, weights);
    Ok(Components {
        tokenizer,
        text_encoder,
        text_encoder_2,
        unet,
        vae: vae_from(vae, family == Family::Sdxl)?,
        scheduler_config: scheduler,
        force_zeros_for_empty_prompt: true,
        params,
    })
}

/// A VAE from converted tensors; SDXL's `force_upcast` VAE in float32 when the rest runs in
/// float16 (the half-rounded weights upcast, as diffusers does at decode time).
fn vae_from(c: Component, sdxl: bool) -> Result<AutoencoderKl> {
    let device_kind = c.tensors.values().next().map(|t| (t.device(), t.kind()));
    let (device, kind) = device_kind.context("the VAE has no tensors")?;
    let cfg = VaeConfig::from_value(c.config)?;
    let kind = vae_kind(sdxl, &cfg, kind);
    let tensors = c.tensors.into_iter().map(|(name, t)| (name, t.to_kind(kind))).collect();
    AutoencoderKl::new(&Weights::from_map(tensors, device, kind).root(), &cfg).context("building the VAE")
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

/// Hands the free memory malloc keeps (see `tune_cpu_allocator`) back to the kernel: after
/// a model is dropped, so that unloading it lowers the process's resident memory.
pub fn release_cpu_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// The prefixes of the tensors a single-file checkpoint's model is built from (UNet, VAE,
/// text encoders); others, such as EMA copies, are not loaded.
const CHECKPOINT_MODEL_PREFIXES: &[&str] =
    &["model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."];

/// The bytes a model's weights will take once loaded as `kind`, from safetensors headers or
/// a `.ckpt`'s pickle alone (no tensor data is read): the component folders `load_folder`
/// reads, or a single file's model tensors. Floating tensors count at `kind`'s width,
/// others as stored.
/// An estimate for deciding what to unload before a first load: a VAE kept in float32 or
/// replaced by `LoadOptions::vae` counts as the model's own VAE in `kind`, and an SD 2.x
/// file's unused last OpenCLIP layer counts too.
pub fn estimate_weight_bytes(path: &Path, kind: Kind) -> Result<u64> {
    let width = kind.elt_size_in_bytes() as u64;
    let count = |header: &checkpoint::safetensors::Header, wanted: &dyn Fn(&str) -> bool| -> u64 {
        header
            .tensors
            .iter()
            .filter(|(name, _)| wanted(name))
            .map(|(_, e)| {
                let elements = e.shape.iter().product::<i64>().max(0) as u64;
                if e.is_float() {
                    elements * width
                } else {
                    (e.end - e.start) as u64
                }
            })
            .sum()
    };
    if path.is_file() {
        let header = checkpoint::read_header(path)?;
        return Ok(count(&header, &|name| CHECKPOINT_MODEL_PREFIXES.iter().any(|p| name.starts_with(p))));
    }
    let mut bytes = 0;
    for component in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        let dir = path.join(component);
        if !dir.is_dir() {
            continue;
        }
        for file in crate::weights::find_weight_files(&dir, kind == Kind::Half)? {
            bytes += count(&checkpoint::safetensors::Header::read(&file)?, &|_| true);
        }
    }
    Ok(bytes)
}

impl StableDiffusion {
    /// Loads a diffusers model folder or a single-file checkpoint (`checkpoint::FILE_EXTENSIONS`).
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
        let components = if path.is_file() {
            load_file(path, opts, device, kind).with_context(|| format!("loading the checkpoint {}", path.display()))?
        } else if path.is_dir() {
            load_folder(path, opts, device, kind)?
        } else {
            bail!("model {} does not exist (expected a diffusers folder or a .safetensors file)", path.display());
        };
        Self::from_components(path, components, device, kind).with_context(|| format!("loading {}", path.display()))
    }

    /// Puts loaded parts together, checking that they fit one another. `dir` names the
    /// model in messages.
    pub fn from_components(dir: &Path, c: Components, device: Device, kind: Kind) -> Result<Self> {
        let family = match &c.text_encoder_2 {
            Some(second) => {
                let (time_dim, pooled) =
                    c.unet.config().text_time_dims(6).context(
                        "an SDXL model needs a UNet with addition_embed_type \"text_time\" (unet/config.json)",
                    )?;
                ensure!(
                    second.text_encoder.projection_dim() == Some(pooled),
                    "the UNet's add_embedding takes 6 time ids × {time_dim} plus a pooled embedding of {pooled}, \
                     but text_encoder_2 pools to {:?} (projection_dim)",
                    second.text_encoder.projection_dim()
                );
                let width = c.text_encoder.hidden_size() + second.text_encoder.hidden_size();
                let cross = match &c.unet.config().cross_attention_dim {
                    PerBlock::One(d) => vec![*d],
                    PerBlock::Each(d) => d.clone(),
                };
                ensure!(
                    cross.iter().all(|&d| d == width),
                    "the UNet attends to {cross:?} features (cross_attention_dim) but the two text encoders give {width}"
                );
                Family::Sdxl
            }
            None => {
                ensure!(
                    c.unet.config().addition_embed_type.is_none(),
                    "the UNet has added conditioning (addition_embed_type) but the folder has no text_encoder_2/"
                );
                Family::single_encoder(c.text_encoder.hidden_size(), c.scheduler_config.prediction_type.as_deref())
            }
        };
        let mut param_index = ParamIndex::default();
        for (component, weights) in &c.params {
            param_index.add_weights(*component, weights);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer: c.tokenizer,
            text_encoder: c.text_encoder,
            text_encoder_2: c.text_encoder_2,
            unet: c.unet,
            vae: c.vae,
            scheduler_config: c.scheduler_config,
            device,
            kind,
            force_zeros_for_empty_prompt: c.force_zeros_for_empty_prompt,
            family,
            prompt_cache: Mutex::new(Vec::new()),
            params: c.params,
            param_index,
            loras: AppliedLoras::default(),
        })
    }

    pub fn family(&self) -> Family {
        self.family
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
    pub fn param(&self, component: lora::Component, name: &str) -> Option<Tensor> {
        self.params.get(&component)?.tensor(name)
    }

    /// Bytes of the model's weight tensors (UNet, VAE, text encoders) as loaded on its
    /// device: what it holds while loaded, apart from activations and caches.
    pub fn weight_bytes(&self) -> u64 {
        self.params.values().map(Weights::bytes).sum::<u64>() + self.vae.weight_bytes()
    }

    /// The names and shapes of the parameters LoRAs may change.
    pub fn param_index(&self) -> &ParamIndex {
        &self.param_index
    }

    /// Pixels per latent element along each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.config().scale_factor()
    }

    /// The size the model was trained at, (width, height) in pixels: the UNet's
    /// sample_size × the VAE's scale factor (512 for SD 1.x, 1024 for SDXL).
    pub fn native_size(&self) -> (i64, i64) {
        let (h, w) = self.unet.config().sample_size().unwrap_or((64, 64));
        let f = self.vae_scale_factor();
        (w * f, h * f)
    }

    /// The text encoder's output for one prompt, [1, 77, D]: the UNet's encoder hidden
    /// states (SD 1.x/2.x: the last hidden state; SDXL: both encoders' penultimate hidden
    /// states, concatenated).
    pub fn encode_prompt(&self, prompt: &str) -> Tensor {
        self.encode_prompts(&[prompt])
    }

    /// The same for several prompts, [prompts, 77, D] in order.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Tensor {
        self.encode_prompts_pooled(prompts).0
    }

    /// The encoder hidden states of `prompts` [prompts, 77, D] and, for SDXL, their pooled
    /// embeddings [prompts, P]. Prompts encoded recently (the same token ids) are taken
    /// from a small cache: jobs often repeat a prompt with other seeds or settings, and
    /// most share the negative prompt. The others go through the text encoder(s) in one
    /// batch (the negative and positive prompt of classifier-free guidance together). Each
    /// row depends only on its own prompt, so caching and batching give the same values as
    /// encoding each prompt alone.
    pub fn encode_prompts_pooled(&self, prompts: &[&str]) -> (Tensor, Option<Tensor>) {
        assert!(!prompts.is_empty(), "encode_prompts needs at least one prompt");
        let ids: Vec<Vec<i64>> = prompts.iter().map(|p| self.cache_key(p)).collect();
        let mut cache = self.prompt_cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut rows: Vec<Option<Encoded>> =
            ids.iter().map(|key| cache.iter().find(|(k, _)| k == key).map(|(_, e)| e.shallow_clone())).collect();
        let mut missing: Vec<&Vec<i64>> = Vec::new();
        for (key, row) in ids.iter().zip(&rows) {
            if row.is_none() && !missing.contains(&key) {
                missing.push(key);
            }
        }
        if !missing.is_empty() {
            let encoded = self.run_text_encoders(&missing);
            for (i, key) in missing.iter().enumerate() {
                let row = |t: &Tensor| t.narrow(0, i as i64, 1).contiguous();
                let entry = Encoded { states: row(&encoded.states), pooled: encoded.pooled.as_ref().map(row) };
                for (k, slot) in ids.iter().zip(rows.iter_mut()) {
                    if k == *key && slot.is_none() {
                        *slot = Some(entry.shallow_clone());
                    }
                }
                cache.push(((*key).clone(), entry));
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
        // Fresh tensors, so that callers may modify them without touching the cache.
        let rows: Vec<Encoded> = rows.into_iter().map(|r| r.expect("every prompt encoded")).collect();
        let states = Tensor::cat(&rows.iter().map(|r| &r.states).collect::<Vec<_>>(), 0);
        let pooled: Option<Vec<&Tensor>> = rows.iter().map(|r| r.pooled.as_ref()).collect();
        (states, pooled.map(|p| Tensor::cat(&p, 0)))
    }

    /// What a job's UNet calls attend to: the prompt's conditioning, after the negative
    /// prompt's when `negative_prompt` is given (classifier-free guidance), with SDXL's
    /// pooled embeddings and time ids from `size`. SDXL with `force_zeros_for_empty_prompt`
    /// takes an empty negative prompt as zeros, as diffusers does for an absent one.
    pub fn text_context(&self, prompt: &str, negative_prompt: Option<&str>, size: &SizeConditioning) -> CrossContext {
        let prompts: Vec<&str> = negative_prompt.into_iter().chain([prompt]).collect();
        let (states, pooled) = self.encode_prompts_pooled(&prompts);
        let Some(pooled) = pooled else { return CrossContext::new(&states) };
        if negative_prompt == Some("") && self.force_zeros_for_empty_prompt {
            let _ = states.narrow(0, 0, 1).zero_();
            let _ = pooled.narrow(0, 0, 1).zero_();
        }
        let rows = prompts.len() as i64;
        let time_ids = Tensor::from_slice(&size.time_ids())
            .reshape([1, 6])
            .repeat([rows, 1])
            .to_device(self.device)
            .to_kind(self.kind);
        CrossContext::with_added(&states, AddedCond { text_embeds: pooled, time_ids })
    }

    /// The prompt cache's key: the token ids of each tokenizer.
    fn cache_key(&self, prompt: &str) -> Vec<i64> {
        let mut ids = self.tokenizer.encode_padded(prompt);
        if let Some(second) = &self.text_encoder_2 {
            ids.extend(second.tokenizer.encode_padded(prompt));
        }
        ids
    }

    /// Runs the text encoder(s) on a batch of cache keys.
    fn run_text_encoders(&self, keys: &[&Vec<i64>]) -> Encoded {
        let len = self.tokenizer.max_length();
        let batch = |range: std::ops::Range<usize>| {
            let rows: Vec<Tensor> = keys.iter().map(|k| Tensor::from_slice(&k[range.clone()])).collect();
            Tensor::stack(&rows, 0).to_device(self.device)
        };
        match &self.text_encoder_2 {
            None => Encoded { states: self.text_encoder.forward(&batch(0..len)).to_kind(self.kind), pooled: None },
            Some(second) => {
                let len_2 = second.tokenizer.max_length();
                let first = self.text_encoder.forward_penultimate(&batch(0..len), false);
                let other = second.text_encoder.forward_penultimate(&batch(len..len + len_2), true);
                Encoded {
                    states: Tensor::cat(&[first.hidden, other.hidden], -1).to_kind(self.kind),
                    pooled: other.pooled.map(|p| p.to_kind(self.kind)),
                }
            }
        }
    }
}

/// The dtype the VAE runs in: SDXL pipelines run a `force_upcast` VAE in float32 when the
/// model runs in float16; SD 1.x/2.x pipelines keep the model's dtype.
pub fn vae_kind(sdxl: bool, config: &VaeConfig, kind: Kind) -> Kind {
    if sdxl && config.force_upcast && kind == Kind::Half {
        Kind::Float
    } else {
        kind
    }
}
