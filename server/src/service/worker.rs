//! A worker: the thread of one device (`--device` lists them) that owns that device's
//! loaded models and runs jobs (tch tensors are not Sync and grad mode is per thread).
//! Jobs come from the one [`Queue`], which places them (`Queue::take`); events go back
//! through each job's buffer (`jobs::Events`), never waiting on a client.
//!
//! The worker steps the jobs it runs together: between steps it takes waiting jobs, in
//! order, while they share the running jobs' model and LoRA set (up to `--max-batch`);
//! each step prepares every job's step (its hooks: a Grad-SAM attribution runs for its job
//! alone), then makes one UNet call per latent size for all of them
//! (`StableDiffusion::step_batch`), then reports each job's step. A job that ends leaves
//! between steps; a job stopped inside a shared call leaves it without moving the others.
//! A new job takes its first step before the running jobs' next one, and the step under
//! way when it comes yields to it (see `step_all`).
//!
//! Its loaded models live in a [`Cache`] with the `--model-memory-mib` budget: a model that
//! does not fit beside the loaded ones unloads the least recently used ones that no running
//! job uses (each eviction logged and counted); a model larger than the whole budget, or
//! one that does not fit beside the running jobs' model, is RESOURCE_EXHAUSTED.
use super::cache::{self, Cache};
use super::jobs::{Group, Job, Queue, StopReason, Taken};
use super::lifecycle::{self, Command, Lifecycle, Loaded, State};
use super::loras;
use super::metrics;
use super::models::Catalog;
use super::preview;
use frisket_engine::image_io;
use frisket_engine::interrupt::Interrupt;
use frisket_engine::model::{default_kind, estimate_weight_bytes, StableDiffusion};
use frisket_engine::pipeline::{BatchKey, Flow, GenerateError, GenerateParams, Generated, JobRun, StepEvent};
use frisket_engine::tch::{self, Device};
use frisket_proto::v1::{
    generate_event::Event, Heatmap as PbHeatmap, Latent, Loading, Mask as PbMask, MaskKind, Preview,
    Result as JobResult, Settings, Started, Step, Tensor as PbTensor, Timings, Token,
};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tonic::Status;
use tracing::{debug, error, info, info_span, warn};

/// How a worker runs (`serve --max-batch`, `--model-memory-mib`, `--threads`).
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Most jobs stepped together.
    pub max_batch: usize,
    /// Bytes its loaded models' weights may hold in all; None: no limit.
    pub model_memory: Option<u64>,
    /// libtorch intra-op threads of its thread; None: libtorch's default.
    pub threads: Option<i32>,
}

