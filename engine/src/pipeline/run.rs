//! Jobs under way. A [`JobRun`] is a prepared job between two steps: its latent, scheduler,
//! hooks and conditioning. A step has three parts: [`JobRun::prepare_step`] (the hooks,
//! then the UNet input rows: two with guidance, one without), one UNet call
//! ([`StableDiffusion::step_batch`], which may stack the rows of several jobs of the same
//! model and latent size, each row at its own timestep), and [`JobRun::complete_step`]
//! (guidance, the scheduler's step, the caller's step event). [`StableDiffusion::generate`]
//! is one job stepping alone, exactly as diffusers runs it.
use super::{Flow, GenerateError, Generated, PreparedJob, StartMode, StepEvent};
use crate::attention::CrossContext;
use crate::compare::compare;
use crate::explain::edit::{EditState, Manipulation};
use crate::hooks::{ReferenceLatents, StepHook, StepPoint};
use crate::image_io;
use crate::interrupt::{self, Interrupt, Interrupted};
use crate::model::StableDiffusion;
use crate::protect::Protect;
use crate::schedulers::Scheduler;
use crate::unet::{Capture, Timesteps};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// libtorch's default CPU generator is process-wide; a job seeds it and draws all of its
/// noise at once under this lock, so concurrent jobs (and tests) cannot interleave draws.
static GENERATOR: Mutex<()> = Mutex::new(());

/// Noise for one job, drawn in the order diffusers draws from its generator.
struct JobNoise {
    vae_sample: Option<Tensor>,
    initial: Tensor,
    /// The draws of the scheduler's steps (float32, on the CPU), one entry per step of the
    /// job; None where that step draws nothing.
    per_step: Vec<Option<Tensor>>,
    /// Grad-SAM / protection: the one ε that noises the reference, drawn after all of
    /// diffusers' draws so that those stay the same.
    reference: Option<Tensor>,
}

fn draw_noise(seed: u64, latent_shape: &[i64], img2img: bool, step_draws: &[bool], reference: bool) -> JobNoise {
    let _guard = GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let opts = (Kind::Float, Device::Cpu);
    // Same bits as torch.Generator().manual_seed(seed): libtorch takes the seed as u64.
    tch::manual_seed(seed as i64);
    let vae_sample = img2img.then(|| Tensor::randn(latent_shape, opts));
    let initial = Tensor::randn(latent_shape, opts);
    let per_step = step_draws.iter().map(|&draws| draws.then(|| Tensor::randn(latent_shape, opts))).collect();
    let reference = reference.then(|| Tensor::randn(latent_shape, opts));
    JobNoise { vae_sample, initial, per_step, reference }
}

/// Pure noise at `step_index` in the scheduler's parameterisation: the latent whose model
/// input (`scale_model_input`) is the unit Gaussian `noise` — the noise itself for DDIM,
/// DDPM, DPM-Solver++ and UniPC, √(σ²+1)·ε for the σ-space Euler schedulers.
fn pure_noise(scheduler: &dyn Scheduler, noise: &Tensor, step_index: usize) -> Tensor {
    let one = Tensor::ones([1], (Kind::Float, Device::Cpu));
    let scale = scheduler.scale_model_input(&one, step_index).double_value(&[0]);
    noise / scale
}

/// A prepared job under way, between steps.
pub struct JobRun {
    params: super::GenerateParams,
    scheduler: Box<dyn Scheduler>,
    start: usize,
    timesteps: Vec<f64>,
    noise: JobNoise,
    latents: Tensor,
    protect: Option<Protect>,
    protect_pixels: Option<Tensor>,
    edit: Option<EditState>,
    /// The prompt's conditioning for the UNet call: [negative, prompt] with guidance.
    context: CrossContext,
    /// The conditional row alone (Grad-SAM explains that branch).
    cond: CrossContext,
    guided: bool,
    /// The next step, 0-based among the job's steps.
    index: usize,
    /// The next step's UNet input and its Grad-SAM manipulation, once prepared.
    pending: Option<Pending>,
    interrupt: Interrupt,
}

