//! Grad-SAM manipulation and protected regions inside whole jobs: event counts and order,
//! bit-exact protected pixels, the summary numbers, and the errors a request can get.
mod common;

use frisket_engine::explain::{ExplainMode, ExplainParams, LayerChoice, SubjectSpec};
use frisket_engine::image_io;
use frisket_engine::model::StableDiffusion;
use frisket_engine::pipeline::{Flow, GenerateParams, Generated, StartMode, StepEvent};
use frisket_engine::protect::ProtectParams;
use frisket_engine::schedulers::SchedulerKind;
use tch::{Device, Kind, Tensor};

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&common::model_dir(name), Device::Cpu).unwrap()
}

/// The pipeline fixtures' reference picture of a model, as 8-bit RGB.
fn reference(name: &str) -> image::RgbImage {
    image_io::read_rgb(&common::fixtures().join(format!("ref/pipeline/reference_{name}.png"))).unwrap()
}

/// A rectangle mask [H, W] u8 (255 inside [y0, y1) × [x0, x1)).
fn rect(w: i64, h: i64, (x0, y0, x1, y1): (i64, i64, i64, i64)) -> Tensor {
    let m = Tensor::zeros([h, w], (Kind::Uint8, Device::Cpu));
    let _ = m.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).fill_(255);
    m
}

fn job(img: &image::RgbImage, prompt: &str) -> GenerateParams {
    GenerateParams {
        prompt: prompt.into(),
        seed: 11,
        steps: 10,
        guidance: 7.5,
        scheduler: SchedulerKind::Ddim,
        width: img.width() as i64,
        height: img.height() as i64,
        reference: Some(image_io::rgb_to_tensor(img)),
        strength: 0.9,
        ..Default::default()
    }
}

/// A manipulated step: (index, timestep, subject token indices of the heatmaps, mask shape,
/// share from the reference).
type SeenManipulation = (usize, f64, Vec<usize>, Vec<i64>, f64);

/// What the step callback saw, in order.
#[derive(Default, Debug)]
struct Seen {
    steps: usize,
    plans: Vec<usize>,
    manipulations: Vec<SeenManipulation>,
    auto: Option<bool>,
    subjects: Vec<String>,
    protected_share: Option<f64>,
    heatmap_shapes: Vec<Vec<i64>>,
}

fn run(model: &StableDiffusion, p: &GenerateParams) -> (Generated, Seen) {
    let mut seen = Seen::default();
    let job = model.prepare(p).unwrap();
    if job.explain.is_some() || job.protect.is_some() {
        seen.plans.push(0);
        seen.auto = Some(job.explain.as_ref().is_some_and(|e| e.subjects_auto));
        seen.subjects = job.explain.iter().flat_map(|e| e.subjects.iter().map(|s| s.label())).collect();
        seen.protected_share = job.protect.as_ref().map(|m| m.latents.mean(Kind::Float).double_value(&[]));
    }
    let out = model
        .generate(job, &mut |e: &StepEvent| {
            seen.steps += 1;
            if let Some(m) = e.manipulation {
                assert_eq!(m.index, e.index);
                assert_eq!(m.timestep, e.timestep);
                seen.heatmap_shapes.extend(m.heatmaps.iter().map(|h| h.map.size()));
                seen.manipulations.push((
                    m.index,
                    m.timestep,
                    m.heatmaps.iter().map(|h| h.subject.token_index).collect(),
                    m.mask.size(),
                    m.reference_fraction,
                ));
            }
            Flow::Continue
        })
        .unwrap();
    (out, seen)
}

fn bytes(image: &Tensor) -> image::RgbImage {
    image_io::tensor_to_rgb(image).unwrap()
}