/// Starts worker `index` (named `name`, e.g. `cpu#1`, in logs, metrics and ListModels)
/// on `device`.
pub fn spawn(
    index: usize,
    name: String,
    queue: Arc<Queue>,
    catalog: Arc<Catalog>,
    device: Device,
    options: WorkerOptions,
    lifecycle: Arc<Lifecycle>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(format!("frisket-worker-{index}")).spawn(move || {
        // libtorch's intra-op thread count applies to the thread that sets it (OpenMP).
        if let Some(n) = options.threads {
            tch::set_num_threads(n);
        }
        let budget = options.model_memory;
        let mut worker = Worker {
            index,
            name,
            queue: queue.clone(),
            models: Cache::new(budget),
            loras: HashMap::new(),
            device,
            catalog,
            lifecycle,
        };
        worker.report_loaded();
        let cpu_linear = (device == Device::Cpu).then(frisket_engine::nn::CpuLinear::current);
        let cpu_conv = (device == Device::Cpu).then(frisket_engine::winograd::CpuConv::current);
        info!(worker = %worker.name, device = ?device, threads = tch::get_num_threads(), ?cpu_linear, ?cpu_conv,
              model_memory = %budget.map_or("unlimited".into(), cache::mib), "worker started");
        let max_batch = options.max_batch;
        let mut active: Vec<Active> = Vec::new();
        // The running-jobs gauge: 0 from the start, then set when the count changes.
        let gauge = worker.name.clone();
        metrics::device_running_jobs(&gauge, 0);
        // A step of the running jobs stops for a job that waits to join them, which then
        // takes its first step before theirs (`step_all`). After such a yield, if that job
        // was not taken after all (it left), the next step does not yield again.
        let joiner = Interrupt::new({
            let queue = queue.clone();
            move || queue.has_joiner(index)
        });
        let mut yielded = false;
        let mut reported = 0;
        let mut report_running = |jobs: usize| {
            if jobs != reported {
                reported = jobs;
                metrics::device_running_jobs(&gauge, jobs);
            }
        };
        loop {
            // Loads and unloads happen between steps, before new jobs join.
            while let Some(command) = queue.next_command(index) {
                worker.command(command, &active);
            }
            // Waiting jobs join between steps, in order, while they fit the running ones
            // and this worker is where placement (`Queue::take`) puts them.
            let mut joined = false;
            while active.len() < max_batch.max(1) {
                let job = match queue.take(index) {
                    Taken::Job(job) => job,
                    Taken::None => break,
                    Taken::Command(command) => {
                        worker.command(command, &active);
                        continue;
                    }
                    Taken::Exit => {
                        info!(worker = %worker.name, "worker thread exiting");
                        return;
                    }
                };
                let span = info_span!("job", worker = %worker.name, job_id = %job.id);
                let begun = {
                    let _entered = span.enter();
                    let in_use = in_use(&active);
                    guarded(&job, || worker.begin(&job, span.clone(), &in_use))
                };
                match begun {
                    Ok(a) => {
                        active.push(a);
                        joined = true;
                    }
                    Err(end) => {
                        queue.finish(index, &job);
                        let _entered = span.enter();
                        end_job(&job, end, None);
                    }
                }
            }
            report_running(active.len());
            if let Some(first) = active.first() {
                worker.models.touch(&first.group.model);
                let model = worker.models.get(&first.group.model).expect("running jobs' model is loaded");
                let yield_to = if yielded && !joined { Interrupt::default() } else { joiner.clone() };
                let stepping = Instant::now();
                let stepped = step_all(model, &mut active, &yield_to);
                yielded = stepped.is_none();
                if let Some(jobs) = stepped.filter(|n| *n > 0) {
                    queue.clock.record(stepping.elapsed().as_secs_f64(), jobs);
                }
                settle(model, &mut active, &queue, index);
                report_running(active.len());
            }
        }
    })
}

/// The model the running jobs use (they share one `Group`), which is never evicted.
fn in_use(active: &[Active]) -> Vec<String> {
    active.first().map(|a| a.group.model.clone()).into_iter().collect()
}

/// Why a job ends before its Result.
enum End {
    Stopped(StopReason),
    Failed(Status),
}

impl From<Status> for End {
    fn from(s: Status) -> Self {
        End::Failed(s)
    }
}

/// A `GenerateError` of `job` as its end.
fn end_of(job: &Job, e: GenerateError) -> End {
    match e {
        GenerateError::Cancelled => End::Stopped(job.stop_reason().unwrap_or(StopReason::ClientGone)),
        GenerateError::Failed(e) => End::Failed(Status::internal(format!("generation failed: {e:#}"))),
    }
}

/// Runs `f` for `job`; a panic becomes the job's INTERNAL end.
fn guarded<T>(job: &Job, f: impl FnOnce() -> Result<T, End>) -> Result<T, End> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        error!(job_id = %job.id, "job panicked: {what}");
        Err(End::Failed(Status::internal(format!("the engine failed on this job: {what}"))))
    })
}

/// Sends a job's last message for `end` (the caller has taken it off the queue).
fn end_job(job: &Arc<Job>, end: End, steps: Option<(usize, usize)>) {
    match end {
        End::Stopped(reason) => {
            if let Some((done, total)) = steps {
                info!(steps_done = done, total, "job stopped before step {}", done);
            }
            info!(reason = reason.as_str(), "job stopped");
            job.end_stopped(reason);
        }
        End::Failed(status) => {
            warn!(code = ?status.code(), message = ?status.message(), "job failed");
            metrics::job_ended("failed");
            job.end_with(status);
        }
    }
}

