//! A job's Grad-SAM and protection state and what it reports: the pipeline's hooks call
//! `ExplainJob::before_step` before each UNet call and `finish` after the last step.
use super::super::model::StableDiffusion;
use super::super::pipeline::GenerateParams;
use super::super::schedulers::Scheduler;
use super::{attribute, mask, ExplainMode, ExplainPlan, MaskParams, Subject};
use anyhow::Result;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What a step of a job with Grad-SAM or a protected region reports besides progress.
#[derive(Clone, Copy)]
pub struct StepExplain<'a> {
    /// On the job's first step only: the resolved plan — subjects (and whether they were
    /// picked automatically), the manipulation steps, and the protected latent mask.
    pub plan: Option<&'a ExplainPlan>,
    /// On a manipulated step: its heatmaps and mask (computed before the step's UNet call,
    /// from the latent entering it).
    pub manipulation: Option<&'a Manipulation>,
}

/// One subject's importance map at a manipulated step.
pub struct Heatmap {
    pub subject: Subject,
    /// I_s: [C, h, w] float32 at latent size, CPU.
    pub map: Tensor,
}

/// What happened at a manipulated step.
pub struct Manipulation {
    /// 0-based index among the job's steps (as StepEvent::index).
    pub index: usize,
    pub timestep: f64,
    /// The latent the maps explain (z_t entering the step, after protection) [1, C, h, w], CPU.
    pub latents_explained: Tensor,
    /// One per subject, in the plan's subject order.
    pub heatmaps: Vec<Heatmap>,
    /// The union mask [C, h, w] float 0/1 (1 = kept from generation), CPU.
    pub mask: Tensor,
    /// Share of latent elements taken from the (noised) reference at this step, protected
    /// ones included.
    pub reference_fraction: f64,
    /// Seconds spent on the maps and mask.
    pub seconds: f64,
}

/// Share of latents from the reference at one manipulated step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepFraction {
    pub index: usize,
    pub timestep: f64,
    pub fraction: f64,
}

/// The summary of a job with Grad-SAM or a protected region.
pub struct ExplainSummary {
    /// [H, W] per-pixel mean over RGB of |output − reference| at the 8-bit level, in [0, 1].
    pub change_map: Tensor,
    pub reference_fractions: Vec<StepFraction>,
    /// PSNR (dB) of the protected region: +∞ when bit-exact; None without a region.
    pub psnr_protected: Option<f64>,
    /// PSNR (dB) outside the protected region (the whole image without one).
    pub psnr_outside: f64,
    pub subjects: Vec<Subject>,
    pub subjects_auto: bool,
}

/// Pure noise at `step_index` in the scheduler's parameterisation: the latent whose model
/// input (`scale_model_input`) is the unit Gaussian `noise` — the noise itself for DDIM and
/// DPM-Solver++, √(σ²+1)·ε for the σ-space Euler schedulers.
pub(crate) fn pure_noise(scheduler: &dyn Scheduler, noise: &Tensor, step_index: usize) -> Tensor {
    let one = Tensor::ones([1], (Kind::Float, Device::Cpu));
    let scale = scheduler.scale_model_input(&one, step_index).double_value(&[0]);
    noise / scale
}

/// A job's Grad-SAM and protection state between steps.
pub(crate) struct ExplainJob {
    /// E(ref) (scaled latents) and the job's one ε, on the device.
    reference: Tensor,
    noise: Tensor,
    /// [1, 1, h, w] on the device.
    protected: Option<Tensor>,
    mode: Option<ExplainMode>,
    layers: Vec<usize>,
    subjects: Vec<Subject>,
    subject_indices: Vec<usize>,
    steps: Vec<usize>,
    mask: MaskParams,
    exact_batch: Option<usize>,
    fractions: Vec<StepFraction>,
}

