//! A job's interrupt stops it inside a step: between UNet blocks, between exact-attribution
//! chunks and between VAE decoder blocks, not only between steps. The interrupt counts its
//! own checks, so the tests see where each one happens without any timing.
mod common;

use frisket_engine::explain::{ExplainMode, ExplainParams, LayerChoice, SubjectSpec};
use frisket_engine::interrupt::Interrupt;
use frisket_engine::model::StableDiffusion;
use frisket_engine::pipeline::{Flow, GenerateError, GenerateParams};
use frisket_engine::schedulers::SchedulerKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn params(explain: Option<ExplainParams>) -> GenerateParams {
    GenerateParams {
        prompt: "a red circle".into(),
        seed: 3,
        steps: 3,
        guidance: 7.5,
        scheduler: SchedulerKind::Ddim,
        width: 64,
        height: 64,
        // A pattern, not a draw from libtorch's process-wide generator, which other tests'
        // jobs seed and draw from in parallel.
        reference: explain.as_ref().map(|_| {
            (Tensor::arange(3 * 64 * 64, (Kind::Float, Device::Cpu)).reshape([1, 3, 64, 64]) * 0.05).sin() * 0.5 + 0.5
        }),
        strength: 1.0,
        explain,
        ..Default::default()
    }
}

/// Runs `p` with an interrupt that fires at check number `fire_at` (never when None).
/// Returns (checks made, steps completed, cancelled).
fn run(model: &StableDiffusion, p: &GenerateParams, fire_at: Option<usize>) -> (usize, usize, bool) {
    let checks = Arc::new(AtomicUsize::new(0));
    let mut job = model.prepare(p).unwrap();
    job.interrupt = Interrupt::new({
        let checks = checks.clone();
        move || {
            let n = checks.fetch_add(1, Ordering::SeqCst) + 1;
            fire_at.is_some_and(|f| n >= f)
        }
    });
    let mut steps = 0;
    let outcome = model.generate(job, &mut |_| {
        steps += 1;
        Flow::Continue
    });
    let cancelled = match outcome {
        Ok(_) => false,
        Err(GenerateError::Cancelled) => true,
        Err(e) => panic!("{e}"),
    };
    (checks.load(Ordering::SeqCst), steps, cancelled)
}

#[test]
fn an_interrupt_stops_the_job_inside_its_first_step() {
    let model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let p = params(None);
    let (total, steps, cancelled) = run(&model, &p, None);
    assert_eq!((steps, cancelled), (3, false));
    // One check before each step, one before each UNet block, one per decoder resnet.
    let blocks = model.unet.config().block_out_channels.len() * 2 + 1;
    assert!(total > 3 * (1 + blocks), "only {total} checks in a 3-step job");

    // Firing at the third check: inside the first step's UNet call.
    let (checks, steps, cancelled) = run(&model, &p, Some(3));
    assert_eq!((checks, steps, cancelled), (3, 0, true));

    // Firing at the last check: all steps done, stopped inside the VAE decoder.
    let (checks, steps, cancelled) = run(&model, &p, Some(total));
    assert_eq!((checks, steps, cancelled), (total, 3, true));
}

#[test]
fn an_interrupt_stops_exact_attribution_between_chunks() {
    let model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let explain = ExplainParams {
        mode: ExplainMode::Exact,
        layers: LayerChoice::Last,
        subjects: vec![SubjectSpec::Word("circle".into())],
        timesteps: vec![667.0],
        exact_batch: Some(64),
        ..Default::default()
    };
    let p = params(Some(explain));
    let (plain, _, _) = run(&model, &params(None), None);
    let (total, steps, cancelled) = run(&model, &p, None);
    assert_eq!((steps, cancelled), (3, false));
    // One check per chunk of 64 latent elements, plus the attribution's UNet call.
    let factor = model.vae_scale_factor();
    let elements = model.unet.config().in_channels * (64 / factor) * (64 / factor);
    let chunks = (elements as usize).div_ceil(64);
    assert!(chunks >= 2, "{elements} latent elements");
    let blocks = model.unet.config().block_out_channels.len() * 2 + 1;
    assert_eq!(total, plain + chunks + blocks, "checks with exact attribution vs without");

    // Firing at the second chunk: before the first step's own UNet call and its event.
    let (checks, steps, cancelled) = run(&model, &p, Some(1 + blocks + 2));
    assert_eq!((checks, steps, cancelled), (1 + blocks + 2, 0, true));
}