/// A running job.
struct Active {
    group: Group,
    run: JobRun,
    rep: Reporter,
    /// Set when the job must leave before its next step.
    end: Option<End>,
}

/// What a running job reports and times.
struct Reporter {
    job: Arc<Job>,
    span: tracing::Span,
    queued_seconds: f64,
    model_load_seconds: f64,
    lora_seconds: f64,
    started: Instant,
    last_step_end: Instant,
    protected_latents: Option<tch::Tensor>,
    /// Whether a preview went out yet (the first one is timed for the metrics).
    previewed: bool,
}

/// One step of the running jobs: each job's hooks, then one UNet call per latent size.
/// Jobs that have not stepped yet step first, without the others: a new job's first
/// preview waits for one step of its own, not for a step of every running job. Returns
/// how many jobs stepped, or None when a call yielded to `yield_to` (not while new jobs
/// take their first step): that call's jobs did not move and keep their prepared steps.
fn step_all(model: &StableDiffusion, active: &mut [Active], yield_to: &Interrupt) -> Option<usize> {
    let fresh: Vec<bool> = active.iter().map(|a| a.run.steps_done() == 0).collect();
    let fresh_first = fresh.contains(&true) && fresh.contains(&false);
    let no_yield = Interrupt::default();
    let yield_to = if fresh_first { &no_yield } else { yield_to };
    // Whether each job takes part in this step.
    let part: Vec<bool> = fresh.iter().map(|f| *f || !fresh_first).collect();
    for (a, _) in active.iter_mut().zip(&part).filter(|(_, p)| **p) {
        let job = a.rep.job.clone();
        let _entered = a.rep.span.enter();
        a.end = match job.check_stop() {
            Some(reason) => Some(End::Stopped(reason)),
            None => guarded(&job, || a.run.prepare_step(model).map_err(|e| end_of(&job, e))).err(),
        };
    }
    let mut keys: Vec<BatchKey> = Vec::new();
    for (a, _) in active.iter().zip(&part).filter(|(a, p)| **p && a.end.is_none()) {
        if !keys.contains(&a.run.batch_key()) {
            keys.push(a.run.batch_key());
        }
    }
    let mut stepped = 0;
    for key in keys {
        let in_call = |a: &Active, p: &bool| *p && a.end.is_none() && a.run.batch_key() == key;
        loop {
            let (mut runs, mut reps): (Vec<&mut JobRun>, Vec<&mut Reporter>) = active
                .iter_mut()
                .zip(&part)
                .filter(|(a, p)| in_call(a, p))
                .map(|(a, _)| (&mut a.run, &mut a.rep))
                .unzip();
            if runs.is_empty() {
                break;
            }
            let (size, stepping) = (runs.len(), Instant::now());
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                model.step_batch(&mut runs, yield_to, &mut |i, e| reps[i].on_step(model, e))
            }));
            drop((runs, reps));
            let members: Vec<&mut Active> =
                active.iter_mut().zip(&part).filter(|(a, p)| in_call(a, p)).map(|(a, _)| a).collect();
            match outcome {
                // A job whose step report said Stop has its stop reason set.
                Ok(Ok(_flows)) => {
                    debug!(size, "step batch");
                    metrics::step_batch(size, stepping.elapsed().as_secs_f64());
                    stepped += size;
                    for a in members {
                        a.end = a.rep.job.check_stop().map(End::Stopped);
                    }
                    break;
                }
                // Nobody moved: the interrupted jobs leave and the rest try again; when no
                // job's own interrupt fired, the call yielded and the step ends here.
                Ok(Err(_interrupted)) => {
                    let mut interrupted = false;
                    for a in members.into_iter().filter(|a| a.run.interrupt().raised()) {
                        a.end = Some(End::Stopped(a.rep.job.stop_reason().unwrap_or(StopReason::ClientGone)));
                        interrupted = true;
                    }
                    if !interrupted {
                        let seconds = stepping.elapsed().as_secs_f64();
                        debug!(size, seconds, "step batch yielded to a new job");
                        metrics::step_yielded(seconds);
                        return None;
                    }
                }
                Err(_panic) => {
                    for a in members {
                        error!(job_id = %a.rep.job.id, "the engine panicked in a UNet call");
                        a.end = Some(End::Failed(Status::internal("the engine failed on this job's step")));
                    }
                    break;
                }
            }
        }
    }
    Some(stepped)
}

