//! Single-file checkpoints in the original Stable Diffusion layout (as A1111 and ComfyUI
//! keep them): the family detected from tensor names and shapes, each component's
//! diffusers config derived from shapes and the family's defaults, and the tensors renamed
//! to diffusers' names while they are read, one at a time, from the memory-mapped file.
//! `.safetensors` files and zip `torch.save` checkpoints (`.ckpt`, `.pt`, `.pth`, indexed
//! without unpickling by [`torch_file`]) are read alike.
pub mod convert_clip;
pub mod convert_unet;
pub mod convert_vae;
pub mod detect;
pub mod plan;
pub mod safetensors;
pub mod torch_file;

use crate::schedulers::{PredictionType, SchedulerConfig};
use crate::vae::VaeConfig;
use anyhow::{bail, Context, Result};
use plan::Plan;
use safetensors::{Header, MappedFile};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub use crate::model::Family;

/// What a single file leaves to its family's published defaults.
impl Family {
    /// What the file cannot tell: SD 2.x files are taken as the 768 px v-prediction model
    /// (stable-diffusion-2-1), as diffusers' single-file loader does without a config.
    pub fn default_prediction(self) -> PredictionType {
        match self {
            Self::Sd2 => PredictionType::VPrediction,
            Self::Sd1 | Self::Sdxl => PredictionType::Epsilon,
        }
    }

    /// The prediction type of a file of this family: `requested` if given; otherwise
    /// diffusers' heuristic, under which an SD 2.x file saved at `global_step` 875000 is the
    /// ε base model and any other is v-prediction.
    pub fn prediction(self, h: &Header, requested: Option<PredictionType>) -> Result<PredictionType> {
        if let Some(p) = requested {
            return Ok(p);
        }
        if self == Self::Sd2 && h.read_int("global_step")? == Some(875_000) {
            return Ok(PredictionType::Epsilon);
        }
        Ok(self.default_prediction())
    }

    /// Native image side in pixels; SD 2.x's ε models are the 512 px base models.
    pub fn native_size(self, prediction: Option<PredictionType>) -> i64 {
        match (self, prediction.unwrap_or(self.default_prediction())) {
            (Self::Sd1, _) | (Self::Sd2, PredictionType::Epsilon) => 512,
            (Self::Sd2, _) => 768,
            (Self::Sdxl, _) => 1024,
        }
    }

    /// The VAE latent scale of the family's published configs.
    pub fn vae_scaling_factor(self) -> f64 {
        match self {
            Self::Sd1 | Self::Sd2 => 0.18215,
            Self::Sdxl => 0.13025,
        }
    }

    /// Each text encoder's tokenizer pad token: CLIP-L's tokenizer pads with
    /// `<|endoftext|>`, the OpenCLIP ones (SD 2.x, SDXL's second) with "!".
    pub fn pad_tokens(self) -> &'static [&'static str] {
        match self {
            Self::Sd1 => &["<|endoftext|>"],
            Self::Sd2 => &["!"],
            Self::Sdxl => &["<|endoftext|>", "!"],
        }
    }

    /// The scheduler_config.json of the family's reference diffusers repository
    /// (stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0).
    pub fn scheduler_config(self, prediction: PredictionType) -> Result<SchedulerConfig> {
        let prediction = prediction.name();
        let mut cfg = json!({
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "clip_sample": false,
            "prediction_type": prediction,
        });
        let class = match self {
            Self::Sd1 => "PNDMScheduler",
            Self::Sd2 => "DDIMScheduler",
            Self::Sdxl => {
                cfg["interpolation_type"] = json!("linear");
                cfg["timestep_spacing"] = json!("leading");
                cfg["use_karras_sigmas"] = json!(false);
                "EulerDiscreteScheduler"
            }
        };
        cfg["_class_name"] = json!(class);
        SchedulerConfig::from_json(&cfg.to_string())
    }

    /// Width of SDXL's pooled text embedding (the second encoder's projection).
    fn pooled_dim(self, h: &Header) -> Result<i64> {
        let name = format!("{}text_projection", detect::OPEN_CLIP_SDXL);
        h.shape(&name).and_then(|s| s.get(1).copied()).with_context(|| format!("{}: no `{name}`", h.path.display()))
    }
}

