//! Request limits, defined once: the server checks them before a job is queued, and
//! clients check them (against the values GetServerInfo reports) before sending, with the
//! same functions and so the same messages. Each refusal names the limit and the value.
//!
//! `Limits` is what `serve --max-*` flags, the config file's `[limits]` section and
//! GetServerInfo all map to; the same struct can later be one token's limits.
use crate::defaults;
use crate::v1 as pb;
use serde::{Deserialize, Serialize};
use tonic::Status;

/// A job's limits. A request over one is INVALID_ARGUMENT naming it (a message over
/// `max_message_bytes`: RESOURCE_EXHAUSTED), before it is queued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most denoising steps per job.
    pub max_steps: u32,
    /// Most output pixels (width × height).
    pub max_pixels: u32,
    /// Longest side of the output and of input images, in pixels.
    pub max_side: u32,
    /// Largest request or response message, in bytes (a 2048² PNG plus its mask fit
    /// comfortably in the default).
    pub max_message_bytes: usize,
    /// Most work per job, in work units ([`Work::units`]).
    pub max_work: u64,
    /// Most LoRAs one job may merge.
    pub max_loras: u32,
    /// Bytes of prompt and of negative_prompt (the tokenizer keeps 75 tokens anyway).
    pub max_prompt_bytes: u32,
    /// Most images one request may ask for (`num_images`).
    pub max_images: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 500,
            max_pixels: 2048 * 2048,
            max_side: 4096,
            max_message_bytes: 64 << 20,
            // 2048² (65,536 latent positions) × 2 rows (guidance) × 150 steps; refuses
            // 2048² × 500 steps and exact Grad-SAM at 512² (≈ 134 M units per manipulation).
            max_work: 20_000_000,
            max_loras: 8,
            max_prompt_bytes: 16 * 1024,
            max_images: 8,
        }
    }
}

/// The start of the message for a reference_image that cannot be read.
pub const REFERENCE_UNUSABLE: &str = "reference_image is not a usable PNG or JPEG image";
/// The start of the message for a protected_mask that cannot be read.
pub const MASK_UNUSABLE: &str = "protected_mask is not a usable greyscale PNG";

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

impl Limits {
    /// The limits a server reports. A field it leaves 0 (a server older than the field)
    /// is not a limit: nothing is checked against it.
    pub fn from_server_info(info: &pb::ServerInfo) -> Self {
        let or_none = |v: u32| if v == 0 { u32::MAX } else { v };
        Self {
            max_steps: or_none(info.max_steps),
            max_pixels: or_none(info.max_pixels),
            max_side: or_none(info.max_side),
            max_message_bytes: match info.max_message_bytes {
                0 => usize::MAX,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            },
            max_work: if info.max_work == 0 { u64::MAX } else { info.max_work },
            max_loras: or_none(info.max_loras),
            max_prompt_bytes: or_none(info.max_prompt_bytes),
            max_images: or_none(info.max_images),
        }
    }

    /// Writes these limits into `info` (GetServerInfo).
    pub fn report(&self, info: &mut pb::ServerInfo) {
        info.max_steps = self.max_steps;
        info.max_pixels = self.max_pixels;
        info.max_side = self.max_side;
        info.max_message_bytes = self.max_message_bytes as u64;
        info.max_work = self.max_work;
        info.max_loras = self.max_loras;
        info.max_prompt_bytes = self.max_prompt_bytes;
        info.max_images = self.max_images;
    }