/// Ends the jobs that stopped or failed, and finishes (decodes and sends) the ones whose
/// steps are all done.
fn settle(model: &StableDiffusion, active: &mut Vec<Active>, queue: &Queue, worker: usize) {
    let mut i = 0;
    while i < active.len() {
        if active[i].end.is_none() && !active[i].run.is_done() {
            i += 1;
            continue;
        }
        let Active { run, rep, end, .. } = active.remove(i);
        let steps = (run.steps_done(), run.total_steps());
        let job = rep.job.clone();
        let _entered = rep.span.enter();
        let outcome = match end {
            Some(end) => Err(end),
            None => guarded(&job, || rep.result(run.finish(model).map_err(|e| end_of(&job, e))?)),
        };
        // The job leaves the queue before its last message goes out, so a client that
        // reacts to that message (Cancel, a new job with the same id, GetServerInfo) never
        // sees it still running.
        queue.finish(worker, &job);
        match outcome {
            Ok(result) => {
                let seconds = result.timings.as_ref().map_or(0.0, |t| t.total_seconds);
                if send(&job, Event::Result(result)) {
                    info!(seconds, "job finished");
                    metrics::job_ended("ok");
                } else {
                    let reason = job.stop_reason().unwrap_or(StopReason::ClientGone);
                    info!(reason = reason.as_str(), "job finished but its result was not delivered");
                    job.end_stopped(reason);
                }
            }
            Err(end) => end_job(&job, end, Some(steps)),
        }
    }
}

struct Worker {
    index: usize,
    /// Its device's name, distinct among the workers (`cpu#0`, `cpu#1` when cpu repeats).
    name: String,
    queue: Arc<Queue>,
    models: Cache<StableDiffusion>,
    loras: loras::LoadedLoras,
    device: Device,
    catalog: Arc<Catalog>,
    lifecycle: Arc<Lifecycle>,
}

/// Sends one event without blocking the engine (`Job::push`). False (and the job marked
/// stopped) when the job is stopping or the event cannot be delivered.
fn send(job: &Arc<Job>, event: Event) -> bool {
    if job.check_stop().is_some() {
        return false;
    }
    match job.push(Ok(job.event(event))) {
        Ok(()) => true,
        Err(reason) => {
            job.stop(reason);
            false
        }
    }
}

