//! `frisket-server` command line: `render` (one local image) and `serve` (the gRPC service).
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use frisket_engine::explain::dump::{Dump, Entry};
use frisket_engine::explain::{
    ExplainMode, ExplainParams, LayerChoice, MaskParams, ProtectParams, StartMode, SubjectSpec,
};
use frisket_engine::image_io;
use frisket_engine::model::{parse_device, StableDiffusion};
use frisket_engine::pipeline::{Flow, GenerateParams, StepEvent};
use frisket_engine::schedulers::SchedulerKind;
use frisket_engine::tch;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "frisket-server", version, about = "Frisket: Stable Diffusion on libtorch")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Render one image locally, without the service.
    Render(RenderArgs),
    /// Serve the gRPC API (frisket.v1.Frisket, health, reflection) until SIGTERM/Ctrl-C.
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// A folder with one diffusers model folder per model name (e.g. models/sd1, models/sd2).
    #[arg(long)]
    pub models: PathBuf,
    /// Address to listen on; port 0 picks a free port (the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Jobs that may wait behind the running one; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub queue_capacity: u32,
    /// Seconds that accepted jobs may run on after SIGTERM before they are stopped.
    #[arg(long, default_value_t = 30.0)]
    pub grace_period: f64,
}

#[derive(Args)]
pub struct RenderArgs {
    /// A diffusers-format model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Denoising steps [default: 20; 50 with --preset paper].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale [default: 7.5; 8 with --preset paper].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim, euler, euler-a, dpm++ or dpm++-karras.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Karras sigmas (for dpm++).
    #[arg(long)]
    pub karras: bool,
    /// Output width in pixels; defaults to the reference's width, else 512.
    #[arg(long)]
    pub width: Option<i64>,
    #[arg(long)]
    pub height: Option<i64>,
    /// img2img: the image to start from (PNG or JPEG).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// How much of the schedule img2img runs [default: 0.8; 0.9 with --preset paper].
    #[arg(long, requires = "reference")]
    pub strength: Option<f64>,
    /// How img2img starts: `reference` (SDEdit, the default) or `noise` (pure noise at the
    /// strength's start timestep, the paper's code; the default with --preset paper).
    #[arg(long, requires = "reference")]
    pub start: Option<StartMode>,
    /// Grad-SAM: keep this prompt word's latents, the rest from the reference (repeatable).
    #[arg(long = "subject", value_name = "WORD", requires = "reference")]
    pub subjects: Vec<String>,
    /// Grad-SAM: a subject by token position among the 77 (0 = start token; repeatable).
    #[arg(long = "subject-index", value_name = "N", requires = "reference")]
    pub subject_indices: Vec<usize>,
    /// Grad-SAM attribution: exact (one backward per latent element), fast, or off.
    /// Defaults to fast when another Grad-SAM option or --preset paper is given, else off.
    #[arg(long, value_parser = ["exact", "fast", "off"], requires = "reference")]
    pub explain: Option<String>,
    /// Cross-attention layers: last, all, or a list like 0,5,10 [default: last].
    #[arg(long, requires = "reference")]
    pub explain_layers: Option<LayerChoice>,
    /// Timesteps to manipulate at, snapped to the job's nearest [default: 780,520,320].
    #[arg(long, value_delimiter = ',', value_name = "T1,T2,…", requires = "reference")]
    pub manipulate_at: Option<Vec<f64>>,
    /// Mask threshold k in mean + k·std [default: 0.5].
    #[arg(long, value_name = "K", requires = "reference")]
    pub mask_threshold: Option<f64>,
    /// Mask Gaussian blur kernel (odd) [default: 3].
    #[arg(long, requires = "reference")]
    pub mask_blur: Option<i64>,
    /// Mask Gaussian blur sigma [default: 6].
    #[arg(long, requires = "reference")]
    pub mask_sigma: Option<f64>,
    /// Mask dilation max-filter size (odd) [default: 3].
    #[arg(long, requires = "reference")]
    pub mask_dilate: Option<i64>,
    /// Mask dilation passes [default: 1].
    #[arg(long, requires = "reference")]
    pub mask_dilate_passes: Option<usize>,
    /// Exact mode: latent elements per backward pass [default: from the latent size].
    #[arg(long, requires = "reference")]
    pub exact_batch: Option<usize>,
    /// A protected region: an 8-bit mask image at the output size, non-zero = protected.
    #[arg(long, value_name = "MASK.png", requires = "reference")]
    pub protect: Option<PathBuf>,
    /// Outward feather of the protected region, in pixels.
    #[arg(long, default_value_t = 0, requires = "protect")]
    pub feather: u32,
    /// `paper`: 50 steps, CFG 8, strength 0.9, t = 780/520/320, last layer, k = 0.5, noise start,
    /// fast Grad-SAM (exact for the last layer); explicit flags override it. The scheduler stays
    /// --scheduler's (the paper's DDPM is not implemented; DDIM by default).
    #[arg(long, value_parser = ["paper"], requires = "reference")]
    pub preset: Option<String>,
    /// Write every heatmap and mask as .npy and .png, with a manifest.json.
    #[arg(long, value_name = "DIR")]
    pub dump_dir: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub quiet: bool,
    /// Write per-step wall-clock times as JSON (used by `make bench`).
    #[arg(long)]
    pub timings: Option<PathBuf>,
}