    /// An encoded request of `bytes`: RESOURCE_EXHAUSTED over `max_message_bytes`.
    pub fn check_message(&self, bytes: usize) -> Result<(), Status> {
        if bytes > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "request is {bytes} bytes, more than this server's limit of {} bytes (max_message_bytes)",
                self.max_message_bytes
            )));
        }
        Ok(())
    }

    pub fn check_steps(&self, steps: u32) -> Result<(), Status> {
        if steps > self.max_steps {
            return Err(invalid(format!(
                "steps {steps} is more than this server's limit of {} (max_steps)",
                self.max_steps
            )));
        }
        Ok(())
    }

    pub fn check_prompts(&self, prompt: &str, negative_prompt: &str) -> Result<(), Status> {
        let longest = prompt.len().max(negative_prompt.len());
        if longest > self.max_prompt_bytes as usize {
            return Err(invalid(format!(
                "prompt and negative_prompt are limited to {} bytes (max_prompt_bytes), got {longest}",
                self.max_prompt_bytes
            )));
        }
        Ok(())
    }

    pub fn check_loras(&self, count: usize) -> Result<(), Status> {
        if count > self.max_loras as usize {
            return Err(invalid(format!("at most {} LoRAs per job (max_loras), got {count}", self.max_loras)));
        }
        Ok(())
    }

    pub fn check_images(&self, count: u32) -> Result<(), Status> {
        if count > self.max_images {
            return Err(invalid(format!(
                "num_images {count} is more than this server's limit of {} (max_images)",
                self.max_images
            )));
        }
        Ok(())
    }

    /// The output size against `max_side` and `max_pixels`.
    pub fn check_output_size(&self, width: u32, height: u32) -> Result<(), Status> {
        if width > self.max_side || height > self.max_side || (width as u64) * (height as u64) > self.max_pixels as u64
        {
            return Err(invalid(format!(
                "{width}×{height} is too large: this server allows at most {} pixels (max_pixels) and {} per \
                 side (max_side)",
                self.max_pixels, self.max_side
            )));
        }
        Ok(())
    }

    /// The size a PNG or JPEG header declares, within `max_side`; the pixels are not
    /// decoded. `field` names the image in messages, `unusable` starts the message for one
    /// that cannot be read.
    fn image_size(&self, bytes: &[u8], field: &str, unusable: &str) -> Result<(u32, u32), Status> {
        let bad = |e: String| invalid(format!("{unusable}: {e}"));
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(e.to_string()))?;
        if !matches!(reader.format(), Some(image::ImageFormat::Png | image::ImageFormat::Jpeg)) {
            return Err(bad("not a PNG or JPEG image".to_string()));
        }
        let (width, height) = reader.into_dimensions().map_err(|e| bad(e.to_string()))?;
        if width == 0 || height == 0 {
            return Err(bad(format!("it is {width}×{height} pixels")));
        }
        if width > self.max_side || height > self.max_side {
            return Err(invalid(format!(
                "{field} is {width}×{height} pixels, larger than this server's limit of {0}×{0} (max_side)",
                self.max_side
            )));
        }
        Ok((width, height))
    }

    /// reference_image's size from its header, within `max_side`.
    pub fn reference_size(&self, bytes: &[u8]) -> Result<(u32, u32), Status> {
        self.image_size(bytes, "reference_image", REFERENCE_UNUSABLE)
    }

    /// protected_mask's size from its header, within `max_side`.
    pub fn mask_size(&self, bytes: &[u8]) -> Result<(u32, u32), Status> {
        self.image_size(bytes, "protected_mask", MASK_UNUSABLE)
    }

    pub fn check_work(&self, work: &Work) -> Result<(), Status> {
        let units = work.units();
        if units > self.max_work {
            return Err(invalid(format!(
                "this job is {units} work units (latent positions × UNet rows × steps, plus its Grad-SAM \
                 attribution), more than this server's limit of {} (max_work): use fewer steps, a smaller \
                 image{}",
                self.max_work,
                if work.attribution.is_some_and(|(a, _)| a == Attribution::Exact) { " or fast Grad-SAM" } else { "" }
            )));
        }
        Ok(())
    }

    /// Every limit check of a request as a client can make it before sending: `model` is
    /// the request's model as ListModels reports it (None when unknown: the output size,
    /// when not given, and the work budget are then left to the server). Checks that are
    /// not limits (valid values, names) are the server's.
    pub fn check_request(&self, req: &pb::GenerateRequest, model: Option<&pb::ModelInfo>) -> Result<(), Status> {
        use prost::Message;
        self.check_message(req.encoded_len())?;
        // An unknown preset is the server's to refuse.
        let Ok(req) = defaults::with_preset(req) else { return Ok(()) };
        self.check_prompts(&req.prompt, &req.negative_prompt)?;
        self.check_steps(req.steps.unwrap_or(defaults::STEPS as u32))?;
        self.check_loras(req.loras.len())?;
        self.check_images(defaults::num_images(&req))?;
        let reference =
            if req.reference_image.is_empty() { None } else { Some(self.reference_size(&req.reference_image)?) };
        if !req.protected_mask.is_empty() {
            self.mask_size(&req.protected_mask)?;
        }
        let native = model.map(|m| (m.native_width, m.native_height));
        let (width, height) = output_size(&req, reference, native.unwrap_or((0, 0)));
        self.check_output_size(width, height)?;
        if let Some(m) = model.filter(|m| m.error.is_empty()) {
            self.check_work(&Work::of(&req, width, height, m.size_multiple))?;
        }
        Ok(())
    }
}

