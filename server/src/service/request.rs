//! GenerateRequest → a validated job: defaults from the proto filled in, every field
//! checked before the job is queued, so bad input costs no engine time and gets
//! INVALID_ARGUMENT (or NOT_FOUND) with a message a person can act on.
pub use super::encoded_image::EncodedImage;
use super::loras::{self, JobLora};
use super::models::{Catalog, ModelMeta};
use super::Limits;
use frisket_engine::explain::{self, ExplainMode, ExplainParams, LayerChoice, MaskParams, SubjectSpec};
use frisket_engine::image_io;
use frisket_engine::model::Family;
use frisket_engine::pipeline::{self, defaults, GenerateParams, StartMode};
use frisket_engine::protect::{self, ProtectParams, MAX_FEATHER};
use frisket_engine::schedulers::SchedulerKind;
use frisket_engine::tch;
use frisket_engine::text::quote;
use frisket_proto::limits::{output_size, Work, MASK_UNUSABLE, REFERENCE_UNUSABLE};
use frisket_proto::v1::{self as pb, GenerateRequest, ImageFormat, PreviewMethod};
use image::GrayImage;
use tonic::Status;

pub const MAX_GUIDANCE: f64 = 50.0;
pub const MAX_JOB_ID_BYTES: usize = 128;
/// Largest exact-mode batch (latent elements per backward pass) a request may ask for.
pub const MAX_EXACT_BATCH: u32 = 256;

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
    /// img2img: the reference as sent (decoded and resized to (width, height) by `params`,
    /// when the job is about to run).
    pub reference: Option<EncodedImage>,
    pub strength: f64,
    pub previews: Option<PreviewSpec>,
    /// Latent every N steps (≥ 1).
    pub latents_every: Option<usize>,
    /// img2img: SDEdit from the reference (default) or pure noise at the start timestep.
    pub start: StartMode,
    /// Grad-SAM, validated as far as possible without the model (subject words, token
    /// positions, layer syntax, mask parameters, timesteps against the schedule).
    pub explain: Option<ExplainParams>,
    /// The protected region, at the output size, checked (not blank, not full).
    pub protect: Option<ProtectSpec>,
    /// Which mask / heatmap events to stream.
    pub explain_stream: ExplainStream,
    /// LoRAs to merge for this job (names known, weights in range; fit checked on the
    /// engine thread).
    pub loras: Vec<JobLora>,
    /// SDXL: (width, height) before cropping (None: the output size) and the crop's
    /// (top, left) (None: the engine's default).
    pub original_size: Option<(u32, u32)>,
    pub crop_top_left: Option<(u32, u32)>,
}

#[derive(Clone, Debug)]
pub struct ProtectSpec {
    /// Non-zero = protected; the reference's size or the output's (checked).
    pub mask: EncodedImage,
    pub feather: u32,
}

/// Admission decodes protected masks to check them: one request at a time, so that many
/// requests at once cannot each hold a decoded mask.
static MASK_CHECKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Which Grad-SAM / protection events a job streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExplainStream {
    pub masks: bool,
    pub heatmaps: bool,
}

impl JobSpec {
    /// The engine's parameters, decoding the reference (resized to the output size) and
    /// the protected region: call when the job is about to run. INVALID_ARGUMENT when an
    /// image's data is not what its header said.
    pub fn params(&self) -> Result<GenerateParams, Status> {
        let (width, height) = (self.width, self.height);
        let reference = match &self.reference {
            Some(r) => {
                let img = r.decode().map_err(|e| invalid(format!("{REFERENCE_UNUSABLE}: {e}")))?.to_rgb8();
                Some(if img.dimensions() == (width, height) {
                    img
                } else {
                    image::imageops::resize(&img, width, height, image::imageops::FilterType::Lanczos3)
                })
            }
            None => None,
        };
        let protect = match &self.protect {
            Some(p) => Some(ProtectParams { mask: mask_tensor(&p.decode_at(width, height)?), feather: p.feather }),
            None => None,
        };
        Ok(GenerateParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            karras: self.karras,
            width: self.width as i64,
            height: self.height as i64,
            reference: reference.as_ref().map(image_io::rgb_to_tensor),
            strength: self.strength,
            start: self.start,
            explain: self.explain.clone(),
            protect,
            original_size: self.original_size.map(|(w, h)| (w as i64, h as i64)),
            crop_top_left: self.crop_top_left.map_or(defaults::CROP_TOP_LEFT, |(t, l)| (t as i64, l as i64)),
        })
    }
}