struct Pending {
    /// The scaled model input: [2, C, H, W] with guidance, [1, C, H, W] without.
    model_in: Tensor,
    manipulation: Option<Manipulation>,
}

/// What [`StableDiffusion::step_batch`] may stack into one UNet call: rows of one model
/// with the same latent shape (the caller keeps batches to one model and LoRA set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// [C, H, W] of the latent.
    pub latent_shape: [i64; 3],
}

impl JobRun {
    /// The job's interrupt (as set on its `PreparedJob`).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// Whether every step has run (the job is ready for [`JobRun::finish`]).
    pub fn is_done(&self) -> bool {
        self.index >= self.timesteps.len()
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> usize {
        self.index
    }

    pub fn total_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// UNet rows of a step: 2 with guidance, 1 without.
    pub fn rows(&self) -> i64 {
        if self.guided {
            2
        } else {
            1
        }
    }

    pub fn batch_key(&self) -> BatchKey {
        let size = self.latents.size();
        BatchKey { latent_shape: [size[1], size[2], size[3]] }
    }

    /// Runs the next step's hooks (under this job's interrupt) and makes its UNet input;
    /// does nothing when the step is already prepared.
    pub fn prepare_step(&mut self, model: &StableDiffusion) -> Result<(), GenerateError> {
        if self.pending.is_some() || self.is_done() {
            return Ok(());
        }
        let interrupt = self.interrupt.clone();
        interrupt::with(&interrupt, || self.prepare_now(model))
    }

    fn prepare_now(&mut self, model: &StableDiffusion) -> Result<(), GenerateError> {
        let _no_grad = tch::no_grad_guard();
        interrupt::check()?;
        let index = self.index;
        let step_index = self.start + index;
        let at = StepPoint {
            model,
            scheduler: &*self.scheduler,
            index,
            step_index,
            timestep: self.timesteps[index],
            cond: &self.cond,
        };
        // The step hooks, in the order they act: the protected region, then Grad-SAM.
        if let Some(hook) = self.protect.as_mut() {
            hook.before_step(&at, &mut self.latents)?;
        }
        if let Some(hook) = self.edit.as_mut() {
            hook.before_step(&at, &mut self.latents)?;
        }
        let manipulation = self.edit.as_mut().and_then(EditState::take_manipulation);
        let model_in =
            if self.guided { Tensor::cat(&[&self.latents, &self.latents], 0) } else { self.latents.shallow_clone() };
        let model_in = self.scheduler.scale_model_input(&model_in, step_index);
        self.pending = Some(Pending { model_in, manipulation });
        Ok(())
    }

    /// Finishes the prepared step with its UNet output rows: guidance, the scheduler's
    /// step, then `on_step`'s verdict on it.
    fn complete_step(&mut self, out: Tensor, on_step: &mut dyn FnMut(&StepEvent) -> Flow) -> Flow {
        let pending = self.pending.take().expect("complete_step follows prepare_step");
        let (index, step_index) = (self.index, self.start + self.index);
        let noise_pred = if self.guided {
            let parts = out.chunk(2, 0);
            &parts[0] + (&parts[1] - &parts[0]) * self.params.guidance
        } else {
            out
        };
        // Each scheduler takes its draw to the dtype diffusers draws it in.
        let step_noise = self.noise.per_step[index].as_ref().map(|t| t.to_device(noise_pred.device()));
        let step = self.scheduler.step(&noise_pred, step_index, &self.latents, step_noise.as_ref());
        let event = StepEvent {
            index,
            total: self.timesteps.len(),
            timestep: self.timesteps[index],
            latents_in: &self.latents,
            latents: &step.prev_sample,
            denoised: &step.pred_original_sample,
            manipulation: pending.manipulation.as_ref(),
        };
        let flow = on_step(&event);
        self.latents = step.prev_sample;
        self.index += 1;
        flow
    }

    /// Decodes the final latent (under this job's interrupt): the job's image.
    pub fn finish(mut self, model: &StableDiffusion) -> Result<Generated, GenerateError> {
        let interrupt = self.interrupt.clone();
        interrupt::with(&interrupt, || {
            let _no_grad = tch::no_grad_guard();
            if let Some(hook) = self.protect.as_mut() {
                hook.before_decode(&mut self.latents);
            }
            let mut image = model.decode_latents(&self.latents)?;
            if let Some(hook) = self.protect.as_mut() {
                hook.after_decode(&mut image);
            }
            let p = &self.params;
            let comparison = p.reference.as_ref().map(|r| compare(&image, r, self.protect_pixels.as_ref()));
            let reference_fractions = self.edit.map(EditState::into_fractions).unwrap_or_default();
            Ok(Generated { image, latents: self.latents, timesteps: self.timesteps, comparison, reference_fractions })
        })
    }
}

impl StableDiffusion {
    /// Runs a prepared job. `on_step` is called after every step; returning `Flow::Stop`
    /// ends the job with `GenerateError::Cancelled`.
    pub fn generate(
        &self,
        job: PreparedJob,
        on_step: &mut dyn FnMut(&StepEvent) -> Flow,
    ) -> Result<Generated, GenerateError> {
        let mut run = self.start(job)?;
        while !run.is_done() {
            run.prepare_step(self)?;
            let mut flows = self.step_batch(&mut [&mut run], &Interrupt::default(), &mut |_, event| on_step(event))?;
            if flows.pop() == Some(Flow::Stop) {
                return Err(GenerateError::Cancelled);
            }
        }
        run.finish(self)
    }