/// The output size of a request: as given, else the reference's (from its header), else
/// the model's native size.
pub fn output_size(req: &pb::GenerateRequest, reference: Option<(u32, u32)>, native: (u32, u32)) -> (u32, u32) {
    let side = |given: u32, of_reference: Option<u32>, of_model: u32| match (given, of_reference) {
        (0, Some(r)) => r,
        (0, None) => of_model,
        (g, _) => g,
    };
    (side(req.width, reference.map(|r| r.0), native.0), side(req.height, reference.map(|r| r.1), native.1))
}

/// Grad-SAM attribution as the work budget prices it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribution {
    Fast,
    Exact,
}

/// The latent elements per position exact attribution differentiates (SD's 4 channels).
const LATENT_CHANNELS: u64 = 4;

/// What a job costs: see [`Work::units`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    /// Latent positions: (width / size_multiple) × (height / size_multiple).
    pub positions: u64,
    /// UNet batch rows per step: 2 with classifier-free guidance, else 1.
    pub rows: u64,
    /// The steps that run (img2img starts partway).
    pub steps: u64,
    /// Grad-SAM's mode and number of manipulated steps.
    pub attribution: Option<(Attribution, u64)>,
    /// Images of the request (`num_images`), each this much work.
    pub images: u64,
}

impl Work {
    /// The work of a request (its preset applied) at its output size, with the proto's
    /// defaults for unset fields. `size_multiple` is the model's latent factor (ModelInfo).
    pub fn of(req: &pb::GenerateRequest, width: u32, height: u32, size_multiple: u32) -> Self {
        let m = size_multiple.max(1) as u64;
        let steps = req.steps.unwrap_or(defaults::STEPS as u32) as usize;
        let img2img = !req.reference_image.is_empty();
        let first =
            if img2img { defaults::img2img_start(steps, req.strength.unwrap_or(defaults::STRENGTH), 1) } else { 0 };
        let guidance = req.guidance.unwrap_or(defaults::GUIDANCE);
        let explain = req.explain.as_ref().filter(|_| img2img);
        let attribution = explain.and_then(|e| {
            let mode = match pb::ExplainMode::try_from(e.mode.unwrap_or_default()) {
                Ok(pb::ExplainMode::Fast) => Attribution::Fast,
                Ok(pb::ExplainMode::Exact) => Attribution::Exact,
                _ => return None,
            };
            let n = if e.manipulate_at.is_empty() { defaults::TIMESTEPS.len() } else { e.manipulate_at.len() };
            Some((mode, n as u64))
        });
        Self {
            positions: (width as u64 / m) * (height as u64 / m),
            rows: if guidance > 1.0 { 2 } else { 1 },
            steps: steps.saturating_sub(first) as u64,
            attribution,
            images: defaults::num_images(req) as u64,
        }
    }