impl ProtectSpec {
    /// The mask at the output size (the reference's size is resized conservatively: an
    /// output pixel is protected when any source pixel it covers is).
    fn decode_at(&self, width: u32, height: u32) -> Result<GrayImage, Status> {
        let mask = self.mask.decode().map_err(|e| invalid(format!("{MASK_UNUSABLE}: {e}")))?.to_luma8();
        Ok(if mask.dimensions() == (width, height) { mask } else { resize_mask_conservative(&mask, width, height) })
    }
}

/// An 8-bit mask as the [H, W] uint8 tensor `frisket-server render` builds from its file.
fn mask_tensor(mask: &GrayImage) -> tch::Tensor {
    let (w, h) = mask.dimensions();
    tch::Tensor::from_slice(mask.as_raw()).reshape([h as i64, w as i64])
}

/// Resizes a protect mask conservatively: an output pixel is protected when any source
/// pixel it covers (even partly) is.
fn resize_mask_conservative(mask: &GrayImage, width: u32, height: u32) -> GrayImage {
    let (sw, sh) = mask.dimensions();
    // Source pixels [lo, hi) covered by output pixel i of n over a source of size s.
    let span = |i: u32, n: u32, s: u32| -> (u32, u32) {
        let lo = (i as u64 * s as u64 / n as u64) as u32;
        let hi = ((i as u64 + 1) * s as u64).div_ceil(n as u64) as u32;
        (lo, hi.max(lo + 1).min(s))
    };
    GrayImage::from_fn(width, height, |x, y| {
        let (x0, x1) = span(x, width, sw);
        let (y0, y1) = span(y, height, sh);
        let any = (y0..y1).any(|sy| (x0..x1).any(|sx| mask.get_pixel(sx, sy)[0] != 0));
        image::Luma([if any { 255 } else { 0 }])
    })
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// A job id (chosen by the client in Generate, named in Cancel): 1 to `MAX_JOB_ID_BYTES`
/// bytes of ASCII letters, digits and `-_.:`, so it is safe in logs, file names and URLs.
pub fn check_job_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= MAX_JOB_ID_BYTES
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "job_id {} must be 1 to {MAX_JOB_ID_BYTES} bytes of ASCII letters, digits and -_.:",
            quote(id)
        )))
    }
}

