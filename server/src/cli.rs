//! `frisket-server` command line: `render` (one local image) and `serve` (the gRPC service).
use crate::config::SettingsArgs;
use crate::service::detached::Retention;
use crate::service::loras::{self, LoadedLoras};
use crate::service::models::Catalog;
use crate::service::request;
use crate::service::ConnectionLimits;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use frisket_engine::checkpoint::LoadOptions;
use frisket_engine::explain::dump::{Dump, Entry};
use frisket_engine::explain::edit::Manipulation;
use frisket_engine::explain::ExplainMode;
use frisket_engine::image_io;
use frisket_engine::model::{default_kind, parse_device, StableDiffusion};
use frisket_engine::nn::{CpuLinear, KernelChoice};
use frisket_engine::pipeline::{Flow, PreparedJob, StartMode};
use frisket_engine::schedulers::PredictionType;
use frisket_engine::tch;
use frisket_engine::winograd::CpuConv;
use frisket_proto::v1 as pb;
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
    Render(Box<RenderArgs>),
    /// Serve the gRPC API (frisket.v1.Frisket, health, reflection) until SIGTERM/Ctrl-C.
    Serve(Box<ServeArgs>),
}

#[derive(Args)]
pub struct ServeArgs {
    /// A folder of models: diffusers model folders and single-file checkpoints (original SD
    /// layout; `.safetensors`, or `.ckpt`/`.pt`/`.pth` read without unpickling), named by
    /// folder name or file stem.
    #[arg(long)]
    pub models: PathBuf,
    /// A folder of LoRA files (`NAME.safetensors`) that requests may name.
    #[arg(long)]
    pub loras: Option<PathBuf>,
    /// The prediction type of a single-file model whose file cannot tell (SD 2.x files
    /// default to v_prediction; the 512 px base models are epsilon). Repeatable.
    #[arg(long = "prediction", value_name = "MODEL=TYPE", value_parser = parse_prediction_override)]
    pub predictions: Vec<(String, PredictionType)>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Address to listen on; port 0 picks a free port (the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// The devices, one worker each: auto (cuda:0 if there is one, else cpu), all (every
    /// CUDA device, else cpu), or a comma list such as cuda:0,cuda:1 or cpu,cpu (cpu may
    /// repeat: several CPU workers, each best given --threads = cores / workers).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Jobs that may wait behind the running ones; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub queue_capacity: u32,
    /// Most jobs one worker steps together, their UNet rows stacked into one call per step (jobs of
    /// one model and LoRA set join at once: the step under way stops and the new job takes its
    /// first step); 1: one job at a time, exactly as diffusers. The default matches the
    /// default --queue-capacity.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_batch: u32,
    /// MiB each worker's (device's) loaded models' weights (UNet, VAE, text encoders) may hold in all:
    /// a model that does not fit beside the loaded ones unloads the least recently used
    /// ones that no running job uses; a model larger than this is RESOURCE_EXHAUSTED.
    /// Unlimited unless given.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=(u64::MAX >> 20)))]
    pub model_memory_mib: Option<u64>,
    /// libtorch intra-op threads of each worker; default: libtorch's (OMP_NUM_THREADS, else
    /// the number of physical cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
    /// Serve Prometheus metrics (gRPC calls, queue, steps, memory) at http://ADDR/metrics;
    /// port 0 picks a free port (the chosen one is printed). Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Seconds that accepted jobs may run on after SIGTERM before they are stopped.
    #[arg(long, default_value_t = 30.0)]
    pub grace_period: f64,
    /// Seconds a client may take nothing from its Generate stream while events wait
    /// before it is dropped (its job stops, its events go); a finished job's result waits
    /// this long for its client while the next job runs.
    #[arg(long, value_parser = positive_seconds,
          default_value_t = ConnectionLimits::default().stalled_client.as_secs_f64())]
    pub stalled_client_seconds: f64,
    /// Seconds without a frame from a peer before the server sends it an HTTP/2 PING.
    #[arg(long, value_parser = positive_seconds,
          default_value_t = ConnectionLimits::default().keepalive_interval.as_secs_f64())]
    pub http2_keepalive_interval: f64,
    /// Seconds a peer has to answer a PING before its connection is closed.
    #[arg(long, value_parser = positive_seconds,
          default_value_t = ConnectionLimits::default().keepalive_timeout.as_secs_f64())]
    pub http2_keepalive_timeout: f64,
    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..),
          default_value_t = ConnectionLimits::default().max_concurrent_streams)]
    pub max_concurrent_streams: u32,
    /// Generate jobs one connection may have queued or running at once; more get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..),
          default_value_t = ConnectionLimits::default().max_jobs_per_connection)]
    pub max_jobs_per_connection: u32,
    /// How long a detached job's result is kept after it ends, for WatchJob and GetResult:
    /// seconds, or with a unit (90s, 10m, 1h); 0 turns detach off.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10m")]
    pub keep_results: std::time::Duration,
    /// The most finished detached jobs kept at once (the oldest go first).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..),
          default_value_t = Retention::default().max_count as u32)]
    pub keep_results_count: u32,
    /// MiB that kept detached jobs may hold in all (results, last previews, heatmaps).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..),
          default_value_t = Retention::default().max_bytes >> 20)]
    pub keep_results_mib: u64,
    /// Models to load and warm at startup, in order (repeatable or comma-separated; `all`:
    /// every model in --models). Health stays NOT_SERVING until they are loaded (or
    /// failed to load); other models load when first used.
    #[arg(long, value_name = "MODEL", value_delimiter = ',')]
    pub preload: Vec<String>,
}