impl Worker {
    /// The model `name`, loaded (within the budget, unloading others as needed) unless it
    /// is; `in_use`: the running jobs' models.
    fn model(&mut self, name: &str, in_use: &[String]) -> Result<&StableDiffusion, Status> {
        if !self.models.contains(name) {
            let dir = self.catalog.resolve(name)?;
            // Under a budget, room is made for it (or it is refused) before loading: by its
            // size when it was loaded before, else by the size its files' headers give.
            let kind = default_kind(self.device);
            let expected = match self.models.budget() {
                Some(_) => self.models.known_size(name).or_else(|| estimate_weight_bytes(&dir, kind).ok()),
                None => None,
            };
            if let Some(bytes) = expected {
                self.make_room(name, bytes, in_use)?;
            }
            let t = Instant::now();
            info!(model = name, worker = %self.name, "loading model");
            self.lifecycle.set(name, &self.name, Some(State::Loading));
            let opts = self.catalog.load_options(name);
            let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
                StableDiffusion::load_with(&dir, &opts, self.device, kind)
            }));
            let model = match loaded {
                Ok(Ok(model)) => model,
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => format!("{e:#}"),
                        _ => "the loader panicked".to_string(),
                    };
                    warn!(model = name, "loading the model failed: {why}");
                    self.lifecycle.set(name, &self.name, Some(State::Failed(why.clone())));
                    return Err(Status::failed_precondition(format!("loading model {name:?} failed: {why}")));
                }
            };
            let bytes = model.weight_bytes();
            info!(model = name, seconds = t.elapsed().as_secs_f64(), bytes, "model loaded");
            metrics::model_loaded(t.elapsed().as_secs_f64());
            // The loaded size, should the estimate have been short.
            if let Err(status) = self.make_room(name, bytes, in_use) {
                drop(model);
                frisket_engine::model::release_cpu_memory();
                return Err(status);
            }
            self.models.insert(name, model, bytes);
            self.report_loaded();
            self.lifecycle.set(name, &self.name, Some(State::Loaded));
        }
        self.models.touch(name);
        Ok(self.models.get(name).expect("loaded above"))
    }

    /// Unloads least recently used models (not in `in_use`) until `bytes` of `name` fit.
    /// A model larger than the whole budget is marked failed with why; one that does not
    /// fit beside the running jobs' model is left on disk; nothing is unloaded then.
    fn make_room(&mut self, name: &str, bytes: u64, in_use: &[String]) -> Result<(), Status> {
        let in_use: Vec<&str> = in_use.iter().map(String::as_str).collect();
        let evicted = match self.models.make_room(name, bytes, &in_use) {
            Ok(evicted) => evicted,
            Err(no_room) => {
                let status = no_room.status(name);
                warn!(model = name, bytes, "model not loaded: {}", status.message());
                let state = match no_room {
                    cache::NoRoom::TooLarge { .. } => Some(State::Failed(status.message().to_string())),
                    cache::NoRoom::InUse { .. } => None,
                };
                self.lifecycle.set(name, &self.name, state);
                return Err(status);
            }
        };
        if evicted.is_empty() {
            return Ok(());
        }
        let budget = self.models.budget().unwrap_or(u64::MAX);
        for (evicted, model, evicted_bytes) in evicted {
            drop(model);
            info!(model = %evicted, bytes = evicted_bytes, for_model = name, needed = bytes, budget,
                  "model evicted: least recently used, to make room within --model-memory-mib");
            metrics::model_evicted(&self.name);
            self.lifecycle.set(&evicted, &self.name, None);
        }
        frisket_engine::model::release_cpu_memory();
        self.report_loaded();
        Ok(())
    }

    /// Sets the loaded-model bytes gauge of this worker's device and tells placement which
    /// models it holds.
    fn report_loaded(&self) {
        metrics::loaded_model_bytes(&self.name, self.models.loaded_bytes());
        self.queue.set_loaded(self.index, self.models.names());
    }

    /// The devices `model` is loaded on (this worker's and the others').
    fn devices(&self, model: &str) -> Vec<String> {
        self.lifecycle.devices(model)
    }

    /// Does a LoadModel or UnloadModel for the gRPC handler waiting on its reply.
    fn command(&mut self, command: Command, active: &[Active]) {
        match command {
            Command::Load { model, reply } => {
                let _ = reply.send(self.load(&model, &in_use(active)));
            }
            Command::Unload { model, reply } => {
                let _ = reply.send(self.unload(&model, active));
            }
        }
    }

    /// Loads and warms a model unless it is loaded.
    fn load(&mut self, name: &str, in_use: &[String]) -> Result<Loaded, Status> {
        if self.models.contains(name) {
            self.models.touch(name);
            return Ok(Loaded { devices: self.devices(name), seconds: 0.0 });
        }
        let t = Instant::now();
        self.model(name, in_use)?;
        self.warm(name);
        info!(model = name, seconds = t.elapsed().as_secs_f64(), "model loaded and warmed");
        Ok(Loaded { devices: self.devices(name), seconds: t.elapsed().as_secs_f64() })
    }

    /// Runs one tiny step (one step at 8 latent pixels a side) so that the first job does
    /// not pay for libtorch's first-call setup. A failure is logged: the model is loaded
    /// and a job will report what goes wrong.
    fn warm(&self, name: &str) {
        let model = self.models.get(name).expect("warmed after loading");
        let size = model.vae_scale_factor() * 8;
        let params = GenerateParams { steps: 1, width: size, height: size, ..Default::default() };
        let warmed = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let prepared = model.prepare(&params)?;
            model.generate(prepared, &mut |_| Flow::Continue).map_err(|e| match e {
                GenerateError::Failed(e) => e,
                GenerateError::Cancelled => anyhow::anyhow!("cancelled"),
            })
        }));
        match warmed {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(model = name, "warming the model failed: {e:#}"),
            Err(_) => warn!(model = name, "warming the model panicked"),
        }
    }

    /// Frees a model unless a running job uses it; whether it was loaded.
    fn unload(&mut self, name: &str, active: &[Active]) -> Result<bool, Status> {
        let users = active.iter().filter(|a| a.group.model == name).count();
        if users > 0 {
            return Err(lifecycle::in_use(name, users));
        }
        let was_loaded = self.models.remove(name);
        // A failed load's reason is dropped too: the model is back on disk.
        self.lifecycle.set(name, &self.name, None);
        if was_loaded {
            frisket_engine::model::release_cpu_memory();
            self.report_loaded();
            info!(model = name, "model unloaded");
        }
        Ok(was_loaded)
    }

    /// Starts a job: its model loaded, its LoRAs merged, its images decoded, its plan
    /// announced (Started) and its run begun, ready for its first step.
    fn begin(&mut self, job: &Arc<Job>, span: tracing::Span, in_use: &[String]) -> Result<Active, End> {
        if let Some(reason) = job.check_stop() {
            return Err(End::Stopped(reason));
        }
        let spec = &job.spec;
        let queued_seconds = job.accepted.elapsed().as_secs_f64();
        let loading = Instant::now();
        if !self.models.contains(&spec.meta.name)
            && !send(job, Event::Loading(Loading { model: spec.meta.name.clone() }))
        {
            return Err(End::Stopped(job.stop_reason().unwrap_or(StopReason::ClientGone)));
        }
        self.model(&spec.meta.name, in_use)?;
        let model_load_seconds = loading.elapsed().as_secs_f64();
        let model = self.models.get_mut(&spec.meta.name).expect("loaded above");
        let merging = Instant::now();
        let set = loras::load(&spec.loras, &mut self.loras)?;
        model.set_loras(&set).map_err(|e| loras::status(&spec.meta.name, &e))?;
        let lora_seconds = merging.elapsed().as_secs_f64();
        let model = &*model;
        // The request's images are decoded now, on the engine thread, one job at a time.
        let params = spec.params()?;
        let mut prepared = model.prepare(&params).map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        // A stopped job (Cancel, client gone, deadline, shutdown) frees the engine within
        // one UNet block, attribution chunk or decoder block.
        prepared.interrupt = Interrupt::new({
            let job = job.clone();
            move || job.check_stop().is_some()
        });
        let timesteps = prepared.timesteps.clone();
        // The resolved Grad-SAM plan: its subjects (picked from the prompt when none were
        // named) and manipulation steps go out in Started.
        let (subjects, subjects_auto, manipulation_steps) = match &prepared.explain {
            Some(plan) => {
                let subjects = plan
                    .subjects
                    .iter()
                    .map(|s| Token {
                        index: s.token_index as u32,
                        id: s.id,
                        text: s.token.clone(),
                        word: s.word.clone().unwrap_or_default(),
                        word_index: s.word_index.map(|w| w as u32),
                    })
                    .collect();
                (subjects, plan.subjects_auto, plan.steps.iter().map(|s| s.index as u32).collect())
            }
            None => (Vec::new(), false, Vec::new()),
        };
        let protected_latents = prepared.protect.as_ref().map(|p| p.latents.shallow_clone());
        if let Some(reason) = job.check_stop() {
            return Err(End::Stopped(reason));
        }
        info!(model = %spec.meta.name, steps = timesteps.len(), seed = spec.seed, width = spec.width, height = spec.height,
              scheduler = %spec.scheduler_name, img2img = spec.reference.is_some(), "job started");
        let started = Instant::now();
        let total_steps = timesteps.len() as u32;
        job.set_steps_left(total_steps);
        let started_event = Started {
            total_steps,
            timesteps: timesteps.clone(),
            seed: spec.seed,
            width: spec.width,
            height: spec.height,
            subjects,
            subjects_auto,
            manipulation_steps,
            num_images: job.images,
        };
        if !send(job, Event::Started(started_event)) {
            return Err(End::Stopped(job.stop_reason().unwrap_or(StopReason::ClientGone)));
        }

        let run = model.start(prepared).map_err(|e| end_of(job, e))?;
        Ok(Active {
            group: Group::of(spec),
            run,
            rep: Reporter {
                job: job.clone(),
                span,
                queued_seconds,
                model_load_seconds,
                lora_seconds,
                started,
                last_step_end: started,
                protected_latents,
                previewed: false,
            },
            end: None,
        })
    }
}