/// Validates `req` against the model and limits. Blocking (decodes images, reads configs).
pub fn prepare(req: &GenerateRequest, catalog: &Catalog, limits: &Limits, random_seed: u64) -> Result<JobSpec, Status> {
    let req = &*defaults::with_preset(req)?;
    if !req.job_id.is_empty() {
        check_job_id(&req.job_id)?;
    }

    let meta = catalog.meta(&req.model)?;
    let scheduler_name = if req.scheduler.is_empty() { defaults::SCHEDULER } else { req.scheduler.as_str() };
    let (scheduler, karras) =
        SchedulerKind::parse_with_karras(scheduler_name).map_err(|e| invalid(format!("{e:#}")))?;

    let steps = req.steps.unwrap_or(defaults::STEPS as u32);
    if steps == 0 {
        return Err(invalid("steps must be at least 1".to_string()));
    }
    limits.check_steps(steps)?;
    limits.check_images(defaults::num_images(req))?;
    let guidance = req.guidance.unwrap_or(defaults::GUIDANCE);
    if !guidance.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&guidance) {
        return Err(invalid(format!(
            "guidance must be between 0 and {MAX_GUIDANCE} (1 or less disables it), got {guidance}"
        )));
    }
    limits.check_prompts(&req.prompt, &req.negative_prompt)?;

    let img2img = !req.reference_image.is_empty();
    if !img2img && req.prompt.trim().is_empty() {
        return Err(invalid("prompt is required for txt2img (no reference_image given)"));
    }
    let strength = req.strength.unwrap_or(defaults::STRENGTH);
    if req.strength.is_some() && (!strength.is_finite() || strength <= 0.0 || strength > 1.0) {
        return Err(invalid(format!("strength must be in (0, 1], got {strength}")));
    }

    let reference = if img2img {
        Some(EncodedImage::new(&req.reference_image, limits.reference_size(&req.reference_image)?))
    } else {
        None
    };
    let protect_mask = if req.protected_mask.is_empty() {
        None
    } else {
        if reference.is_none() {
            return Err(invalid("protected_mask needs a reference_image (img2img)"));
        }
        Some(EncodedImage::new(&req.protected_mask, limits.mask_size(&req.protected_mask)?))
    };
    let options = req.explain.clone().unwrap_or_default();
    let start = match pb::StartMode::try_from(options.start.unwrap_or_default()) {
        Ok(pb::StartMode::Reference) => StartMode::Reference,
        Ok(pb::StartMode::Noise) => StartMode::Noise,
        Err(_) => {
            return Err(invalid(format!(
                "unknown explain.start {} (expected REFERENCE or NOISE)",
                options.start.unwrap_or_default()
            )))
        }
    };
    if start == StartMode::Noise && reference.is_none() {
        return Err(invalid("explain.start NOISE needs a reference_image (img2img)"));
    }
    if options.protect_feather > 0 && protect_mask.is_none() {
        return Err(invalid("explain.protect_feather needs a protected_mask"));
    }
    if options.protect_feather > MAX_FEATHER {
        return Err(invalid(format!(
            "explain.protect_feather {} is too wide (at most {MAX_FEATHER} pixels)",
            options.protect_feather
        )));
    }

    let (width, height) =
        output_size(req, reference.as_ref().map(|r| (r.width, r.height)), (meta.native_width, meta.native_height));
    let m = meta.size_multiple.max(1);
    if width % m != 0 || height % m != 0 {
        return Err(invalid(format!(
            "width and height must be multiples of {m} for model {:?}, got {width}×{height}",
            meta.name
        )));
    }
    limits.check_output_size(width, height)?;
    let req_reference_size = reference.as_ref().map(|r| (r.width, r.height));
    // The index of the first step that runs (img2img starts partway).
    let first = if img2img { pipeline::img2img_start(steps as usize, strength, 1) } else { 0 };
    if first >= steps as usize {
        return Err(invalid(format!(
            "strength {strength} with {steps} steps leaves no step to run: raise strength or steps"
        )));
    }

    let protect = match protect_mask {
        None => None,
        Some(mask) => {
            let source = req_reference_size.expect("a protected_mask comes with a reference");
            let size = (mask.width, mask.height);
            if size != (width, height) && size != source {
                let also = if source == (width, height) {
                    String::new()
                } else {
                    format!(" or the output's {width}×{height}")
                };
                return Err(invalid(format!(
                    "protected_mask is {}×{} but reference_image is {}×{}; the mask must have the reference's size{also}",
                    size.0, size.1, source.0, source.1
                )));
            }
            let spec = ProtectSpec { mask, feather: options.protect_feather };
            // Blank, full or covering every latent element: refused here, before queueing.
            // The mask is decoded for the check (one request at a time) and not kept.
            let decoded = {
                let _one_at_a_time = MASK_CHECKS.lock().unwrap_or_else(|p| p.into_inner());
                spec.decode_at(width, height)?
            };
            let factor = meta.size_multiple.max(1) as i64;
            let _masks = protect::protect_masks(&mask_tensor(&decoded), width as i64, height as i64, factor)
                .map_err(|e| invalid(format!("protected_mask: {e:#}")))?;
            Some(spec)
        }
    };
    let explain = explain_params(
        &options,
        &meta,
        catalog,
        &req.prompt,
        reference.is_some(),
        steps as usize,
        strength,
        scheduler,
        karras,
    )?;

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
    let (original_size, crop_top_left) = size_conditioning(req.size_conditioning.as_ref(), &meta)?;
    // The work as the request states it; `explain_params` accepted its mode and timesteps.
    limits.check_work(&Work::of(req, width, height, meta.size_multiple))?;
    let explain_stream = match stream.explain {
        Some(x) => ExplainStream { masks: x.masks, heatmaps: x.heatmaps },
        None => ExplainStream { masks: explain.is_some() || protect.is_some(), heatmaps: explain.is_some() },
    };

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
        start,
        explain,
        protect,
        explain_stream,
        loras: loras::check(&req.loras, catalog.loras(), limits)?,
        original_size,
        crop_top_left,
    })
}

