//! Typed events of a Generate stream (mirroring `GenerateEvent`'s oneof).
use crate::proto::v1 as pb;
use crate::tensor::Tensor;
use crate::Error;

/// One event of a job, with the job's id.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub job_id: String,
    /// Which image of the request (`num_images`) it is about; 0 for one image.
    pub image_index: u32,
    pub event: Event,
}

/// What happened. Order on the wire: `Queued`, `Loading` (only when the job's model must be
/// loaded first), `Started`, then per step `Latent`, `Step`,
/// `Preview` (as requested), then for Grad-SAM / protect jobs the protected-region `Mask`
/// (step 0 only), the step's `Heatmap`s (one per subject) and its manipulation `Mask`;
/// finally `Result`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Queued(Queued),
    Started(Started),
    Step(Step),
    Preview(Preview),
    Latent(Latent),
    Mask(Mask),
    Heatmap(Heatmap),
    Result(Box<GenerateResult>),
    Loading(Loading),
}

impl Event {
    /// The event's name in the CLI's JSON lines (`queued`, `started`, `step`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Queued(_) => "queued",
            Event::Started(_) => "started",
            Event::Step(_) => "step",
            Event::Preview(_) => "preview",
            Event::Latent(_) => "latent",
            Event::Mask(_) => "mask",
            Event::Heatmap(_) => "heatmap",
            Event::Result(_) => "result",
            Event::Loading(_) => "loading",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// Jobs ahead of this one (0: it starts next).
    pub position: u32,
    /// Seconds until the job is expected to start (see the proto's `Queued`).
    pub estimated_start_seconds: Option<f64>,
}

/// The job waits for its model to load.
#[derive(Debug, Clone, PartialEq)]
pub struct Loading {
    pub model: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub total_steps: u32,
    pub timesteps: Vec<f64>,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// Grad-SAM jobs: the subject tokens, in the order their heatmaps stream.
    pub subjects: Vec<pb::Token>,
    /// True when the server picked the subjects from the prompt.
    pub subjects_auto: bool,
    /// Grad-SAM jobs: the 0-based indices of the manipulated steps, ascending.
    pub manipulation_steps: Vec<u32>,
    /// How many images the request makes (the stream ends after that many results).
    pub num_images: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// 0-based index of the step just finished.
    pub index: u32,
    pub total: u32,
    pub timestep: f64,
    /// Seconds since the job started.
    pub elapsed_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub step: u32,
    pub timestep: f64,
    /// Encoded image (see `mime_type`).
    pub image: Vec<u8>,
    pub mime_type: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Latent {
    /// The latent entering step `step` (step 0: the initial latent).
    pub step: u32,
    pub timestep: f64,
    pub latent: Tensor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// The Grad-SAM manipulation mask.
    Manipulation,
    /// The user's protected region at latent size.
    Protected,
}

impl MaskKind {
    pub fn name(self) -> &'static str {
        match self {
            MaskKind::Manipulation => "manipulation",
            MaskKind::Protected => "protected",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub step: u32,
    pub timestep: f64,
    pub kind: MaskKind,
    /// 0/1 at latent size. Manipulation: [channels, h, w], 1 = kept from the generation,
    /// 0 = taken from the reference. Protected: [1, h, w], 1 = protected.
    pub mask: Tensor,
    /// Grey PNG at the image's size (share of channels set).
    pub png: Vec<u8>,
    /// Share of latent elements taken from the reference.
    pub reference_fraction: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    pub step: u32,
    pub timestep: f64,
    pub token_index: u32,
    pub token: String,
    /// The raw importance map [channels, h, w] at latent size.
    pub map: Tensor,
    /// Colour-mapped, overlaid on the step's approximate preview, at the image's size.
    pub png: Vec<u8>,
    /// Grey PNG at the image's size, 255 where the map puts the subject (empty from a
    /// server that does not send it).
    pub subject_mask_png: Vec<u8>,
}

/// The job's final image and its report.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateResult {
    pub image: Vec<u8>,
    pub mime_type: String,
    pub seed: u64,
    pub settings: pb::Settings,
    pub timings: pb::Timings,
    /// Per-pixel mean |output − reference| over R, G, B as a grey PNG (img2img only).
    pub change_map: Option<Vec<u8>>,
    pub reference_fraction_per_step: Vec<f64>,
    /// PSNR of the protected region (infinity when exact) and outside it.
    pub psnr_protected: Option<f64>,
    pub psnr_outside: Option<f64>,
    /// Events this client missed because newer ones of the same kind replaced them while
    /// it was behind (the proto's Result.dropped_events).
    pub dropped_events: u64,
}

/// File extension for an image MIME type (`png` unless it says JPEG).
pub fn extension_for_mime(mime: &str) -> &'static str {
    match mime {
        "image/jpeg" | "image/jpg" => "jpg",
        _ => "png",
    }
}

