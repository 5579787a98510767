//! Jobs stepped together (`StableDiffusion::step_batch`) give the images they give alone,
//! up to the kernels' summation order: guided and unguided jobs, different schedulers,
//! step counts, img2img, and a job that joins while another is under way; a job whose
//! interrupt fires in a shared UNet call leaves without moving the others, and a call that
//! yields moves nobody.
mod common;

use frisket_engine::interrupt::Interrupt;
use frisket_engine::model::StableDiffusion;
use frisket_engine::pipeline::{Flow, GenerateError, GenerateParams, JobRun};
use frisket_engine::schedulers::SchedulerKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Largest difference allowed between a job's image stepped with others and alone, in
/// [0, 1] pixel units (1 / 255): batched GEMMs sum in another order, and guidance scales
/// the difference up at every step. A wrong row, timestep or context moves pixels by
/// tenths.
const TOLERANCE: f64 = 1.0 / 255.0;

fn jobs() -> Vec<GenerateParams> {
    // A pattern, not a draw: tests run in parallel, and a draw from libtorch's process-wide
    // generator here could land between another job's seeding and its noise draws.
    let reference = (Tensor::arange(3 * 64 * 64, (Kind::Float, Device::Cpu)).reshape([1, 3, 64, 64]) * 0.05).sin();
    vec![
        GenerateParams {
            prompt: "a red circle".into(),
            seed: 1,
            steps: 6,
            width: 64,
            height: 64,
            ..Default::default()
        },
        GenerateParams {
            prompt: "a blue square".into(),
            seed: 2,
            steps: 4,
            guidance: 1.0,
            scheduler: SchedulerKind::EulerAncestral,
            width: 64,
            height: 64,
            ..Default::default()
        },
        GenerateParams {
            prompt: "a green star".into(),
            negative_prompt: "blurry".into(),
            seed: 3,
            steps: 8,
            scheduler: SchedulerKind::DpmSolverMultistep,
            width: 64,
            height: 64,
            reference: Some(reference),
            strength: 0.7,
            ..Default::default()
        },
    ]
}

fn alone(model: &StableDiffusion, p: &GenerateParams) -> Tensor {
    model.generate(model.prepare(p).unwrap(), &mut |_| Flow::Continue).unwrap().image
}