    /// Starts a prepared job (under its interrupt): draws its noise, encodes its reference
    /// and its prompt, and sets up its hooks.
    pub fn start(&self, job: PreparedJob) -> Result<JobRun, GenerateError> {
        let interrupt = job.interrupt.clone();
        interrupt::with(&interrupt, || self.start_now(job))
    }

    fn start_now(&self, job: PreparedJob) -> Result<JobRun, GenerateError> {
        let _no_grad = tch::no_grad_guard();
        let PreparedJob { params: p, mut scheduler, start, timesteps, explain, protect, interrupt } = job;
        let factor = self.vae_scale_factor();
        let channels = self.unet.config().in_channels;
        let latent_shape = [1, channels, p.height / factor, p.width / factor];

        let edited = explain.is_some() || protect.is_some();
        let step_draws: Vec<bool> = (start..start + timesteps.len()).map(|i| scheduler.needs_step_noise(i)).collect();
        let noise = draw_noise(p.seed, &latent_shape, p.reference.is_some(), &step_draws, edited);
        let to_dev = |t: &Tensor| t.to_device(self.device).to_kind(self.kind);

        let scaling = self.vae.config().scaling_factor;
        let vae_kind = self.vae.kind();
        let mut reference_latents = None;
        let latents = match &p.reference {
            Some(reference) => {
                scheduler.set_begin_index(start);
                let dist = self.vae.encode(&to_dev(reference));
                let sample_noise = noise.vae_sample.as_ref().expect("img2img draws VAE noise");
                let sample_noise = sample_noise.to_device(self.device).to_kind(vae_kind);
                let init = dist.sample_with(&sample_noise).to_kind(self.kind) * scaling;
                let latents = match p.start {
                    StartMode::Reference => scheduler.add_noise(&init, &to_dev(&noise.initial), start),
                    StartMode::Noise => pure_noise(&*scheduler, &to_dev(&noise.initial), start),
                };
                reference_latents = Some(init);
                latents
            }
            None => to_dev(&noise.initial) * scheduler.init_noise_sigma(),
        };

        let reference = match (reference_latents, &noise.reference) {
            (Some(clean), Some(eps)) => Some(ReferenceLatents { clean, noise: to_dev(eps) }),
            _ => None,
        };
        let protect_pixels = protect.as_ref().map(|plan| plan.pixels.shallow_clone());
        let protect = match (protect, &reference, &p.reference) {
            (Some(plan), Some(r), Some(image)) => Some(Protect::new(plan, r.clone(), image)),
            _ => None,
        };
        let edit = match (explain, &reference) {
            (Some(plan), Some(r)) => {
                let protected = protect.as_ref().map(|h| h.latent_mask().shallow_clone());
                Some(EditState::new(plan, r.clone(), protected))
            }
            _ => None,
        };

        let guided = p.guidance > 1.0;
        let negative = guided.then_some(p.negative_prompt.as_str());
        // Cross-attention keys/values are computed from it once, in the first step.
        let context = self.text_context(&p.prompt, negative, &p.size_conditioning());
        let cond = if guided { context.rows(1, 1) } else { context.rows(0, 1) };
        Ok(JobRun {
            params: p,
            scheduler,
            start,
            timesteps,
            noise,
            latents,
            protect,
            protect_pixels,
            edit,
            context,
            cond,
            guided,
            index: 0,
            pending: None,
            interrupt,
        })
    }