fn tensor(t: Option<pb::Tensor>, what: &str) -> Result<Tensor, Error> {
    Tensor::try_from(t.ok_or_else(|| Error::Protocol(format!("{what} event without a tensor")))?)
}

impl JobEvent {
    /// Converts a wire event. `Ok(None)` for an event this client does not know (a newer
    /// server's oneof member), which callers skip.
    pub fn from_proto(e: pb::GenerateEvent) -> Result<Option<JobEvent>, Error> {
        use pb::generate_event::Event as E;
        let event = match e.event {
            None => return Ok(None),
            Some(E::Queued(q)) => {
                Event::Queued(Queued { position: q.position, estimated_start_seconds: q.estimated_start_seconds })
            }
            Some(E::Loading(l)) => Event::Loading(Loading { model: l.model }),
            Some(E::Started(s)) => Event::Started(Started {
                total_steps: s.total_steps,
                timesteps: s.timesteps,
                seed: s.seed,
                width: s.width,
                height: s.height,
                subjects: s.subjects,
                subjects_auto: s.subjects_auto,
                manipulation_steps: s.manipulation_steps,
                num_images: s.num_images.max(1),
            }),
            Some(E::Step(s)) => Event::Step(Step {
                index: s.index,
                total: s.total,
                timestep: s.timestep,
                elapsed_seconds: s.elapsed_seconds,
            }),
            Some(E::Preview(p)) => Event::Preview(Preview {
                step: p.step,
                timestep: p.timestep,
                image: p.image,
                mime_type: p.mime_type,
                width: p.width,
                height: p.height,
            }),
            Some(E::Latent(l)) => {
                Event::Latent(Latent { step: l.step, timestep: l.timestep, latent: tensor(l.latent, "latent")? })
            }
            Some(E::Mask(m)) => Event::Mask(Mask {
                step: m.step,
                timestep: m.timestep,
                kind: match pb::MaskKind::try_from(m.kind) {
                    Ok(pb::MaskKind::Manipulation) => MaskKind::Manipulation,
                    Ok(pb::MaskKind::Protected) => MaskKind::Protected,
                    Err(_) => return Err(Error::Protocol(format!("mask event with unknown kind {}", m.kind))),
                },
                mask: tensor(m.mask, "mask")?,
                png: m.png,
                reference_fraction: m.reference_fraction,
            }),
            Some(E::Heatmap(h)) => Event::Heatmap(Heatmap {
                step: h.step,
                timestep: h.timestep,
                token_index: h.token_index,
                token: h.token,
                map: tensor(h.map, "heatmap")?,
                png: h.png,
                subject_mask_png: h.subject_mask_png,
            }),
            Some(E::Result(r)) => Event::Result(Box::new(r.into())),
        };
        Ok(Some(JobEvent { job_id: e.job_id, image_index: e.image_index, event }))
    }
}

impl From<pb::Result> for GenerateResult {
    fn from(r: pb::Result) -> Self {
        GenerateResult {
            image: r.image,
            mime_type: r.mime_type,
            seed: r.seed,
            settings: r.settings.unwrap_or_default(),
            timings: r.timings.unwrap_or_default(),
            change_map: (!r.change_map.is_empty()).then_some(r.change_map),
            reference_fraction_per_step: r.reference_fraction_per_step,
            psnr_protected: r.psnr_protected,
            psnr_outside: r.psnr_outside,
            dropped_events: r.dropped_events,
        }
    }
}