/// A duration: seconds, or a number with a unit s, m or h.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("expected seconds or a number with s, m or h (10m), got {s:?}")),
    };
    match number.parse::<f64>() {
        Ok(x) if x >= 0.0 && x * scale <= 8.64e10 => Ok(std::time::Duration::from_secs_f64(x * scale)),
        _ => Err(format!("expected seconds or a number with s, m or h (10m), got {s:?}")),
    }
}

/// A number of seconds > 0 (and at most a million days, so it fits a Duration).
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 8.64e10 => Ok(x),
        _ => Err(format!("expected a number of seconds > 0, got {s:?}")),
    }
}

#[derive(Args)]
pub struct RenderArgs {
    /// A diffusers-format model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    /// or a single-file checkpoint in the original SD layout (`.safetensors`, or
    /// `.ckpt`/`.pt`/`.pth` read without unpickling).
    #[arg(long)]
    pub model: PathBuf,
    /// A VAE `.safetensors` file used instead of the model's own VAE.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The prediction type of a single-file model whose file cannot tell: epsilon,
    /// v_prediction or sample (SD 2.x files default to v_prediction).
    #[arg(long, value_parser = PredictionType::parse)]
    pub prediction: Option<PredictionType>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Denoising steps [default: 20; 50 with --preset paper].
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale [default: 7.5; 8 with --preset paper].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim, ddpm, euler, euler-karras, euler-a, dpm++, dpm++-karras, dpm++-sde, dpm++-sde-karras, unipc or unipc-karras [default: ddim; ddpm with --preset paper].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Output width in pixels; defaults to the reference's width, else 512.
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    /// SDXL: the size the picture notionally had before cropping, WIDTHxHEIGHT [default:
    /// the output size].
    #[arg(long, value_name = "WxH", value_parser = frisket_proto::parse_size)]
    pub original_size: Option<(u32, u32)>,
    /// SDXL: the crop's top-left corner, TOP,LEFT in pixels [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT", value_parser = frisket_proto::parse_top_left)]
    pub crop_top_left: Option<(u32, u32)>,
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
    pub subject_indices: Vec<u32>,
    /// Grad-SAM attribution: exact (one backward per latent element), fast, or off.
    /// Defaults to fast when another Grad-SAM option or --preset paper is given, else off.
    #[arg(long, value_parser = ["exact", "fast", "off"], requires = "reference")]
    pub explain: Option<String>,
    /// Cross-attention layers: last, all, or a list like 0,5,10 [default: last].
    #[arg(long, requires = "reference")]
    pub explain_layers: Option<String>,
    /// Timesteps to manipulate at, snapped to the job's nearest [default: 780,520,320].
    #[arg(long, value_delimiter = ',', value_name = "T1,T2,…", requires = "reference")]
    pub manipulate_at: Option<Vec<f64>>,
    /// Mask threshold k in mean + k·std [default: 0.5].
    #[arg(long, value_name = "K", requires = "reference")]
    pub mask_threshold: Option<f64>,
    /// Mask Gaussian blur kernel (odd) [default: 3].
    #[arg(long, requires = "reference")]
    pub mask_blur: Option<u32>,
    /// Mask Gaussian blur sigma [default: 6].
    #[arg(long, requires = "reference")]
    pub mask_sigma: Option<f64>,
    /// Mask dilation max-filter size (odd) [default: 3].
    #[arg(long, requires = "reference")]
    pub mask_dilate: Option<u32>,
    /// Mask dilation passes [default: 1].
    #[arg(long, requires = "reference")]
    pub mask_dilate_passes: Option<u32>,
    /// Exact mode: latent elements per backward pass [default: from the latent size].
    #[arg(long, requires = "reference")]
    pub exact_batch: Option<u32>,
    /// A protected region: an 8-bit mask image at the output size, non-zero = protected.
    #[arg(long, value_name = "MASK.png", requires = "reference")]
    pub protect: Option<PathBuf>,
    /// Outward feather of the protected region, in pixels.
    #[arg(long, default_value_t = 0, requires = "protect")]
    pub feather: u32,
    /// `paper`: DDPM, 50 steps, CFG 8, strength 0.9, t = 780/520/320, last layer, k = 0.5, noise
    /// start, fast Grad-SAM (exact for the last layer); explicit flags override it.
    #[arg(long, value_parser = ["paper"], requires = "reference")]
    pub preset: Option<String>,
    /// A folder of LoRA files (`NAME.safetensors`) for --lora.
    #[arg(long)]
    pub loras: Option<PathBuf>,
    /// A LoRA from --loras merged for this image, NAME or NAME:WEIGHT (weight 1 when
    /// absent; repeatable).
    #[arg(long = "lora", value_name = "NAME[:WEIGHT]", value_parser = frisket_proto::parse_lora_spec, requires = "loras")]
    pub lora: Vec<pb::LoraSpec>,
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
    /// The job's limits, as `serve` applies them.
    #[command(flatten)]
    pub settings: SettingsArgs,
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
    // An unknown FRISKET_CPU_LINEAR or FRISKET_CPU_CONV is refused before any work.
    CpuLinear::from_env().map_err(anyhow::Error::msg)?;
    CpuConv::from_env().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Render(args) => render(*args),
        Command::Serve(args) => serve(*args),
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
        loras: a.loras,
        predictions: a.predictions,
        listen: a.listen,
        device: a.device,
        queue_capacity: a.queue_capacity as usize,
        worker: crate::service::worker::WorkerOptions {
            max_batch: a.max_batch as usize,
            model_memory: a.model_memory_mib.map(|m| m << 20),
            threads: a.threads,
        },
        metrics_listen: a.metrics_listen,
        grace_period: std::time::Duration::from_secs_f64(a.grace_period),
        limits: a.settings.load()?.limits,
        connections: ConnectionLimits {
            stalled_client: std::time::Duration::from_secs_f64(a.stalled_client_seconds),
            keepalive_interval: std::time::Duration::from_secs_f64(a.http2_keepalive_interval),
            keepalive_timeout: std::time::Duration::from_secs_f64(a.http2_keepalive_timeout),
            max_concurrent_streams: a.max_concurrent_streams,
            max_jobs_per_connection: a.max_jobs_per_connection,
        },
        retention: Retention {
            keep: a.keep_results,
            max_count: a.keep_results_count as usize,
            max_bytes: a.keep_results_mib << 20,
        },
        preload: a.preload,
    })
}

