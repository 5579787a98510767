//! `frisket-server` command line: `render` (one local image) and `serve` (the gRPC service).
use crate::engine::image_io;
use crate::engine::model::{parse_device, StableDiffusion};
use crate::engine::pipeline::{Flow, GenerateParams};
use crate::engine::schedulers::SchedulerKind;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
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
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
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
    #[arg(long, default_value_t = 0.8, requires = "reference")]
    pub strength: f64,
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
    let loaded = Instant::now();
    let model = StableDiffusion::load(&a.model, device)?;
    let params = GenerateParams {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        seed: a.seed,
        steps: a.steps,
        guidance: a.guidance,
        scheduler,
        karras: a.karras || karras_by_name,
        width,
        height,
        reference: reference.as_ref().map(image_io::rgb_to_tensor),
        strength: a.strength,
    };
    model.validate(&params)?;
    if !a.quiet {
        eprintln!("loaded {} on {:?} in {:.2}s", a.model.display(), device, loaded.elapsed().as_secs_f64());
    }
    let started = Instant::now();
    let quiet = a.quiet;
    let mut step_seconds = Vec::new();
    let mut last = Instant::now();
    let out = model.generate(&params, &mut |e| {
        step_seconds.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        if !quiet {
            eprint!("\rstep {}/{} t={:<8} {:.2}s", e.index + 1, e.total, e.timestep, started.elapsed().as_secs_f64());
            let _ = std::io::stderr().flush();
        }
        Flow::Continue
    })?;
    if let Some(path) = &a.timings {
        let json = serde_json::json!({
            "load_seconds": started.duration_since(loaded).as_secs_f64(),
            "step_seconds": step_seconds,
            "total_seconds": started.elapsed().as_secs_f64(),
        });
        std::fs::write(path, json.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    let png = image_io::encode_png(&image_io::tensor_to_rgb(&out.image)?)?;
    std::fs::write(&a.out, png).with_context(|| format!("writing {}", a.out.display()))?;
    if !quiet {
        eprintln!("\nwrote {} ({}x{}) in {:.2}s", a.out.display(), width, height, started.elapsed().as_secs_f64());
    }
    Ok(())
}
