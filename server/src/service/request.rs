//! GenerateRequest → a validated job: defaults from the proto filled in, every field
//! checked before the job is queued, so bad input costs no engine time and gets
//! INVALID_ARGUMENT (or NOT_FOUND / UNIMPLEMENTED) with a message a person can act on.
use super::models::{Catalog, ModelMeta};
use super::Limits;
use crate::engine::image_io;
use crate::engine::pipeline::{img2img_start, GenerateParams};
use crate::engine::schedulers::SchedulerKind;
use frisket_proto::v1::{ExplainMode, GenerateRequest, ImageFormat, PreviewMethod};
use image::{GrayImage, RgbImage};
use tonic::Status;

pub const DEFAULT_STEPS: u32 = 20;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
pub const MAX_GUIDANCE: f64 = 50.0;
pub const DEFAULT_STRENGTH: f64 = 0.8;
pub const DEFAULT_SCHEDULER: &str = "ddim";
/// Bytes of prompt text accepted (the tokenizer keeps 75 tokens anyway).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
pub const MAX_JOB_ID_BYTES: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Approx,
    Vae,
}

#[derive(Clone, Debug)]
pub struct PreviewSpec {
    /// ≥ 1.
    pub every: usize,
    pub format: Format,
    /// Longest side; 0 = no limit.
    pub max_size: u32,
    pub method: Method,
}

/// A job as the engine runs it. Holds no tensors (those are made on the engine thread).
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub meta: ModelMeta,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// As requested (normalised), e.g. "dpm++-karras".
    pub scheduler_name: String,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub width: u32,
    pub height: u32,
    /// img2img: the reference, already resized to (width, height) as `render` does.
    pub reference: Option<RgbImage>,
    pub strength: f64,
    pub previews: Option<PreviewSpec>,
    /// Latent every N steps (≥ 1).
    pub latents_every: Option<usize>,
}

impl JobSpec {
    /// The engine's parameters; builds the reference tensor exactly as `frisket-server render`.
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            karras: self.karras,
            width: self.width as i64,
            height: self.height as i64,
            reference: self.reference.as_ref().map(image_io::rgb_to_tensor),
            strength: self.strength,
            ..Default::default()
        }
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// Decodes PNG/JPEG bytes with dimension and allocation limits (a small file must not
/// expand into gigabytes). Same pixels as `image_io::decode_rgb`.
fn decode_limited(bytes: &[u8], max_side: u32) -> Result<image::DynamicImage, String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => format!("larger than {max_side}×{max_side} pixels"),
        image::ImageError::Unsupported(_) => "not a PNG or JPEG image".to_string(),
        other => other.to_string(),
    })
}