    /// One UNet call for the prepared steps of `runs` (same [`BatchKey`], each prepared
    /// with `prepare_step`), then each job's step, reported to `on_step(i, event)` for
    /// `runs[i]`; returns each job's flow. A lone job's call is exactly diffusers'; stacked
    /// rows give the same numbers up to the kernels' summation order for the larger batch.
    /// Stops within one UNet block when any job's interrupt or `yield_to` (the caller's
    /// own reason to stop the call, such as a new job to serve first) fires: then no job
    /// has moved, their prepared steps are kept, and the caller drops the interrupted ones
    /// and calls again with the rest (all of them after a yield).
    pub fn step_batch(
        &self,
        runs: &mut [&mut JobRun],
        yield_to: &Interrupt,
        on_step: &mut dyn FnMut(usize, &StepEvent) -> Flow,
    ) -> Result<Vec<Flow>, Interrupted> {
        let _no_grad = tch::no_grad_guard();
        let mut interrupts: Vec<Interrupt> = runs.iter().map(|r| r.interrupt.clone()).collect();
        interrupts.push(yield_to.clone());
        let interrupt = Interrupt::any(interrupts);
        let out = match runs {
            [] => return Ok(Vec::new()),
            [run] => {
                let pending = run.pending.as_ref().expect("step_batch needs prepared steps");
                let t = run.timesteps[run.index];
                interrupt::with(&interrupt, || {
                    self.unet.try_forward(&pending.model_in, t, &run.context, Capture::NONE)
                })?
                .sample
            }
            _ => {
                let inputs: Vec<&Tensor> = runs
                    .iter()
                    .map(|r| &r.pending.as_ref().expect("step_batch needs prepared steps").model_in)
                    .collect();
                let model_in = Tensor::cat(&inputs, 0);
                let per_row: Vec<f32> = runs
                    .iter()
                    .flat_map(|r| std::iter::repeat_n(r.timesteps[r.index] as f32, r.rows() as usize))
                    .collect();
                let timesteps = Tensor::from_slice(&per_row).to_device(model_in.device());
                let contexts: Vec<&CrossContext> = runs.iter().map(|r| &r.context).collect();
                let context = CrossContext::concat(&contexts);
                let out = interrupt::with(&interrupt, || {
                    self.unet.try_forward(&model_in, Timesteps::PerRow(&timesteps), &context, Capture::NONE)
                })?
                .sample;
                context.share_kv(&contexts);
                out
            }
        };
        let mut row = 0;
        let mut flows = Vec::with_capacity(runs.len());
        for (i, run) in runs.iter_mut().enumerate() {
            let rows = run.rows();
            let own =
                if flows.is_empty() && rows == out.size()[0] { out.shallow_clone() } else { out.narrow(0, row, rows) };
            row += rows;
            flows.push(run.complete_step(own, &mut |event| on_step(i, event)));
        }
        Ok(flows)
    }

    /// Scaled latents → [3, H, W] image in [0, 1] on the CPU; stops at this thread's
    /// current interrupt.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor, Interrupted> {
        let cfg = self.vae.config();
        let mut z = latents.to_kind(self.vae.kind()) / cfg.scaling_factor;
        if let Some(shift) = cfg.shift_factor {
            z += shift;
        }
        Ok(image_io::postprocess(&self.vae.try_decode(&z)?))
    }
}
