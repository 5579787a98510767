//! Grad-SAM manipulation as a step hook: at the plan's steps, the latent entering the step
//! is explained and replaced outside the mask by the reference noised to that step.
use super::super::hooks::{ReferenceLatents, StepHook, StepPoint};
use super::{attribute, mask, ExplainPlan, Subject};
use anyhow::Result;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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

/// A job's Grad-SAM state between steps.
pub struct EditState {
    plan: ExplainPlan,
    reference: ReferenceLatents,
    subject_indices: Vec<usize>,
    /// The protected latent elements [1, 1, h, w] on the device: they come from the
    /// reference too, so they count towards `reference_fraction`.
    protected: Option<Tensor>,
    /// The manipulation of the step that just ran its hooks, until the pipeline takes it.
    last: Option<Manipulation>,
    fractions: Vec<StepFraction>,
}

impl EditState {
    pub fn new(plan: ExplainPlan, reference: ReferenceLatents, protected: Option<Tensor>) -> Self {
        let subject_indices = plan.subjects.iter().map(|s| s.token_index).collect();
        Self { plan, reference, subject_indices, protected, last: None, fractions: Vec::new() }
    }

    /// The manipulation done before the current step's UNet call, if it was a planned step.
    /// Whether the job's step `index` (0-based among its steps) is manipulated.
    fn manipulates_at(&self, index: usize) -> bool {
        self.plan.steps.iter().any(|s| s.index == index)
    }

    pub fn take_manipulation(&mut self) -> Option<Manipulation> {
        self.last.take()
    }

    /// The share of latents from the reference at each manipulated step so far.
    pub fn into_fractions(self) -> Vec<StepFraction> {
        self.fractions
    }
}

impl StepHook for EditState {
    /// At a planned step: Grad-SAM on z_t, then z ← m⊙z + (1−m)⊙noised reference.
    fn before_step(&mut self, at: &StepPoint, latents: &mut Tensor) -> Result<()> {
        if !self.manipulates_at(at.index) {
            return Ok(());
        }
        let started = Instant::now();
        let plan = &self.plan;
        let maps = attribute(
            at.model,
            at.scheduler,
            latents,
            at.step_index,
            at.timestep,
            at.cond,
            &plan.layers,
            &self.subject_indices,
            plan.mode,
            plan.exact_batch,
        )?;
        let noised = self.reference.noised(at.scheduler, at.step_index);
        let keep = mask::build_mask(&maps, &plan.mask).to_device(latents.device()); // [C, h, w]
        let explained = latents.to_device(Device::Cpu).to_kind(Kind::Float);
        let keep_b = keep.unsqueeze(0).to_kind(latents.kind());
        *latents = &*latents * &keep_b + &noised * keep_b.rsub_scalar(1.0);
        let generated = match &self.protected {
            Some(p) => &keep_b * p.rsub_scalar(1.0),
            None => keep_b.shallow_clone(),
        };
        let fraction = 1.0 - generated.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        self.fractions.push(StepFraction { index: at.index, timestep: at.timestep, fraction });
        let maps = maps.to_device(Device::Cpu);
        let heatmaps = plan
            .subjects
            .iter()
            .enumerate()
            .map(|(i, subject)| Heatmap { subject: subject.clone(), map: maps.get(i as i64) })
            .collect();
        self.last = Some(Manipulation {
            index: at.index,
            timestep: at.timestep,
            latents_explained: explained,
            heatmaps,
            mask: keep.to_device(Device::Cpu),
            reference_fraction: fraction,
            seconds: started.elapsed().as_secs_f64(),
        });
        Ok(())
    }
}