impl Reporter {
    /// Turns one step into the job's events; Stop when the job should end.
    fn on_step(&mut self, model: &StableDiffusion, e: &StepEvent) -> Flow {
        let _entered = self.span.enter();
        let job = self.job.clone();
        let spec = &job.spec;
        self.last_step_end = Instant::now();
        job.set_steps_left((e.total - e.index - 1) as u32);
        if job.check_stop().is_some() {
            return Flow::Stop;
        }
        if let Some(every) = spec.latents_every {
            if e.index.is_multiple_of(every) {
                match preview::latent_bytes(e.latents_in) {
                    Ok((shape, data)) => {
                        let latent = Latent {
                            step: e.index as u32,
                            timestep: e.timestep,
                            latent: Some(PbTensor { shape, dtype: "float32".into(), data }),
                        };
                        if !send(&job, Event::Latent(latent)) {
                            return Flow::Stop;
                        }
                    }
                    Err(err) => warn!(step = e.index, "latent not sent: {err:#}"),
                }
            }
        }
        let step = Step {
            index: e.index as u32,
            total: e.total as u32,
            timestep: e.timestep,
            elapsed_seconds: self.started.elapsed().as_secs_f64(),
        };
        if !send(&job, Event::Step(step)) {
            return Flow::Stop;
        }
        if let Some(p) = &spec.previews {
            if (e.index + 1).is_multiple_of(p.every) || e.index + 1 == e.total {
                match preview::render(model, e.denoised, p) {
                    Ok(enc) => {
                        let preview = Preview {
                            step: e.index as u32,
                            timestep: e.timestep,
                            image: enc.bytes,
                            mime_type: enc.mime.into(),
                            width: enc.width,
                            height: enc.height,
                        };
                        if !send(&job, Event::Preview(preview)) {
                            return Flow::Stop;
                        }
                        if !std::mem::replace(&mut self.previewed, true) {
                            metrics::first_preview(job.accepted.elapsed().as_secs_f64());
                        }
                    }
                    Err(err) => warn!(step = e.index, "preview not sent: {err:#}"),
                }
            }
        }
        let protected = if e.index == 0 { self.protected_latents.as_ref() } else { None };
        if protected.is_some() || e.manipulation.is_some() {
            for event in explain_events(e, protected, spec) {
                if !send(&job, event) {
                    return Flow::Stop;
                }
            }
        }
        // Checked once more so a stop that arrived while sending ends the job now,
        // before the next step.
        if job.check_stop().is_some() {
            return Flow::Stop;
        }
        self.last_step_end = Instant::now();
        Flow::Continue
    }