    /// A job's cost in work units, per image (× `images`): latent positions × UNet batch rows × steps, plus per
    /// manipulated step its attribution: fast mode one forward and one backward pass of one
    /// row (3 row-passes), exact mode one backward pass per latent element (each ≈ 2
    /// row-passes), so its cost grows with the square of the latent size. GetServerInfo's
    /// `max_work` is in these units; a 512² SD step with guidance is 8,192.
    pub fn units(&self) -> u64 {
        let p = self.positions;
        let steps_work = p.saturating_mul(self.rows).saturating_mul(self.steps);
        let per_manipulation = match self.attribution {
            None => 0,
            Some((Attribution::Fast, _)) => 3 * p,
            Some((Attribution::Exact, _)) => (2 * LATENT_CHANNELS).saturating_mul(p).saturating_mul(p),
        };
        let per_image =
            steps_work.saturating_add(per_manipulation.saturating_mul(self.attribution.map_or(0, |(_, n)| n)));
        per_image.saturating_mul(self.images.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::GrayImage::new(width, height)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn refusals_name_the_limit_and_the_value() {
        let l = Limits { max_steps: 30, max_side: 256, max_pixels: 256 * 192, ..Default::default() };
        let m = l.check_steps(31).unwrap_err();
        assert_eq!(m.code(), tonic::Code::InvalidArgument);
        assert!(m.message().contains("steps 31") && m.message().contains("max_steps"), "{}", m.message());
        assert!(l.check_steps(30).is_ok());
        let m = l.check_output_size(256, 256).unwrap_err();
        assert!(m.message().contains("256×256") && m.message().contains("max_pixels"), "{}", m.message());
        assert!(l.check_output_size(320, 8).unwrap_err().message().contains("max_side"));
        assert!(l.check_output_size(256, 192).is_ok());
        let m = l.reference_size(&png(300, 10)).unwrap_err();
        assert!(m.message().starts_with("reference_image is 300×10 pixels"), "{}", m.message());
        assert!(m.message().contains("max_side"), "{}", m.message());
        assert_eq!(l.mask_size(&png(20, 10)).unwrap(), (20, 10));
        let m = l.mask_size(b"GIF89a").unwrap_err();
        assert!(m.message().starts_with(MASK_UNUSABLE) && m.message().contains("not a PNG or JPEG"), "{}", m.message());
        assert!(l.check_loras(9).unwrap_err().message().contains("max_loras"));
        assert!(l.check_prompts("", &"x".repeat(16 * 1024 + 1)).unwrap_err().message().contains("16385"));
        assert_eq!(l.check_message(64 << 20 | 1).unwrap_err().code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn work_follows_the_request() {
        let req = pb::GenerateRequest { steps: Some(10), ..Default::default() };
        let w = Work::of(&req, 512, 512, 8);
        assert_eq!((w.positions, w.rows, w.steps, w.attribution), (4096, 2, 10, None));
        assert_eq!(w.units(), 81_920);
        // img2img at the default strength 0.8 runs 8 of 10 steps; guidance 1 is one row.
        let img = pb::GenerateRequest { reference_image: vec![1], guidance: Some(1.0), ..req.clone() };
        let w = Work::of(&img, 512, 512, 8);
        assert_eq!((w.rows, w.steps), (1, 8));
        let exact = pb::GenerateRequest {
            explain: Some(pb::ExplainOptions { mode: Some(pb::ExplainMode::Exact as i32), ..Default::default() }),
            ..img
        };
        let w = Work::of(&exact, 512, 512, 8);
        assert_eq!(w.attribution, Some((Attribution::Exact, 3)));
        assert_eq!(w.units(), 4096 * 8 + 3 * 8 * 4096 * 4096);
        let m = Limits::default().check_work(&w).unwrap_err();
        assert!(m.message().contains("max_work") && m.message().contains("fast Grad-SAM"), "{}", m.message());
    }

    #[test]
    fn a_request_is_checked_as_the_server_would() {
        let l = Limits { max_side: 512, ..Default::default() };
        let model = pb::ModelInfo { native_width: 512, native_height: 512, size_multiple: 8, ..Default::default() };
        let req = pb::GenerateRequest { prompt: "a star".into(), ..Default::default() };
        assert!(l.check_request(&req, Some(&model)).is_ok());
        let wide = pb::GenerateRequest { width: 1024, ..req.clone() };
        assert!(l.check_request(&wide, Some(&model)).unwrap_err().message().contains("max_side"));
        // The size comes from the reference when not given.
        let img = pb::GenerateRequest { reference_image: png(640, 64), ..req.clone() };
        assert!(l.check_request(&img, None).unwrap_err().message().contains("640×64 pixels"));
        let long = pb::GenerateRequest { steps: Some(2000), ..req.clone() };
        assert!(l.check_request(&long, None).unwrap_err().message().contains("max_steps"));
        let heavy = pb::GenerateRequest { steps: Some(499), ..req };
        assert!(Limits::default().check_request(&heavy, None).is_ok(), "no model: no work check");
        let big = pb::ModelInfo { native_width: 2048, native_height: 2048, ..model };
        assert!(Limits::default().check_request(&heavy, Some(&big)).unwrap_err().message().contains("max_work"));
    }

    #[test]
    fn limits_round_trip_through_server_info() {
        let l = Limits { max_work: 7, max_loras: 2, ..Default::default() };
        let mut info = pb::ServerInfo::default();
        l.report(&mut info);
        assert_eq!(Limits::from_server_info(&info), l);
    }

    #[test]
    fn limits_a_server_does_not_report_are_not_checked() {
        // A server older than max_loras / max_prompt_bytes leaves them 0.
        let mut info = pb::ServerInfo::default();
        Limits::default().report(&mut info);
        (info.max_loras, info.max_prompt_bytes) = (0, 0);
        let limits = Limits::from_server_info(&info);
        assert!(limits.check_loras(3).is_ok());
        assert!(limits.check_prompts(&"a ".repeat(100_000), "").is_ok());
        assert!(limits.check_steps(Limits::default().max_steps + 1).is_err());
    }
}