#[test]
fn protected_pixels_are_bit_exact_and_the_rest_changes() {
    let model = load("sd1");
    let img = reference("sd1");
    let (w, h) = (img.width() as i64, img.height() as i64);
    // Not aligned to the 4-pixel latent blocks: the latent mask must cover it conservatively.
    let region = (5, 3, 27, 21);
    for (scheduler, feather) in [(SchedulerKind::Ddim, 0), (SchedulerKind::Euler, 3)] {
        let mut p = job(&img, "a small yellow star at the top left");
        p.scheduler = scheduler;
        p.explain = Some(ExplainParams { subjects: vec![SubjectSpec::Word("star".into())], ..Default::default() });
        p.protect = Some(ProtectParams { mask: rect(w, h, region), feather });
        let (out, seen) = run(&model, &p);
        let rgb = bytes(&out.image);
        let (mut inside_diff, mut outside_changed, mut outside) = (0, 0, 0);
        for (x, y, px) in rgb.enumerate_pixels() {
            let (x, y) = (x as i64, y as i64);
            let inside = x >= region.0 && x < region.2 && y >= region.1 && y < region.3;
            let want = img.get_pixel(x as u32, y as u32);
            if inside {
                inside_diff += (px != want) as usize;
            } else {
                outside += 1;
                outside_changed += (px != want) as usize;
            }
        }
        println!("{scheduler}: outside the region {outside_changed}/{outside} pixels changed; events {seen:?}");
        assert_eq!(inside_diff, 0, "{scheduler}: protected pixels differ from the reference");
        assert!(outside_changed > outside / 2, "{scheduler}: only {outside_changed}/{outside} pixels outside changed");
        let summary = out.comparison.as_ref().expect("img2img compares with the reference");
        assert_eq!(summary.psnr_protected, Some(f64::INFINITY));
        assert!(summary.psnr_outside.is_finite() && summary.psnr_outside > 0.0);
        assert_eq!(summary.change_map.size(), vec![h, w]);
        assert_eq!(
            summary
                .change_map
                .narrow(0, region.1, region.3 - region.1)
                .narrow(1, region.0, region.2 - region.0)
                .abs()
                .max()
                .double_value(&[]),
            0.0
        );
        // One plan; three manipulations (780, 520, 320 snapped), in order,
        // one heatmap per subject ("star" is token 4) and a [4, 12, 16] mask each.
        assert_eq!(seen.steps, 9);
        assert_eq!(seen.plans, vec![0]);
        assert_eq!(seen.auto, Some(false));
        let share = seen.protected_share.unwrap();
        assert!(share > 0.0 && share < 1.0, "{share}");
        let indices: Vec<usize> = seen.manipulations.iter().map(|m| m.0).collect();
        assert_eq!(indices.len(), 3);
        assert!(indices.windows(2).all(|w| w[0] < w[1]), "{indices:?}");
        for (i, (_, t, subjects, shape, fraction)) in seen.manipulations.iter().enumerate() {
            assert_eq!(subjects, &vec![4]);
            assert_eq!(shape, &vec![4, 12, 16]);
            assert!(*fraction >= share && *fraction < 1.0, "{fraction}");
            assert_eq!(out.reference_fractions[i].fraction, *fraction);
            assert_eq!(out.reference_fractions[i].timestep, *t);
        }
        if scheduler == SchedulerKind::Ddim {
            // DDIM leading, 10 steps, strength 0.9: 801, 701, …, 1 → 780→801, 520→501, 320→301.
            let ts: Vec<f64> = seen.manipulations.iter().map(|m| m.1).collect();
            assert_eq!(ts, vec![801.0, 501.0, 301.0]);
        }
        assert!(seen.heatmap_shapes.iter().all(|s| s == &vec![4, 12, 16]));
    }
}

#[test]
fn exact_mode_runs_in_a_job_with_automatic_subjects() {
    let model = load("sd2");
    let img = reference("sd2");
    let mut p = job(&img, "a red circle on a blue background");
    p.start = StartMode::Noise;
    p.explain = Some(ExplainParams {
        mode: ExplainMode::Exact,
        layers: LayerChoice::Last,
        timesteps: vec![500.0],
        ..Default::default()
    });
    let (out, seen) = run(&model, &p);
    assert_eq!(seen.auto, Some(true));
    assert_eq!(seen.manipulations.len(), 1);
    // Automatic subjects: the content words "red", "circle", "blue" (tokens 2, 3, 6).
    assert_eq!(seen.manipulations[0].2, vec![2, 3, 6]);
    assert_eq!(out.comparison.unwrap().psnr_protected, None);
    assert_eq!(seen.subjects, vec!["red", "circle", "blue"]);
}

