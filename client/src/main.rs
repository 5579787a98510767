//! `frisket`: the command-line client of a Frisket server.
//!
//! Exit codes (see client/README.md):
//! 0 success, 1 the server answered with a gRPC error, 2 usage error (bad flags, unreadable
//! or undecodable input file, invalid URL), 3 server unreachable, 4 local I/O error
//! (writing outputs), 5 protocol error (malformed stream), 6 negative answer (health: not
//! serving; cancel: no such job), 130 interrupted (Ctrl-C; the job was cancelled).
mod cli;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "frisket", version, about = "Client of a Frisket Stable Diffusion server")]
pub struct Cli {
    /// The server's address.
    #[arg(long, global = true, env = "FRISKET_SERVER", default_value = frisket::DEFAULT_SERVER)]
    pub server: String,
    /// Machine-readable output: JSON lines on stdout (format v1, see client/README.md).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a job and save its image, streaming its progress.
    Generate(Box<GenerateArgs>),
    /// List the server's models.
    Models,
    /// Show a prompt's tokens and their positions.
    Tokenize {
        prompt: String,
        #[arg(long)]
        model: String,
    },
    /// grpc.health.v1 check (exit 0 when serving, 6 otherwise).
    Health {
        /// The service to check; empty for the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Show the server's version, device and limits.
    Info,
    /// Cancel a queued or running job (exit 6 when there is no such job).
    Cancel { job_id: String },
    /// Follow a detached job (`generate --detach`) from here, with its progress, and save
    /// its images; Ctrl-C stops watching and leaves the job running.
    Watch {
        job_id: String,
        /// Where to write the image (image i of several: OUT's stem with -i).
        #[arg(long)]
        out: PathBuf,
    },
    /// Save the results of a detached job that ended (`generate --detach`), every image.
    Result {
        job_id: String,
        /// Where to write the image (image i of several: OUT's stem with -i).
        #[arg(long)]
        out: PathBuf,
    },
    /// Load a model on the server (and warm it) now rather than in its first job.
    Load { model: String },
    /// Free a loaded model's memory on the server (refused while a running job uses it).
    Unload { model: String },
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum PreviewMethodArg {
    Approx,
    Vae,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum PreviewFormatArg {
    Png,
    Jpeg,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum ExplainArg {
    Off,
    Fast,
    Exact,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum StartArg {
    /// SDEdit img2img: the reference noised to the start timestep (the server's default).
    Reference,
    /// Pure noise at the strength's start timestep (the paper's code).
    Noise,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// 50 steps, CFG 8, strength 0.9, t = 780/520/320, last layer, k = 0.5, noise start,
    /// fast Grad-SAM.
    Paper,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A model name from `frisket models`.
    #[arg(long)]
    pub model: String,
    /// What to generate.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Absent: the server draws one (printed at the end).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Denoising steps [server default: 20; 50 with --preset paper].
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale [server default: 7.5; 8 with --preset paper].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim, ddpm, euler, euler-karras, euler-a, dpm++, dpm++-karras, dpm++-sde, dpm++-sde-karras, unipc or unipc-karras (`frisket models` lists them) [server default: ddim; ddpm with --preset paper].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Output width in pixels [default: the reference's, else the model's native width].
    #[arg(long)]
    pub width: Option<u32>,
    /// Output height in pixels [default: the reference's, else the model's native height].
    #[arg(long)]
    pub height: Option<u32>,
    /// SDXL: the size the picture notionally had before cropping, WIDTHxHEIGHT [default:
    /// the output size].
    #[arg(long, value_name = "WxH", value_parser = frisket::proto::parse_size)]
    pub original_size: Option<(u32, u32)>,
    /// SDXL: the crop's top-left corner, TOP,LEFT in pixels [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT", value_parser = frisket::proto::parse_top_left)]
    pub crop_top_left: Option<(u32, u32)>,
    /// img2img: the image to start from (PNG or JPEG).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// img2img: share of the schedule that runs, in (0, 1] [server default: 0.8; 0.9 with
    /// --preset paper].
    #[arg(long, requires = "reference")]
    pub strength: Option<f64>,
    /// How img2img starts: `reference` (SDEdit, the server's default) or `noise` (pure
    /// noise at the strength's start timestep, the paper's code; the default with --preset paper).
    #[arg(long, value_enum, requires = "reference")]
    pub start: Option<StartArg>,
    /// Protected region: an 8-bit mask at the reference's size, non-zero pixels come back
    /// unchanged (bit for bit).
    #[arg(long, value_name = "MASK.png", requires = "reference")]
    pub protect: Option<PathBuf>,
    /// Outward feather of the protected region, in pixels.
    #[arg(long, requires = "protect")]
    pub feather: Option<u32>,
    /// Where to write the result image (with --num-images, image i > 0 goes to OUT's stem
    /// with -i: out.png, out-1.png, …).
    #[arg(long)]
    pub out: PathBuf,
    /// Images to pick from, image i with seed + i (the server's limit: `frisket info`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_images: Option<u32>,
    /// Stream a preview every N steps (and the last; 0: every step).
    #[arg(long)]
    pub preview_every: Option<u32>,
    /// approx: a cheap linear latent→RGB map at latent size; vae: an exact decode.
    #[arg(long, value_enum, default_value = "approx", requires = "preview_every")]
    pub preview_method: PreviewMethodArg,
    /// Preview image format.
    #[arg(long, value_enum, default_value = "png", requires = "preview_every")]
    pub preview_format: PreviewFormatArg,
    /// Longest preview side in pixels (0: no limit).
    #[arg(long, default_value_t = 0, requires = "preview_every")]
    pub preview_max_size: u32,
    /// Stream the latent entering every N-th step.
    #[arg(long)]
    pub latents_every: Option<u32>,
    /// Write every streamed artifact and a manifest.json into DIR.
    #[arg(long)]
    pub dump_dir: Option<PathBuf>,
    /// Client-chosen job id (for `frisket cancel` and `frisket result`).
    #[arg(long)]
    pub job_id: Option<String>,
    /// The job runs on if this client goes (a lost connection, Ctrl-C does cancel it);
    /// `frisket result JOB_ID --out FILE` fetches its image after it ended.
    #[arg(long)]
    pub detach: bool,
    /// Grad-SAM attribution: exact (one backward per latent element), fast, or off.
    /// Defaults to fast when another Grad-SAM option or --preset paper is given, else off.
    #[arg(long, value_enum)]
    pub explain: Option<ExplainArg>,
    /// Grad-SAM: keep this prompt word's latents, the rest from the reference (repeatable).
    /// Without --subject/--subject-index the server picks the prompt's content words.
    #[arg(long = "subject", value_name = "WORD", requires = "reference")]
    pub subjects: Vec<String>,
    /// Grad-SAM: a subject by token position among the 77 (0 = start token; repeatable;
    /// see `frisket tokenize`).
    #[arg(long = "subject-index", value_name = "N", requires = "reference")]
    pub subject_indices: Vec<u32>,
    /// Cross-attention layers: last, all, or a list like 0,5,10 [server default: last].
    #[arg(long, alias = "layers", value_name = "last|all|LIST", requires = "reference")]
    pub explain_layers: Option<String>,
    /// Timesteps to manipulate at, snapped to the job's nearest [server default: 780,520,320].
    #[arg(long, value_delimiter = ',', value_name = "T1,T2,…", requires = "reference")]
    pub manipulate_at: Option<Vec<f64>>,
    /// Mask threshold k in mean + k·std [server default: 0.5].
    #[arg(long, value_name = "K", allow_negative_numbers = true, requires = "reference")]
    pub mask_threshold: Option<f64>,
    /// Mask Gaussian blur kernel (odd) [server default: 3].
    #[arg(long, requires = "reference")]
    pub mask_blur: Option<u32>,
    /// Mask Gaussian blur sigma [server default: 6].
    #[arg(long, requires = "reference")]
    pub mask_sigma: Option<f64>,
    /// Mask dilation max-filter size (odd; 1 = none) [server default: 3].
    #[arg(long, requires = "reference")]
    pub mask_dilate: Option<u32>,
    /// Mask dilation passes [server default: 1].
    #[arg(long, requires = "reference")]
    pub mask_dilate_passes: Option<u32>,
    /// Exact mode: latent elements per backward pass [default: from the latent size].
    #[arg(long, requires = "reference")]
    pub exact_batch: Option<u32>,
    /// `paper`: DDPM, 50 steps, CFG 8, strength 0.9, t = 780/520/320, last layer, k = 0.5, noise
    /// start, fast Grad-SAM (as `frisket-server render --preset paper`); explicit flags
    /// override it.
    #[arg(long, value_enum, requires = "reference")]
    pub preset: Option<PresetArg>,
    /// A LoRA merged for this job, NAME or NAME:WEIGHT (weight 1 when absent; `frisket
    /// models` lists the ones that fit each model; repeatable).
    #[arg(long = "lora", value_name = "NAME[:WEIGHT]", value_parser = frisket::proto::parse_lora_spec)]
    pub loras: Vec<frisket::proto::v1::LoraSpec>,
    /// Stream only the masks (Grad-SAM masks and the protected region). With neither
    /// --masks nor --heatmaps the server streams both for Grad-SAM / protect jobs.
    #[arg(long)]
    pub masks: bool,
    /// Stream only the token heatmaps (see --masks).
    #[arg(long)]
    pub heatmaps: bool,
    /// Send the request without first checking it against the server's limits
    /// (GetServerInfo): the server's own checks decide.
    #[arg(long)]
    pub no_limit_check: bool,
}

/// Parses arguments; a usage error is one line on stderr (and a JSON error line with
/// `--json`) and exit code 2.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap's message up to the first blank line or usage block, on one line.
            let rendered = e.render().to_string();
            let body: Vec<&str> =
                rendered.lines().map(str::trim).take_while(|l| !l.is_empty() && !l.starts_with("Usage:")).collect();
            let body = body.join(" ");
            let body = body.strip_prefix("error: ").unwrap_or(&body);
            let body = if body.is_empty() { "invalid arguments" } else { body };
            let message = format!("{body} (see --help)");
            let failure = cli::Failure::usage(message);
            failure.report(std::env::args().any(|a| a == "--json"));
            std::process::exit(failure.exit);
        }
    }
}

fn main() {
    let args = parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    let json = args.json;
    let code = match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(failure) => {
            failure.report(json);
            failure.exit
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}
