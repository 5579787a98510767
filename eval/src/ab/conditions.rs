//! The conditions compared, each a GenerateRequest built with the client library. Every
//! condition samples as the paper preset does (its scheduler, steps and guidance, from
//! `frisket_proto::defaults::paper`), so they differ only in what is named here.
use anyhow::{bail, Result};
use frisket::proto::defaults::paper;
use frisket::proto::v1 as pb;
use frisket::GenerateRequestBuilder;
use frisket_shapes::protect::ProtectCase;
use frisket_shapes::Mask;
use image::{GrayImage, Luma};

/// Pixels the blended condition grows the requested object's true region by (square).
pub const BLEND_DILATION: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Plain img2img at the paper's strength (the paper's "SD").
    Sd09,
    /// Plain SDEdit img2img at the strength chosen on the tuning split (tune.rs: "SD Tuned").
    SdTuned,
    /// The paper preset (Grad-SAM fast, last layer) with the kept object protected.
    Paper,
    /// As `Paper` on every cross-attention layer.
    PaperAllLayers,
    /// Everything outside the requested object's (dilated) true region protected, and the
    /// kept object: the preservation upper bound.
    Blended,
    /// The kept object protected, no Grad-SAM.
    ProtectOnly,
}

impl Condition {
    pub const ALL: [Condition; 6] = [
        Condition::Sd09,
        Condition::SdTuned,
        Condition::Paper,
        Condition::PaperAllLayers,
        Condition::Blended,
        Condition::ProtectOnly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Condition::Sd09 => "sd-0.9",
            Condition::SdTuned => "sd-tuned",
            Condition::Paper => "paper",
            Condition::PaperAllLayers => "paper-all-layers",
            Condition::Blended => "blended",
            Condition::ProtectOnly => "protect-only",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match Condition::ALL.iter().find(|c| c.name() == name) {
            Some(c) => Ok(*c),
            None => {
                bail!("unknown condition {name:?} (expected one of {})", Condition::ALL.map(Condition::name).join(", "))
            }
        }
    }

    /// The job of this condition on one case.
    /// `steps`: None for the preset's (`paper::STEPS`); `tuned_strength`: SD Tuned's strength
    /// (required for `SdTuned` only).
    pub fn request(
        self,
        model: &str,
        seed: u64,
        steps: Option<u32>,
        case: &ProtectCase,
        tuned_strength: Option<f64>,
    ) -> Result<pb::GenerateRequest> {
        if self == Condition::SdTuned {
            let Some(strength) = tuned_strength else { bail!("sd-tuned needs its tuned strength") };
            return tuned(model, seed, steps, case, strength);
        }
        let b = builder(model, seed, steps, case, paper::STRENGTH)?;
        let kept = || png_gray(&case.reference.masks[0].to_gray());
        let explain = |layers: &str| pb::ExplainOptions { layers: layers.into(), ..Default::default() };
        let off = pb::ExplainOptions { mode: Some(pb::ExplainMode::Off as i32), ..Default::default() };
        Ok(match self {
            Condition::Sd09 => b.preset(paper::NAME).explain(off),
            Condition::SdTuned => unreachable!("handled above"),
            Condition::Paper => b.preset(paper::NAME).protected_mask(kept()?),
            Condition::PaperAllLayers => b.preset(paper::NAME).explain(explain("all")).protected_mask(kept()?),
            Condition::ProtectOnly => b.preset(paper::NAME).explain(off).protected_mask(kept()?),
            Condition::Blended => {
                // The kept object stays protected where the grown region overlaps it.
                let free = dilate(&case.target.masks[1], BLEND_DILATION);
                let kept = &case.reference.masks[0];
                let keep = GrayImage::from_fn(free.width(), free.height(), |x, y| {
                    Luma([if kept.get(x, y) || free.get_pixel(x, y)[0] == 0 { 255 } else { 0 }])
                });
                b.preset(paper::NAME).explain(off).protected_mask(png_gray(&keep)?)
            }
        }
        .build())
    }
}

/// The preset's sampling of one case at `strength`.
fn builder(
    model: &str,
    seed: u64,
    steps: Option<u32>,
    case: &ProtectCase,
    strength: f64,
) -> Result<GenerateRequestBuilder> {
    Ok(GenerateRequestBuilder::new(model, case.prompt.clone())
        .seed(seed)
        .steps(steps)
        .reference_image(png(&case.reference.image)?)
        .strength(strength))
}

/// `sd-tuned` and its tuning grid: plain img2img at `strength` from the reference noised to the
/// strength's start timestep (SDEdit), where strength trades adherence for preservation; the
/// preset's pure-noise start ignores the reference (nothing protected), so a lower strength there only starts from
/// noise at a lower timestep.
pub fn tuned(
    model: &str,
    seed: u64,
    steps: Option<u32>,
    case: &ProtectCase,
    strength: f64,
) -> Result<pb::GenerateRequest> {
    let options = pb::ExplainOptions {
        mode: Some(pb::ExplainMode::Off as i32),
        start: Some(pb::StartMode::Reference as i32),
        ..Default::default()
    };
    Ok(builder(model, seed, steps, case, strength)?.preset(paper::NAME).explain(options).build())
}

/// The mask grown by `r` pixels (square neighbourhood).
fn dilate(m: &Mask, r: u32) -> GrayImage {
    let g = m.to_gray();
    let (w, h) = g.dimensions();
    GrayImage::from_fn(w, h, |x, y| {
        let hit = (y.saturating_sub(r)..(y + r + 1).min(h))
            .any(|yy| (x.saturating_sub(r)..(x + r + 1).min(w)).any(|xx| m.get(xx, yy)));
        Luma([if hit { 255 } else { 0 }])
    })
}

fn png(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn png_gray(img: &GrayImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}