#[test]
fn plain_and_noise_starts_differ_and_explain_draws_leave_the_job_alone() {
    let model = load("sd1");
    let img = reference("sd1");
    let p = job(&img, "a duck");
    let (plain, _) = run(&model, &p);
    assert!(plain.reference_fractions.is_empty());
    // A protect-only job: the same draws as img2img plus one, so outside the protected
    // latents its first step sees the same latent.
    let mut first = Vec::new();
    let mut q = p.clone();
    let (w, h) = (img.width() as i64, img.height() as i64);
    q.protect = Some(ProtectParams { mask: rect(w, h, (0, 0, 8, 8)), feather: 0 });
    model
        .generate(model.prepare(&q).unwrap(), &mut |e: &StepEvent| {
            if e.index == 0 {
                first.push(e.latents_in.copy());
            }
            Flow::Continue
        })
        .unwrap();
    let mut plain_first = Vec::new();
    model
        .generate(model.prepare(&p).unwrap(), &mut |e: &StepEvent| {
            if e.index == 0 {
                plain_first.push(e.latents_in.copy());
            }
            Flow::Continue
        })
        .unwrap();
    let outside = |t: &Tensor| t.narrow(2, 2, 10).narrow(3, 2, 14);
    assert_eq!(outside(&first[0]).ne_tensor(&outside(&plain_first[0])).sum(Kind::Int64).int64_value(&[]), 0);
    let mut n = p.clone();
    n.start = StartMode::Noise;
    let (noise, _) = run(&model, &n);
    assert!((&noise.image - &plain.image).abs().max().double_value(&[]) > 0.01);
}

fn error(model: &StableDiffusion, p: &GenerateParams) -> String {
    model.prepare(p).err().expect("expected an error").to_string()
}

#[test]
fn bad_requests_get_clear_errors() {
    let model = load("sd1");
    let img = reference("sd1");
    let (w, h) = (img.width() as i64, img.height() as i64);
    let base = job(&img, "a small yellow star");
    let with = |f: &dyn Fn(&mut ExplainParams)| {
        let mut p = base.clone();
        let mut e = ExplainParams::default();
        f(&mut e);
        p.explain = Some(e);
        p
    };
    let e = error(&model, &with(&|e| e.subjects = vec![SubjectSpec::Index(77)]));
    assert!(e.contains("token index 77 is out of range"), "{e}");
    let e = error(&model, &with(&|e| e.subjects = vec![SubjectSpec::Word("duck".into())]));
    assert!(e.contains("\"duck\" is not in the prompt"), "{e}");
    let e = error(&model, &with(&|e| e.timesteps = vec![950.0]));
    assert!(e.contains("950") && e.contains("outside this job's schedule"), "{e}");
    let e = error(&model, &with(&|e| e.layers = LayerChoice::List(vec![11])));
    assert!(e.contains("layer 11 does not exist"), "{e}");
    let e = error(&model, &with(&|e| e.mask.blur_kernel = 4));
    assert!(e.contains("blur kernel"), "{e}");
    let protect = |mask: Tensor| {
        let mut p = base.clone();
        p.protect = Some(ProtectParams { mask, feather: 0 });
        p
    };
    let e = error(&model, &protect(rect(w / 2, h, (0, 0, 4, 4))));
    assert!(e.contains("32×48 pixels but the image is 64×48"), "{e}");
    let e = error(&model, &protect(Tensor::zeros([h, w], (Kind::Uint8, Device::Cpu))));
    assert!(e.contains("blank"), "{e}");
    let e = error(&model, &protect(Tensor::ones([h, w], (Kind::Uint8, Device::Cpu))));
    assert!(e.contains("whole image"), "{e}");
    // One pixel set in every 4×4 block: every latent element is protected.
    let grid = Tensor::zeros([h, w], (Kind::Uint8, Device::Cpu));
    let _ = grid.slice(0, 0, h, 4).slice(1, 0, w, 4).fill_(1);
    let e = error(&model, &protect(grid));
    assert!(e.contains("every latent element"), "{e}");
    let mut p = base.clone();
    p.reference = None;
    p.explain = Some(ExplainParams::default());
    let e = error(&model, &p);
    assert!(e.contains("need a reference image"), "{e}");
    // No content word in the prompt: ask for a subject.
    let mut p = job(&img, "on the top left");
    p.explain = Some(ExplainParams::default());
    let e = error(&model, &p);
    assert!(e.contains("no subject found"), "{e}");
}