/// The render flags as the request the service gets: the same defaults, preset and
/// validation apply to both.
fn request(a: &RenderArgs) -> Result<pb::GenerateRequest> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
    };
    let explain = explain_options(a)?;
    Ok(pb::GenerateRequest {
        model: catalog_name(a)?,
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        seed: Some(a.seed),
        steps: a.steps,
        guidance: a.guidance,
        scheduler: a.scheduler.clone().unwrap_or_default(),
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        reference_image: a.reference.as_ref().map(|p| read(p, "reference")).transpose()?.unwrap_or_default(),
        strength: a.strength,
        protected_mask: match &a.protect {
            Some(path) => grey_png(path)?,
            None => Vec::new(),
        },
        explain,
        preset: a.preset.clone().unwrap_or_default(),
        loras: a.lora.clone(),
        size_conditioning: frisket_proto::size_conditioning(a.original_size, a.crop_top_left),
        ..Default::default()
    })
}

/// The name `--model`'s folder has in its one-model catalog.
fn catalog_name(a: &RenderArgs) -> Result<String> {
    let name = if a.model.is_file() { a.model.file_stem() } else { a.model.file_name() };
    Ok(name.and_then(|n| n.to_str()).unwrap_or("model").to_string())
}

/// A protect mask file as the 8-bit greyscale PNG the request carries.
fn grey_png(path: &PathBuf) -> Result<Vec<u8>> {
    let img = image::open(path).with_context(|| format!("reading the protect mask {}", path.display()))?;
    image_io::encode_grey_png(&img.to_luma8())
}