/// Parses arguments; a usage error is reported on one line with a non-zero exit.
pub fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().map(str::trim);
            let first = lines.next().unwrap_or("invalid arguments");
            // "…were not provided:" lists the arguments on the lines that follow.
            let message = match first.ends_with(':') {
                true => format!("{first} {}", lines.take_while(|l| !l.is_empty()).collect::<Vec<_>>().join(", ")),
                false => first.to_string(),
            };
            eprintln!("{message} (see --help)");
            std::process::exit(2);
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Render(args) => render(args),
        Command::Serve(args) => serve(args),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    anyhow::ensure!(
        a.grace_period.is_finite() && a.grace_period >= 0.0,
        "--grace-period must be a number of seconds ≥ 0, got {}",
        a.grace_period
    );
    crate::service::run(crate::service::ServeConfig {
        models: a.models,
        listen: a.listen,
        device: a.device,
        queue_capacity: a.queue_capacity as usize,
        grace_period: std::time::Duration::from_secs_f64(a.grace_period),
        limits: crate::service::Limits::default(),
    })
}

fn render(a: RenderArgs) -> Result<()> {
    let (scheduler, karras_by_name) = SchedulerKind::parse_with_karras(&a.scheduler)?;
    let device = parse_device(&a.device)?;
    let reference = match &a.reference {
        Some(path) => {
            let mut img = image_io::read_rgb(path)?;
            let (w, h) = (a.width.unwrap_or(img.width() as i64), a.height.unwrap_or(img.height() as i64));
            if (w, h) != (img.width() as i64, img.height() as i64) {
                anyhow::ensure!(w > 0 && h > 0, "width and height must be positive");
                img = image::imageops::resize(&img, w as u32, h as u32, image::imageops::FilterType::Lanczos3);
            }
            Some(img)
        }
        None => None,
    };
    let width = a.width.or(reference.as_ref().map(|r| r.width() as i64)).unwrap_or(512);
    let height = a.height.or(reference.as_ref().map(|r| r.height() as i64)).unwrap_or(512);
    let paper = a.preset.is_some();
    let explain = explain_params(&a, paper)?;
    let protect = match &a.protect {
        Some(path) => {
            let img = image::open(path).with_context(|| format!("reading the protect mask {}", path.display()))?;
            let luma = img.to_luma8();
            let (w, h) = luma.dimensions();
            let mask = tch::Tensor::from_slice(luma.as_raw()).reshape([h as i64, w as i64]);
            Some(ProtectParams { mask, feather: a.feather })
        }
        None => None,
    };
    let loaded = Instant::now();
    let model = StableDiffusion::load(&a.model, device)?;
    let params = GenerateParams {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        seed: a.seed,
        steps: a.steps.unwrap_or(if paper { 50 } else { 20 }),
        guidance: a.guidance.unwrap_or(if paper { 8.0 } else { 7.5 }),
        scheduler,
        karras: a.karras || karras_by_name,
        width,
        height,
        reference: reference.as_ref().map(image_io::rgb_to_tensor),
        strength: a.strength.unwrap_or(if paper { 0.9 } else { 0.8 }),
        start: a.start.unwrap_or(if paper { StartMode::Noise } else { StartMode::Reference }),
        explain,
        protect,
    };
    model.validate(&params)?;
    let mut dump = a.dump_dir.as_deref().map(Dump::create).transpose()?;
    if !a.quiet {
        eprintln!("loaded {} on {:?} in {:.2}s", a.model.display(), device, loaded.elapsed().as_secs_f64());
    }
    let started = Instant::now();
    let quiet = a.quiet;
    let mut step_seconds = Vec::new();
    let mut last = Instant::now();
    let mut explain_seconds = Vec::new();
    let mut dump_error = None;
    let out = model.generate(&params, &mut |e| {
        step_seconds.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        if let Some(x) = &e.explain {
            if let Some(m) = x.manipulation {
                explain_seconds
                    .push(serde_json::json!({"step": m.index, "timestep": m.timestep, "seconds": m.seconds}));
            }
            if !quiet {
                report_explain(e);
            }
            if let Some(d) = dump.as_mut() {
                if let Err(err) = dump_step(d, e) {
                    dump_error.get_or_insert(err);
                    return Flow::Stop;
                }
            }
        }
        if !quiet {
            eprint!("\rstep {}/{} t={:<8} {:.2}s", e.index + 1, e.total, e.timestep, started.elapsed().as_secs_f64());
            let _ = std::io::stderr().flush();
        }
        Flow::Continue
    });
    if let Some(err) = dump_error {
        return Err(err.context("writing the dump"));
    }
    let out = out?;
    if let Some(path) = &a.timings {
        let json = serde_json::json!({
            "load_seconds": started.duration_since(loaded).as_secs_f64(),
            "step_seconds": step_seconds,
            "explain_seconds": explain_seconds,
            "total_seconds": started.elapsed().as_secs_f64(),
        });
        std::fs::write(path, json.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    let png = image_io::encode_png(&image_io::tensor_to_rgb(&out.image)?)?;
    std::fs::write(&a.out, png).with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(summary) = &out.explain {
        if !quiet {
            let fractions: Vec<String> = summary
                .reference_fractions
                .iter()
                .map(|f| format!("t={} {:.0}%", f.timestep, f.fraction * 100.0))
                .collect();
            let protected = match summary.psnr_protected {
                Some(v) if v.is_infinite() => "protected region bit-exact (PSNR ∞), ".to_string(),
                Some(v) => format!("protected region PSNR {v:.2} dB, "),
                None => String::new(),
            };
            eprintln!(
                "\nfrom the reference: {}; {protected}PSNR outside {:.2} dB",
                if fractions.is_empty() { "-".into() } else { fractions.join(", ") },
                summary.psnr_outside
            );
        }
        if let Some(d) = dump.as_mut() {
            let entry = Entry {
                kind: "change".into(),
                step: None,
                timestep: None,
                token_index: None,
                token: None,
                shape: vec![],
                path: String::new(),
            };
            d.write("change", &summary.change_map, true, entry)?;
        }
    }
    if let Some(d) = &dump {
        let manifest = d.finish()?;
        if !quiet {
            eprintln!("\nwrote {} maps and masks, listed in {}", d.entries().len(), manifest.display());
        }
    }
    if !quiet {
        eprintln!("\nwrote {} ({}x{}) in {:.2}s", a.out.display(), width, height, started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The Grad-SAM settings from the render flags; None when Grad-SAM is off.
fn explain_params(a: &RenderArgs, paper: bool) -> Result<Option<ExplainParams>> {
    let asked = !a.subjects.is_empty()
        || !a.subject_indices.is_empty()
        || a.explain_layers.is_some()
        || a.manipulate_at.is_some()
        || a.mask_threshold.is_some()
        || a.mask_blur.is_some()
        || a.mask_sigma.is_some()
        || a.mask_dilate.is_some()
        || a.mask_dilate_passes.is_some()
        || a.exact_batch.is_some();
    let mode = match a.explain.as_deref() {
        Some("off") => {
            if asked {
                bail!("Grad-SAM options were given with --explain off");
            }
            return Ok(None);
        }
        Some(m) => m.parse::<ExplainMode>()?,
        None if asked || paper => ExplainMode::Fast,
        None => return Ok(None),
    };
    let defaults = MaskParams::default();
    let subjects = a
        .subjects
        .iter()
        .map(|w| SubjectSpec::Word(w.clone()))
        .chain(a.subject_indices.iter().map(|&i| SubjectSpec::Index(i)))
        .collect();
    Ok(Some(ExplainParams {
        mode,
        layers: a.explain_layers.clone().unwrap_or(LayerChoice::Last),
        subjects,
        timesteps: a.manipulate_at.clone().unwrap_or_default(),
        mask: MaskParams {
            blur_kernel: a.mask_blur.unwrap_or(defaults.blur_kernel),
            blur_sigma: a.mask_sigma.unwrap_or(defaults.blur_sigma),
            dilate_kernel: a.mask_dilate.unwrap_or(defaults.dilate_kernel),
            dilate_passes: a.mask_dilate_passes.unwrap_or(defaults.dilate_passes),
            threshold_k: a.mask_threshold.unwrap_or(defaults.threshold_k),
        },
        exact_batch: a.exact_batch,
    }))
}

/// One line per Grad-SAM event on stderr.
fn report_explain(e: &StepEvent) {
    let Some(x) = &e.explain else { return };
    if let Some(plan) = x.plan {
        if plan.mode.is_some() {
            let subjects: Vec<String> =
                plan.subjects.iter().map(|s| format!("{} (token {})", s.label(), s.token_index)).collect();
            let steps: Vec<String> = plan.steps.iter().map(|s| format!("{} (t={})", s.index + 1, s.timestep)).collect();
            eprintln!(
                "grad-sam: subjects {}{}; layers {:?}; manipulating at steps {}",
                subjects.join(", "),
                if plan.subjects_auto { " [picked from the prompt]" } else { "" },
                plan.layers,
                steps.join(", ")
            );
        }
        if let Some(p) = &plan.protected_latents {
            let share = p.mean(tch::Kind::Float).double_value(&[]);
            eprintln!(
                "protect: {:.0}% of the latent elements are kept from the reference at every step",
                share * 100.0
            );
        }
    }
    if let Some(m) = x.manipulation {
        eprintln!(
            "\nstep {} t={}: mask keeps {:.0}% generated, {:.0}% from the reference ({:.2}s)",
            m.index + 1,
            m.timestep,
            m.mask.mean(tch::Kind::Float).double_value(&[]) * 100.0,
            m.reference_fraction * 100.0,
            m.seconds
        );
    }
}

/// Writes a step's heatmaps and mask (and on the first step the protected mask).
fn dump_step(d: &mut Dump, e: &StepEvent) -> Result<()> {
    let Some(x) = &e.explain else { return Ok(()) };
    let entry = |kind: &str| Entry {
        kind: kind.into(),
        step: Some(e.index),
        timestep: Some(e.timestep),
        token_index: None,
        token: None,
        shape: vec![],
        path: String::new(),
    };
    if let Some(p) = x.plan.and_then(|p| p.protected_latents.as_ref()) {
        let mut en = entry("protect");
        (en.step, en.timestep) = (None, None);
        d.write("protect", &p.squeeze_dim(0), false, en)?;
    }
    if let Some(m) = x.manipulation {
        for h in &m.heatmaps {
            let mut en = entry("heatmap");
            en.token_index = Some(h.subject.token_index);
            en.token = Some(h.subject.token.clone());
            d.write(&format!("heatmap_step{:03}_token{:02}", m.index, h.subject.token_index), &h.map, true, en)?;
        }
        d.write(&format!("mask_step{:03}", m.index), &m.mask, false, entry("mask"))?;
    }
    Ok(())
}