/// The most a size-conditioning value may be.
const MAX_CONDITIONING_PIXELS: u32 = 16384;

/// Original size and crop top-left of SDXL's size conditioning (None: the defaults).
type SizeCond = (Option<(u32, u32)>, Option<(u32, u32)>);

/// SizeConditioning → (original size, crop top-left), for SDXL models only.
fn size_conditioning(c: Option<&pb::SizeConditioning>, meta: &ModelMeta) -> Result<SizeCond, Status> {
    let Some(c) = c else { return Ok((None, None)) };
    if meta.family != Family::Sdxl {
        return Err(invalid(format!(
            "size_conditioning applies to SDXL models; {} is {}",
            quote(&meta.name),
            meta.family.name()
        )));
    }
    let values = [c.original_width, c.original_height, c.crop_top, c.crop_left];
    if values.iter().any(|&v| v > MAX_CONDITIONING_PIXELS) {
        return Err(invalid(format!(
            "size_conditioning values are at most {MAX_CONDITIONING_PIXELS} pixels, got {values:?}"
        )));
    }
    let original = match (c.original_width, c.original_height) {
        (0, 0) => None,
        (w, h) if w > 0 && h > 0 => Some((w, h)),
        (w, h) => {
            return Err(invalid(format!(
                "size_conditioning.original_width and original_height are both set or both 0, got {w}x{h}"
            )))
        }
    };
    Ok((original, Some((c.crop_top, c.crop_left))))
}