impl ExplainJob {
    pub(crate) fn new(
        model: &StableDiffusion,
        plan: &ExplainPlan,
        reference: Option<&Tensor>,
        noise: &Tensor,
        to_dev: &dyn Fn(&Tensor) -> Tensor,
    ) -> Self {
        Self {
            reference: reference.expect("validated: a reference").shallow_clone(),
            noise: to_dev(noise),
            protected: plan.protected_latents.as_ref().map(|m| m.to_device(model.device).to_kind(model.kind)),
            mode: plan.mode,
            layers: plan.layers.clone(),
            subjects: plan.subjects.clone(),
            subject_indices: plan.subject_indices(),
            steps: plan.steps.iter().map(|s| s.index).collect(),
            mask: plan.mask.clone(),
            exact_batch: plan.exact_batch,
            fractions: Vec::new(),
        }
    }

    /// The reference noised to the timestep of `step_index` (the scheduler's add_noise, so
    /// right for DDIM and σ-space schedulers alike).
    fn noised_reference(&self, scheduler: &dyn Scheduler, step_index: usize) -> Tensor {
        scheduler.add_noise(&self.reference, &self.noise, step_index)
    }

    /// Before the UNet call of a step: protection (its latents from the reference noised
    /// to this step), then at a manipulation step Grad-SAM on the resulting z_t and
    /// z ← m⊙z + (1−m)⊙noised reference.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn before_step(
        &mut self,
        model: &StableDiffusion,
        scheduler: &dyn Scheduler,
        latents: &mut Tensor,
        index: usize,
        step_index: usize,
        timestep: f64,
        cond: &Tensor,
    ) -> Result<Option<Manipulation>> {
        let manipulate = self.mode.filter(|_| self.steps.contains(&index));
        if self.protected.is_none() && manipulate.is_none() {
            return Ok(None);
        }
        let noised = self.noised_reference(scheduler, step_index);
        if let Some(p) = &self.protected {
            *latents = &*latents * p.rsub_scalar(1.0) + &noised * p;
        }
        let Some(mode) = manipulate else { return Ok(None) };
        let started = Instant::now();
        let maps = attribute(
            model,
            scheduler,
            latents,
            step_index,
            timestep,
            cond,
            &self.layers,
            &self.subject_indices,
            mode,
            self.exact_batch,
        )?;
        let keep = mask::build_mask(&maps, &self.mask).to_device(latents.device()); // [C, h, w]
        let explained = latents.to_device(Device::Cpu).to_kind(Kind::Float);
        let keep_b = keep.unsqueeze(0).to_kind(latents.kind());
        *latents = &*latents * &keep_b + &noised * keep_b.rsub_scalar(1.0);
        let generated = match &self.protected {
            Some(p) => &keep_b * p.rsub_scalar(1.0),
            None => keep_b.shallow_clone(),
        };
        let fraction = 1.0 - generated.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        self.fractions.push(StepFraction { index, timestep, fraction });
        let maps = maps.to_device(Device::Cpu);
        let heatmaps = self
            .subjects
            .iter()
            .enumerate()
            .map(|(i, subject)| Heatmap { subject: subject.clone(), map: maps.get(i as i64) })
            .collect();
        Ok(Some(Manipulation {
            index,
            timestep,
            latents_explained: explained,
            heatmaps,
            mask: keep.to_device(Device::Cpu),
            reference_fraction: fraction,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// After the last step: protected latents become the clean reference; decode; the
    /// protected pixels are composited back; the comparison with the reference.
    pub(crate) fn finish(
        self,
        model: &StableDiffusion,
        plan: &ExplainPlan,
        p: &GenerateParams,
        latents: &mut Tensor,
    ) -> Result<(Tensor, ExplainSummary)> {
        if let Some(m) = &self.protected {
            *latents = &*latents * m.rsub_scalar(1.0) + &self.reference * m;
        }
        let mut image = model.decode_latents(latents);
        let reference = p.reference.as_ref().expect("validated: a reference");
        if let Some(pixels) = &plan.protected_pixels {
            image = mask::composite(&image, reference, pixels, plan.feather);
        }
        let cmp = mask::compare(&image, reference, plan.protected_pixels.as_ref());
        Ok((
            image,
            ExplainSummary {
                change_map: cmp.change_map,
                reference_fractions: self.fractions,
                psnr_protected: cmp.psnr_protected,
                psnr_outside: cmp.psnr_outside,
                subjects: plan.subjects.clone(),
                subjects_auto: plan.subjects_auto,
            },
        ))
    }
}