/// Validates `req` against the model and limits. Blocking (decodes images, reads configs).
pub fn prepare(req: &GenerateRequest, catalog: &Catalog, limits: &Limits, random_seed: u64) -> Result<JobSpec, Status> {
    // Features of the next issue: refuse clearly rather than ignore.
    if let Some(explain) = &req.explain {
        if explain.mode != ExplainMode::Off as i32 {
            return Err(Status::unimplemented("explain (Grad-SAM latent manipulation) is not implemented by this server yet"));
        }
    }
    if let Some(ex) = req.stream.as_ref().and_then(|s| s.explain.as_ref()) {
        if ex.masks || ex.heatmaps {
            return Err(Status::unimplemented("stream.explain masks/heatmaps are not implemented by this server yet"));
        }
    }
    if req.job_id.len() > MAX_JOB_ID_BYTES || req.job_id.chars().any(|c| c.is_control()) {
        return Err(invalid(format!("job_id must be at most {MAX_JOB_ID_BYTES} bytes of printable text")));
    }

    let meta = catalog.meta(&req.model)?;
    let scheduler_name = if req.scheduler.is_empty() { DEFAULT_SCHEDULER } else { req.scheduler.as_str() };
    let (scheduler, karras) = SchedulerKind::parse_with_karras(scheduler_name).map_err(|e| invalid(format!("{e:#}")))?;

    let steps = req.steps.unwrap_or(DEFAULT_STEPS);
    if steps == 0 {
        return Err(invalid("steps must be at least 1".to_string()));
    }
    if steps > limits.max_steps {
        return Err(invalid(format!("steps {steps} is more than this server's limit of {}", limits.max_steps)));
    }
    let guidance = req.guidance.unwrap_or(DEFAULT_GUIDANCE);
    if !guidance.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&guidance) {
        return Err(invalid(format!("guidance must be between 0 and {MAX_GUIDANCE} (1 or less disables it), got {guidance}")));
    }
    if req.prompt.len() > MAX_PROMPT_BYTES || req.negative_prompt.len() > MAX_PROMPT_BYTES {
        return Err(invalid(format!("prompt and negative_prompt are limited to {MAX_PROMPT_BYTES} bytes")));
    }

    let img2img = !req.reference_image.is_empty();
    if !img2img && req.prompt.trim().is_empty() {
        return Err(invalid("prompt is required for txt2img (no reference_image given)"));
    }
    let strength = req.strength.unwrap_or(DEFAULT_STRENGTH);
    if req.strength.is_some() && (!strength.is_finite() || strength <= 0.0 || strength > 1.0) {
        return Err(invalid(format!("strength must be in (0, 1], got {strength}")));
    }

    let reference = if img2img {
        let img = decode_limited(&req.reference_image, limits.max_side)
            .map_err(|e| invalid(format!("reference_image is not a usable PNG or JPEG image: {e}")))?
            .to_rgb8();
        Some(img)
    } else {
        None
    };
    if !req.protected_mask.is_empty() {
        let Some(reference) = &reference else {
            return Err(invalid("protected_mask needs a reference_image (img2img)"));
        };
        let mask: GrayImage = decode_limited(&req.protected_mask, limits.max_side)
            .map_err(|e| invalid(format!("protected_mask is not a usable greyscale PNG: {e}")))?
            .to_luma8();
        if mask.dimensions() != reference.dimensions() {
            return Err(invalid(format!(
                "protected_mask is {}×{} but reference_image is {}×{}; they must be the same size",
                mask.width(),
                mask.height(),
                reference.width(),
                reference.height()
            )));
        }
        return Err(Status::unimplemented("protected_mask (protected regions) is not implemented by this server yet"));
    }

    let width = match (req.width, &reference) {
        (0, Some(r)) => r.width(),
        (0, None) => meta.native_width,
        (w, _) => w,
    };
    let height = match (req.height, &reference) {
        (0, Some(r)) => r.height(),
        (0, None) => meta.native_height,
        (h, _) => h,
    };
    let m = meta.size_multiple.max(1);
    if width % m != 0 || height % m != 0 {
        return Err(invalid(format!(
            "width and height must be multiples of {m} for model {:?}, got {width}×{height}",
            meta.name
        )));
    }
    if width > limits.max_side || height > limits.max_side || (width as u64) * (height as u64) > limits.max_pixels as u64 {
        return Err(invalid(format!(
            "{width}×{height} is too large: this server allows at most {} pixels and {} per side",
            limits.max_pixels, limits.max_side
        )));
    }
    let reference = reference.map(|img| {
        if img.dimensions() == (width, height) {
            img
        } else {
            image::imageops::resize(&img, width, height, image::imageops::FilterType::Lanczos3)
        }
    });
    if img2img && img2img_start(steps as usize, strength, 1) >= steps as usize {
        return Err(invalid(format!(
            "strength {strength} with {steps} steps leaves no step to run: raise strength or steps"
        )));
    }

    let stream = req.stream.unwrap_or_default();
    let previews = match stream.previews {
        Some(p) if p.enabled => Some(PreviewSpec {
            every: p.every.max(1) as usize,
            format: match ImageFormat::try_from(p.format) {
                Ok(ImageFormat::Png) => Format::Png,
                Ok(ImageFormat::Jpeg) => Format::Jpeg,
                Err(_) => return Err(invalid(format!("unknown stream.previews.format {}", p.format))),
            },
            max_size: p.max_size,
            method: match PreviewMethod::try_from(p.method) {
                Ok(PreviewMethod::Approx) => Method::Approx,
                Ok(PreviewMethod::Vae) => Method::Vae,
                Err(_) => return Err(invalid(format!("unknown stream.previews.method {}", p.method))),
            },
        }),
        _ => None,
    };
    let latents_every = stream.latents.filter(|l| l.enabled).map(|l| l.every.max(1) as usize);

    Ok(JobSpec {
        meta,
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        seed: req.seed.unwrap_or(random_seed),
        steps: steps as usize,
        guidance,
        scheduler_name: scheduler_name.to_string(),
        scheduler,
        karras,
        width,
        height,
        reference,
        strength,
        previews,
        latents_every,
    })
}

/// A seed for requests without one: 53 bits (exact in a JSON / JavaScript number).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() & ((1u64 << 53) - 1)
}