/// ExplainOptions' Grad-SAM part → the engine's settings (None for mode OFF), checked as
/// far as the model's small files allow; what needs the loaded model (layer indices
/// against its UNet) the engine checks before the job starts.
#[allow(clippy::too_many_arguments)]
fn explain_params(
    o: &pb::ExplainOptions,
    meta: &ModelMeta,
    catalog: &Catalog,
    prompt: &str,
    img2img: bool,
    steps: usize,
    strength: f64,
    scheduler: SchedulerKind,
    karras: bool,
) -> Result<Option<ExplainParams>, Status> {
    let mode = match pb::ExplainMode::try_from(o.mode.unwrap_or_default()) {
        Ok(pb::ExplainMode::Off) => None,
        Ok(pb::ExplainMode::Fast) => Some(ExplainMode::Fast),
        Ok(pb::ExplainMode::Exact) => Some(ExplainMode::Exact),
        Err(_) => {
            return Err(invalid(format!(
                "unknown explain.mode {} (expected OFF, FAST or EXACT)",
                o.mode.unwrap_or_default()
            )))
        }
    };
    let given: Vec<&str> = [
        ("subject_words", !o.subject_words.is_empty()),
        ("subject_indices", !o.subject_indices.is_empty()),
        ("layers", !o.layers.trim().is_empty()),
        ("manipulate_at", !o.manipulate_at.is_empty()),
        ("mask_threshold", o.mask_threshold.is_some()),
        ("blur_kernel", o.blur_kernel.is_some()),
        ("blur_sigma", o.blur_sigma.is_some()),
        ("dilation", o.dilation.is_some()),
        ("dilation_passes", o.dilation_passes.is_some()),
        ("exact_batch", o.exact_batch.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    let Some(mode) = mode else {
        if !given.is_empty() {
            return Err(invalid(format!(
                "explain.mode is OFF but Grad-SAM options are set ({}); set mode FAST or EXACT, or leave them unset",
                given.join(", ")
            )));
        }
        return Ok(None);
    };
    if !img2img {
        return Err(invalid(
            "explain (Grad-SAM) needs a reference_image (img2img): the latents it does not keep come from the reference",
        ));
    }
    let d = MaskParams::default();
    let mask = MaskParams {
        blur_kernel: o.blur_kernel.map_or(d.blur_kernel, i64::from),
        blur_sigma: o.blur_sigma.unwrap_or(d.blur_sigma),
        dilate_kernel: o.dilation.map_or(d.dilate_kernel, i64::from),
        dilate_passes: o.dilation_passes.map_or(d.dilate_passes, |p| p as usize),
        threshold_k: o.mask_threshold.unwrap_or(d.threshold_k),
    };
    mask.validate().map_err(|e| invalid(format!("explain: {e:#}")))?;
    if let Some(b) = o.exact_batch {
        if !(1..=MAX_EXACT_BATCH).contains(&b) {
            return Err(invalid(format!("explain.exact_batch must be 1 to {MAX_EXACT_BATCH}, got {b}")));
        }
    }
    let layers = if o.layers.trim().is_empty() {
        LayerChoice::Last
    } else {
        o.layers.parse::<LayerChoice>().map_err(|e| invalid(format!("explain.layers: {e:#}")))?
    };

    // Subjects and timesteps resolved as the engine will resolve them, so that a request
    // the model cannot run is refused before it waits in the queue.
    if o.subject_words.iter().any(|w| w.trim().is_empty()) {
        return Err(invalid("explain.subject_words has an empty word"));
    }
    let subjects: Vec<SubjectSpec> = o
        .subject_words
        .iter()
        .map(|w| SubjectSpec::Word(w.clone()))
        .chain(o.subject_indices.iter().map(|&i| SubjectSpec::Index(i as usize)))
        .collect();
    let tokenizer = catalog.tokenizer(&meta.name)?;
    explain::resolve_subjects(&tokenizer, prompt, &subjects).map_err(|e| invalid(format!("{e:#} (see Tokenize)")))?;
    let config = meta
        .scheduler_config()
        .map_err(|e| Status::failed_precondition(format!("model {:?} is unusable: {e:#}", meta.name)))?;
    let (schedule, first) =
        pipeline::schedule(&config, scheduler, karras, steps, Some(strength)).map_err(|e| invalid(format!("{e:#}")))?;
    let timesteps = o.manipulate_at.clone();
    explain::snap_timesteps(&timesteps, &schedule.timesteps()[first..])
        .map_err(|e| invalid(format!("explain.manipulate_at: {e:#}")))?;

    Ok(Some(ExplainParams { mode, layers, subjects, timesteps, mask, exact_batch: o.exact_batch.map(|b| b as usize) }))
}

/// A seed for requests without one: 53 bits (exact in a JSON / JavaScript number).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() & ((1u64 << 53) - 1)
}

#[cfg(test)]
mod tests {
    use super::resize_mask_conservative;
    use image::GrayImage;

    #[test]
    fn mask_resizing_keeps_every_protected_pixel() {
        let mut m = GrayImage::new(10, 6);
        m.put_pixel(3, 2, image::Luma([1]));
        let down = resize_mask_conservative(&m, 4, 4);
        let set: Vec<(u32, u32)> = down.enumerate_pixels().filter(|p| p.2[0] != 0).map(|p| (p.0, p.1)).collect();
        // x 3 of 10 lies under output column 1 (2.5..5); y 2 of 6 under rows 1 (1.5..3).
        assert_eq!(set, vec![(1, 1)]);
        let up = resize_mask_conservative(&m, 20, 12);
        assert_eq!(up.pixels().filter(|p| p[0] != 0).count(), 4);
        assert_eq!(up.get_pixel(6, 4)[0], 255);
        assert_eq!(up.get_pixel(7, 5)[0], 255);
    }
}