/// How to read a single file.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions<'a> {
    /// Overrides the family's default prediction type (SD 2.x base models are ε).
    pub prediction: Option<PredictionType>,
    /// A VAE file used instead of the one baked into the checkpoint.
    pub vae: Option<&'a Path>,
}

/// What the header of a checkpoint says, without reading any tensor.
#[derive(Clone, Debug)]
pub struct Info {
    pub family: Family,
    pub prediction: PredictionType,
    pub native_size: i64,
    /// Pixels per latent along each side (width and height must be multiples of it).
    pub vae_scale_factor: i64,
    /// The file carries its own VAE.
    pub has_vae: bool,
}

/// One component: its diffusers config.json and its tensors by diffusers name.
pub struct Component {
    pub config: Value,
    pub tensors: HashMap<String, Tensor>,
}

/// A checkpoint converted to diffusers' components.
pub struct Converted {
    pub family: Family,
    pub prediction: PredictionType,
    pub unet: Component,
    pub vae: Component,
    /// CLIP-L for SD 1.x; OpenCLIP ViT-H for SD 2.x; CLIP-L then OpenCLIP bigG for SDXL.
    pub text_encoders: Vec<Component>,
    pub scheduler: SchedulerConfig,
    /// The pad token of each text encoder's tokenizer (`ClipTokenizer::standard`).
    pub pad_tokens: Vec<&'static str>,
}

/// The extensions of single-file checkpoints: safetensors first, then `torch.save`'s.
pub const FILE_EXTENSIONS: &[&str] = &["safetensors", "ckpt", "pt", "pth"];

/// How to turn a pickled checkpoint this reader refuses into a `.safetensors` file.
pub const CONVERT_HINT: &str = "To use it, convert it to .safetensors once, in Python, if you trust the file: \
     `import torch, safetensors.torch as st; sd = torch.load(\"model.ckpt\", weights_only=True); \
     sd = sd.get(\"state_dict\", sd); st.save_file({k: v.contiguous().clone() for k, v in sd.items() \
     if isinstance(v, torch.Tensor)}, \"model.safetensors\")`";

/// The header of a single-file checkpoint: a `.safetensors` file's, or the index of a zip
/// `torch.save` checkpoint's pickle (read without running it).
pub fn read_header(path: &Path) -> Result<Header> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => Header::read(path),
        "ckpt" | "pt" | "pth" | "bin" => torch_file::header(path),
        _ => bail!("{} is not a checkpoint file (.safetensors, .ckpt, .pt, .pth or .bin)", path.display()),
    }
}

/// A single-file checkpoint, memory-mapped.
fn open(path: &Path) -> Result<MappedFile> {
    MappedFile::map(read_header(path)?)
}

/// Detects the family of a checkpoint from its header.
pub fn inspect(path: &Path, prediction: Option<PredictionType>) -> Result<Info> {
    let h = read_header(path)?;
    let family = detect::detect(&h)?;
    let prediction = family.prediction(&h, prediction)?;
    let layout = convert_vae::locate(&h);
    let scale = match &layout {
        Some(l) => VaeConfig::from_value(convert_vae::config(&h, l, family.vae_scaling_factor(), 0)?)?.scale_factor(),
        None => 8,
    };
    Ok(Info {
        family,
        prediction,
        native_size: family.native_size(Some(prediction)),
        vae_scale_factor: scale,
        has_vae: layout.is_some(),
    })
}