/// Steps `jobs` together; job i joins after `joins[i]` shared steps; every call may yield
/// to `yield_to` (then it is made again). Returns each image.
fn together(
    model: &StableDiffusion,
    jobs: &[GenerateParams],
    joins: &[usize],
    interrupts: &[Interrupt],
    yield_to: &Interrupt,
) -> Vec<Option<Tensor>> {
    let mut waiting: Vec<Option<JobRun>> = Vec::new();
    for (p, interrupt) in jobs.iter().zip(interrupts) {
        let mut job = model.prepare(p).unwrap();
        job.interrupt = interrupt.clone();
        waiting.push(Some(model.start(job).unwrap()));
    }
    let mut running: Vec<(usize, JobRun)> = Vec::new();
    let mut images: Vec<Option<Tensor>> = jobs.iter().map(|_| None).collect();
    let mut shared_steps = 0;
    loop {
        for (i, slot) in waiting.iter_mut().enumerate() {
            if joins[i] <= shared_steps {
                if let Some(run) = slot.take() {
                    running.push((i, run));
                }
            }
        }
        running.retain(|(_, run)| !run.interrupt().raised());
        if running.is_empty() && waiting.iter().all(Option::is_none) {
            return images;
        }
        running.retain_mut(|(_, run)| match run.prepare_step(model) {
            Ok(()) => true,
            Err(GenerateError::Cancelled) => false,
            Err(e) => panic!("{e}"),
        });
        let mut runs: Vec<&mut JobRun> = running.iter_mut().map(|(_, r)| r).collect();
        match model.step_batch(&mut runs, yield_to, &mut |_, _| Flow::Continue) {
            Ok(flows) => assert!(flows.iter().all(|f| *f == Flow::Continue)),
            // Nobody moved: an interrupted job leaves at the top of the loop.
            Err(_) => continue,
        }
        shared_steps += 1;
        let (done, rest): (Vec<_>, Vec<_>) = running.into_iter().partition(|(_, r)| r.is_done());
        running = rest;
        for (i, run) in done {
            images[i] = Some(run.finish(model).unwrap().image);
        }
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_family(family: &str) {
    let model = StableDiffusion::load(&common::model_dir(family), Device::Cpu).unwrap();
    let jobs = jobs();
    let expected: Vec<Tensor> = jobs.iter().map(|p| alone(&model, p)).collect();
    let never = vec![Interrupt::default(); jobs.len()];
    // All from the start, then the third joining after two shared steps.
    for joins in [[0, 0, 0], [0, 0, 2]] {
        let images = together(&model, &jobs, &joins, &never, &Interrupt::default());
        for (i, (image, expected)) in images.iter().zip(&expected).enumerate() {
            let diff = max_diff(image.as_ref().unwrap(), expected);
            println!("{family} joins {joins:?} job {i}: max |batched - alone| = {diff:.3e}");
            assert!(diff <= TOLERANCE, "{family} job {i}: {diff} > {TOLERANCE}");
        }
    }
}

#[test]
fn stacked_jobs_match_their_lone_runs_sd1() {
    check_family("sd1");
}

#[test]
fn stacked_jobs_match_their_lone_runs_sdxl() {
    check_family("sdxl");
}

#[test]
fn a_lone_job_stepped_through_step_batch_is_bit_identical_to_generate() {
    let model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    for p in jobs() {
        let image = together(&model, std::slice::from_ref(&p), &[0], &[Interrupt::default()], &Interrupt::default());
        assert_eq!(max_diff(image[0].as_ref().unwrap(), &alone(&model, &p)), 0.0);
    }
}

#[test]
fn an_interrupted_job_leaves_a_shared_call_without_moving_the_others() {
    let model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let jobs = jobs();
    let expected: Vec<Tensor> = jobs.iter().map(|p| alone(&model, p)).collect();
    // Job 1's interrupt fires inside the third shared UNet call (checks between blocks).
    let raised = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let interrupt = {
        let (raised, calls) = (raised.clone(), calls.clone());
        Interrupt::new(move || {
            if calls.fetch_add(1, Ordering::SeqCst) == 20 {
                raised.store(true, Ordering::SeqCst);
            }
            raised.load(Ordering::SeqCst)
        })
    };
    let interrupts = vec![Interrupt::default(), interrupt, Interrupt::default()];
    let images = together(&model, &jobs, &[0, 0, 0], &interrupts, &Interrupt::default());
    assert!(raised.load(Ordering::SeqCst), "the interrupt never fired");
    assert!(images[1].is_none(), "the interrupted job produced an image");
    for i in [0, 2] {
        let diff = max_diff(images[i].as_ref().unwrap(), &expected[i]);
        assert!(diff <= TOLERANCE, "job {i}: {diff} > {TOLERANCE}");
    }
}

#[test]
fn a_call_that_yields_moves_nobody_and_its_retry_gives_the_same_images() {
    let model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let jobs = jobs();
    let never = vec![Interrupt::default(); jobs.len()];
    let plain = together(&model, &jobs, &[0, 0, 0], &never, &Interrupt::default());
    // The yield fires once, inside the third shared UNet call (checks between blocks).
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let yield_to = {
        let calls = calls.clone();
        Interrupt::new(move || calls.fetch_add(1, Ordering::SeqCst) == 20)
    };
    let yielded = together(&model, &jobs, &[0, 0, 0], &never, &yield_to);
    assert!(calls.load(Ordering::SeqCst) > 20, "the yield never fired");
    for (i, (a, b)) in plain.iter().zip(&yielded).enumerate() {
        assert_eq!(max_diff(a.as_ref().unwrap(), b.as_ref().unwrap()), 0.0, "job {i}");
    }
}