fn render(a: RenderArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    anyhow::ensure!(
        a.model.is_dir() || a.model.is_file(),
        "model {} does not exist (a model folder or a checkpoint file)",
        a.model.display()
    );
    let root = a.model.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = catalog_name(&a)?;
    let predictions: Vec<_> = a.prediction.map(|p| (name.clone(), p)).into_iter().collect();
    let catalog = Catalog::new(root)?.with_loras(a.loras.as_deref())?.with_predictions(&predictions)?;
    let limits = a.settings.load()?.limits;
    let spec = request::prepare(&request(&a)?, &catalog, &limits, request::random_seed())
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let (width, height) = (spec.width, spec.height);
    let loaded = Instant::now();
    let opts = LoadOptions { vae: a.vae.as_deref(), ..catalog.load_options(&name) };
    let mut model = StableDiffusion::load_with(&a.model, &opts, device, default_kind(device))?;
    let mut lora_files = LoadedLoras::new();
    let set = loras::load(&spec.loras, &mut lora_files).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    model.set_loras(&set)?;
    let job = model.prepare(&spec.params().map_err(|s| anyhow::anyhow!("{}", s.message()))?)?;
    let mut dump = a.dump_dir.as_deref().map(Dump::create).transpose()?;
    if !a.quiet {
        eprintln!("loaded {} on {:?} in {:.2}s", a.model.display(), device, loaded.elapsed().as_secs_f64());
        report_plan(&job);
    }
    if let (Some(d), Some(p)) = (dump.as_mut(), &job.protect) {
        let entry = Entry { kind: "protect".into(), ..Entry::default() };
        d.write("protect", &p.latents.squeeze_dim(0), false, entry)?;
    }
    let started = Instant::now();
    let quiet = a.quiet;
    let mut step_seconds = Vec::new();
    let mut last = Instant::now();
    let mut explain_seconds = Vec::new();
    let mut dump_error = None;
    let out = model.generate(job, &mut |e| {
        step_seconds.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        if let Some(m) = e.manipulation {
            explain_seconds.push(serde_json::json!({"step": m.index, "timestep": m.timestep, "seconds": m.seconds}));
            if !quiet {
                report_manipulation(m);
            }
            if let Some(d) = dump.as_mut() {
                if let Err(err) = dump_manipulation(d, m) {
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
            "cpu_linear": format!("{:?}", CpuLinear::current()),
            "cpu_conv": format!("{:?}", CpuConv::current()),
        });
        std::fs::write(path, json.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    let png = image_io::encode_png(&image_io::tensor_to_rgb(&out.image)?)?;
    std::fs::write(&a.out, png).with_context(|| format!("writing {}", a.out.display()))?;
    let edited = spec.explain.is_some() || spec.protect.is_some();
    if let (Some(c), true) = (&out.comparison, edited) {
        if !quiet {
            let fractions: Vec<String> = out
                .reference_fractions
                .iter()
                .map(|f| format!("t={} {:.0}%", f.timestep, f.fraction * 100.0))
                .collect();
            let protected = match c.psnr_protected {
                Some(v) if v.is_infinite() => "protected region bit-exact (PSNR ∞), ".to_string(),
                Some(v) => format!("protected region PSNR {v:.2} dB, "),
                None => String::new(),
            };
            eprintln!(
                "\nfrom the reference: {}; {protected}PSNR outside {:.2} dB",
                if fractions.is_empty() { "-".into() } else { fractions.join(", ") },
                c.psnr_outside
            );
        }
        if let Some(d) = dump.as_mut() {
            d.write("change", &c.change_map, true, Entry { kind: "change".into(), ..Entry::default() })?;
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

/// The request's ExplainOptions from the flags (None when nothing in it is set): Grad-SAM
/// is on (fast) when a Grad-SAM option is given, and Grad-SAM options with `--explain off`
/// are an error. Unset fields keep the server's defaults or the preset's.
fn explain_options(a: &RenderArgs) -> Result<Option<pb::ExplainOptions>> {
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
        Some("off") if asked => bail!("Grad-SAM options were given with --explain off"),
        Some("off") => Some(pb::ExplainMode::Off),
        Some(m) => Some(match m.parse::<ExplainMode>()? {
            ExplainMode::Fast => pb::ExplainMode::Fast,
            ExplainMode::Exact => pb::ExplainMode::Exact,
        }),
        None if asked => Some(pb::ExplainMode::Fast),
        None => None,
    };
    let options = pb::ExplainOptions {
        mode: mode.map(|m| m as i32),
        subject_words: a.subjects.clone(),
        subject_indices: a.subject_indices.clone(),
        layers: a.explain_layers.clone().unwrap_or_default(),
        manipulate_at: a.manipulate_at.clone().unwrap_or_default(),
        mask_threshold: a.mask_threshold,
        blur_kernel: a.mask_blur,
        blur_sigma: a.mask_sigma,
        dilation: a.mask_dilate,
        dilation_passes: a.mask_dilate_passes,
        exact_batch: a.exact_batch,
        start: a.start.map(|s| match s {
            StartMode::Reference => pb::StartMode::Reference as i32,
            StartMode::Noise => pb::StartMode::Noise as i32,
        }),
        protect_feather: a.feather,
    };
    Ok((options != pb::ExplainOptions::default()).then_some(options))
}

/// The job's Grad-SAM plan and protected share, one line each on stderr.
fn report_plan(job: &PreparedJob) {
    if let Some(plan) = &job.explain {
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
    if let Some(p) = &job.protect {
        let share = p.latents.mean(tch::Kind::Float).double_value(&[]);
        eprintln!("protect: {:.0}% of the latent elements are kept from the reference at every step", share * 100.0);
    }
}

/// One line per manipulated step on stderr.
fn report_manipulation(m: &Manipulation) {
    eprintln!(
        "\nstep {} t={}: mask keeps {:.0}% generated, {:.0}% from the reference ({:.2}s)",
        m.index + 1,
        m.timestep,
        m.mask.mean(tch::Kind::Float).double_value(&[]) * 100.0,
        m.reference_fraction * 100.0,
        m.seconds
    );
}

/// Writes a manipulated step's heatmaps and mask.
fn dump_manipulation(d: &mut Dump, m: &Manipulation) -> Result<()> {
    let entry =
        |kind: &str| Entry { kind: kind.into(), step: Some(m.index), timestep: Some(m.timestep), ..Entry::default() };
    for h in &m.heatmaps {
        let mut en = entry("heatmap");
        en.token_index = Some(h.subject.token_index);
        en.token = Some(h.subject.token.clone());
        d.write(&format!("heatmap_step{:03}_token{:02}", m.index, h.subject.token_index), &h.map, true, en)?;
    }
    d.write(&format!("mask_step{:03}", m.index), &m.mask, false, entry("mask"))
}

/// `MODEL=TYPE` of `serve --prediction`.
fn parse_prediction_override(s: &str) -> Result<(String, PredictionType)> {
    let (model, prediction) = s.split_once('=').context("expected MODEL=TYPE, e.g. sd21-base=epsilon")?;
    Ok((model.to_string(), PredictionType::parse(prediction)?))
}