/// Reads a checkpoint's components, each tensor converted to `kind` on `device` as it is read.
pub fn convert(path: &Path, opts: &LoadOptions, device: Device, kind: Kind) -> Result<Converted> {
    let file = open(path)?;
    let h = &file.header;
    let family = detect::detect(h)?;
    let prediction = family.prediction(h, opts.prediction)?;
    let native = family.native_size(Some(prediction));

    let (unet_plan, text_plans) = plans(h, family)?;
    let unet_config = convert_unet::config(h, family)?;
    let vae = match opts.vae {
        Some(vae_path) => load_vae(vae_path, family.vae_scaling_factor(), native, device, kind)?,
        None => read_vae(&file, family, native, device, kind)?,
    };
    // The UNet's native latent size follows the prediction type (SD 2.x base: 512 px).
    let mut unet_config = unet_config;
    let scale = VaeConfig::from_value(vae.config.clone())?.scale_factor();
    unet_config["sample_size"] = json!(native / scale);
    let unet = Component { config: unet_config, tensors: unet_plan.load(&file, device, kind)? };
    let text_encoders = text_plans
        .into_iter()
        .map(|(config, plan)| Ok(Component { config, tensors: plan.load(&file, device, kind)? }))
        .collect::<Result<_>>()?;
    Ok(Converted {
        family,
        prediction,
        unet,
        vae,
        text_encoders,
        scheduler: family.scheduler_config(prediction)?,
        pad_tokens: family.pad_tokens().to_vec(),
    })
}

/// The conversion plans of the UNet and of each text encoder (with its config).
fn plans(h: &Header, family: Family) -> Result<(Plan, Vec<(Value, Plan)>)> {
    let text = match family {
        Family::Sd1 => vec![convert_clip::clip(h, detect::CLIP_SD1)?],
        Family::Sd2 => vec![convert_clip::open_clip(h, detect::OPEN_CLIP_SD2, true)?],
        Family::Sdxl => {
            vec![convert_clip::clip(h, detect::CLIP_SDXL)?, convert_clip::open_clip(h, detect::OPEN_CLIP_SDXL, false)?]
        }
    };
    Ok((convert_unet::plan(h)?, text))
}

/// Diffusers parameter names with their shapes.
pub type Shapes = Vec<(String, Vec<i64>)>;

/// The diffusers names and shapes a checkpoint's UNet and text encoders convert to, from
/// its header alone: the UNet's, then each text encoder's (SDXL: CLIP-L, then bigG).
pub fn parameter_shapes(path: &Path) -> Result<Vec<Shapes>> {
    let h = read_header(path)?;
    let (unet, text) = plans(&h, detect::detect(&h)?)?;
    std::iter::once(&unet).chain(text.iter().map(|(_, plan)| plan)).map(|plan| plan.shapes(&h)).collect()
}

/// A standalone VAE file (original layout, with or without `first_stage_model.`, or
/// diffusers' layout), with the scaling factor and sample size of the model it serves.
pub fn load_vae(path: &Path, scaling_factor: f64, sample_size: i64, device: Device, kind: Kind) -> Result<Component> {
    let file = open(path)?;
    read_vae_scaled(&file, scaling_factor, sample_size, device, kind)
        .with_context(|| format!("loading the VAE {}", path.display()))
}

fn read_vae(file: &MappedFile, family: Family, native: i64, device: Device, kind: Kind) -> Result<Component> {
    if convert_vae::locate(&file.header).is_none() {
        bail!("{} has no VAE (no first_stage_model.* tensors); pass a VAE file with --vae", file.header.path.display());
    }
    read_vae_scaled(file, family.vae_scaling_factor(), native, device, kind)
}

fn read_vae_scaled(file: &MappedFile, scaling: f64, sample_size: i64, device: Device, kind: Kind) -> Result<Component> {
    let h = &file.header;
    let layout = convert_vae::locate(h).with_context(|| format!("{} holds no VAE", h.path.display()))?;
    let config = convert_vae::config(h, &layout, scaling, sample_size)?;
    let plan = convert_vae::plan(h, &layout)?;
    Ok(Component { config, tensors: plan.load(file, device, kind)? })
}