    /// The job's Result from its finished run.
    fn result(&self, generated: Generated) -> Result<JobResult, End> {
        let spec = &self.job.spec;
        let decode_seconds = self.last_step_end.elapsed().as_secs_f64();

        // The same encode path as `frisket-server render`.
        let rgb = image_io::tensor_to_rgb(&generated.image).map_err(|e| Status::internal(format!("{e:#}")))?;
        let png = image_io::encode_png(&rgb).map_err(|e| Status::internal(format!("{e:#}")))?;
        let (change_map, psnr_protected, psnr_outside) = match &generated.comparison {
            Some(c) => {
                (preview::change_map_png(&c.change_map).unwrap_or_default(), c.psnr_protected, Some(c.psnr_outside))
            }
            None => (Vec::new(), None, None),
        };
        let fractions = generated.reference_fractions.iter().map(|f| f.fraction).collect();
        let total_seconds = self.started.elapsed().as_secs_f64();
        let result = JobResult {
            // Set by `Events::push` when the Result is queued.
            dropped_events: 0,
            image: png,
            mime_type: "image/png".into(),
            seed: spec.seed,
            settings: Some(Settings {
                model: spec.meta.name.clone(),
                prompt: spec.prompt.clone(),
                negative_prompt: spec.negative_prompt.clone(),
                seed: spec.seed,
                steps: spec.steps as u32,
                guidance: spec.guidance,
                scheduler: spec.scheduler_name.clone(),
                width: spec.width,
                height: spec.height,
                img2img: spec.reference.is_some(),
                strength: if spec.reference.is_some() { spec.strength } else { 1.0 },
            }),
            timings: Some(Timings {
                queued_seconds: self.queued_seconds,
                total_seconds,
                seconds_per_step: (total_seconds - decode_seconds) / (generated.timesteps.len().max(1) as f64),
                decode_seconds,
                model_load_seconds: self.model_load_seconds,
                lora_seconds: self.lora_seconds,
            }),
            change_map,
            reference_fraction_per_step: fractions,
            psnr_protected,
            psnr_outside,
        };
        Ok(result)
    }
}

