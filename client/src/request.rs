//! A builder for `GenerateRequest` that reads the reference image and protected mask
//! from files.
use crate::proto::v1 as pb;
use crate::Error;
use std::path::Path;

pub use pb::{ExplainMode, ImageFormat, PreviewMethod, StartMode};

/// Builds a [`pb::GenerateRequest`]. Unset fields keep the server's defaults (see the
/// proto), or the preset's.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequestBuilder {
    req: pb::GenerateRequest,
}

impl GenerateRequestBuilder {
    pub fn new(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        GenerateRequestBuilder {
            req: pb::GenerateRequest { model: model.into(), prompt: prompt.into(), ..Default::default() },
        }
    }

    pub fn negative_prompt(mut self, negative: impl Into<String>) -> Self {
        self.req.negative_prompt = negative.into();
        self
    }

    /// `None`: the server draws one (reported in `Started` and `Result`).
    pub fn seed(mut self, seed: impl Into<Option<u64>>) -> Self {
        self.req.seed = seed.into();
        self
    }

    /// `None`: the server's default.
    pub fn steps(mut self, steps: impl Into<Option<u32>>) -> Self {
        self.req.steps = steps.into();
        self
    }

    pub fn guidance(mut self, guidance: impl Into<Option<f64>>) -> Self {
        self.req.guidance = guidance.into();
        self
    }

    /// A scheduler name from ListModels (ddim, ddpm, euler, euler-a, dpm++, dpm++-sde, unipc,
    /// and `-karras` variants; validated by the server).
    pub fn scheduler(mut self, scheduler: impl Into<String>) -> Self {
        self.req.scheduler = scheduler.into();
        self
    }

    /// Output size in pixels; 0 keeps the server's default for that side.
    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.req.width = width;
        self.req.height = height;
        self
    }

    /// img2img from encoded PNG or JPEG bytes.
    pub fn reference_image(mut self, bytes: Vec<u8>) -> Self {
        self.req.reference_image = bytes;
        self
    }

    /// img2img from a PNG or JPEG file (sent as is).
    pub fn reference_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let bytes = read_input(path)?;
        match image::guess_format(&bytes) {
            Ok(image::ImageFormat::Png | image::ImageFormat::Jpeg) => Ok(self.reference_image(bytes)),
            _ => Err(Error::InvalidInput(format!("{}: not a PNG or JPEG image", path.display()))),
        }
    }

    /// SDXL's size conditioning (original size, crop top-left).
    pub fn size_conditioning(mut self, c: pb::SizeConditioning) -> Self {
        self.req.size_conditioning = Some(c);
        self
    }

    pub fn strength(mut self, strength: impl Into<Option<f64>>) -> Self {
        self.req.strength = strength.into();
        self
    }

    /// The protected region as an 8-bit greyscale PNG (non-zero pixels are protected).
    pub fn protected_mask(mut self, png: Vec<u8>) -> Self {
        self.req.protected_mask = png;
        self
    }

    /// The protected region from an image file: an 8-bit greyscale PNG is sent as is,
    /// anything else the `image` crate reads is converted to one (luma, alpha dropped).
    pub fn protect_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let bytes = read_input(path)?;
        let bad = |e: image::ImageError| Error::InvalidInput(format!("{}: {e}", path.display()));
        let img = image::load_from_memory(&bytes).map_err(bad)?;
        let is_grey_png =
            image::guess_format(&bytes).ok() == Some(image::ImageFormat::Png) && img.color() == image::ColorType::L8;
        if is_grey_png {
            return Ok(self.protected_mask(bytes));
        }
        let mut png = Vec::new();
        img.to_luma8().write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).map_err(bad)?;
        Ok(self.protected_mask(png))
    }

    /// Stream previews every `every` steps (and always the last; 0: every step).
    pub fn previews(mut self, every: u32, method: PreviewMethod, format: ImageFormat, max_size: u32) -> Self {
        self.stream().previews =
            Some(pb::PreviewOptions { enabled: true, every, format: format as i32, max_size, method: method as i32 });
        self
    }

    /// Stream the latent entering every `every`-th step.
    pub fn latents(mut self, every: u32) -> Self {
        self.stream().latents = Some(pb::LatentOptions { enabled: true, every });
        self
    }

    /// Stream exactly these Grad-SAM / protection events. Without this call a job with
    /// Grad-SAM or a protected region streams both.
    pub fn explain_stream(mut self, masks: bool, heatmaps: bool) -> Self {
        self.stream().explain = Some(pb::ExplainStreamOptions { masks, heatmaps });
        self
    }

    /// Grad-SAM (`mode` FAST or EXACT, subjects, layers, timesteps, mask parameters) and
    /// the img2img `start` / protected-region `protect_feather`.
    pub fn explain(mut self, options: pb::ExplainOptions) -> Self {
        self.req.explain = Some(options);
        self
    }

    /// A named set of server-side defaults for the fields left unset ("paper").
    pub fn preset(mut self, name: impl Into<String>) -> Self {
        self.req.preset = name.into();
        self
    }

    /// A LoRA merged for this job (`name` from ListModels), its update scaled by `weight`.
    pub fn lora(mut self, name: impl Into<String>, weight: Option<f32>) -> Self {
        self.req.loras.push(pb::LoraSpec { name: name.into(), weight });
        self
    }

    /// A client-chosen id for Cancel (the server assigns one when empty).
    pub fn job_id(mut self, id: impl Into<String>) -> Self {
        self.req.job_id = id.into();
        self
    }

    /// `n` images to pick from, image i with seed + i (each event says its image).
    pub fn num_images(mut self, n: u32) -> Self {
        self.req.num_images = Some(n);
        self
    }

    /// The job outlives its stream: `Client::watch_job` re-attaches, `Client::get_result`
    /// fetches its result after it ended.
    pub fn detach(mut self) -> Self {
        self.req.detach = true;
        self
    }

    pub fn build(self) -> pb::GenerateRequest {
        self.req
    }

    fn stream(&mut self) -> &mut pb::StreamOptions {
        self.req.stream.get_or_insert_with(Default::default)
    }
}

fn read_input(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::InvalidInput(format!("reading {}: {e}", path.display())))
}