fn pb_tensor(t: &tch::Tensor) -> anyhow::Result<PbTensor> {
    let (shape, data) = preview::latent_bytes(t)?;
    Ok(PbTensor { shape, dtype: "float32".into(), data })
}

/// The Grad-SAM / protection events of one step, in stream order: the protected-region
/// mask (first step only), one heatmap per subject, the manipulation mask — each as the
/// request's `stream.explain` asks. An event that cannot be built is logged and skipped.
fn explain_events(e: &StepEvent, protected: Option<&tch::Tensor>, spec: &super::request::JobSpec) -> Vec<Event> {
    let want = spec.explain_stream;
    let (width, height) = (spec.width, spec.height);
    let mut events = Vec::new();
    if want.masks {
        if let Some(p) = protected {
            let mask = p.squeeze_dim(0); // [1, h, w]
            let built = (|| -> anyhow::Result<PbMask> {
                Ok(PbMask {
                    step: e.index as u32,
                    timestep: e.timestep,
                    kind: MaskKind::Protected as i32,
                    mask: Some(pb_tensor(&mask)?),
                    png: preview::mask_png(&mask, width, height)?,
                    reference_fraction: mask.mean(tch::Kind::Float).double_value(&[]),
                })
            })();
            match built {
                Ok(m) => events.push(Event::Mask(m)),
                Err(err) => warn!(step = e.index, "protected mask not sent: {err:#}"),
            }
        }
    }
    let Some(m) = e.manipulation else { return events };
    if want.heatmaps && !m.heatmaps.is_empty() {
        let base = preview::approx_rgb(e.denoised);
        for h in &m.heatmaps {
            let built = (|| -> anyhow::Result<PbHeatmap> {
                let base = base.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                Ok(PbHeatmap {
                    step: m.index as u32,
                    timestep: m.timestep,
                    token_index: h.subject.token_index as u32,
                    token: h.subject.token.clone(),
                    map: Some(pb_tensor(&h.map)?),
                    png: preview::heatmap_png(&h.map, base, width, height)?,
                    subject_mask_png: preview::subject_mask_png(&h.map, width, height)?,
                })
            })();
            match built {
                Ok(h) => events.push(Event::Heatmap(h)),
                Err(err) => warn!(step = m.index, "heatmap not sent: {err:#}"),
            }
        }
    }
    if want.masks {
        let built = (|| -> anyhow::Result<PbMask> {
            Ok(PbMask {
                step: m.index as u32,
                timestep: m.timestep,
                kind: MaskKind::Manipulation as i32,
                mask: Some(pb_tensor(&m.mask)?),
                png: preview::mask_png(&m.mask, width, height)?,
                reference_fraction: m.reference_fraction,
            })
        })();
        match built {
            Ok(mask) => events.push(Event::Mask(mask)),
            Err(err) => warn!(step = m.index, "mask not sent: {err:#}"),
        }
    }
    events
}
