//! `frisket-eval`: FID and KID between two image folders, PSNR/SSIM/LPIPS inside a mask, CLIP
//! score and directional CLIP similarity, printed as JSON.
use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use frisket_engine::image_io::read_rgb;
use frisket_eval::clip::{self, Clip};
use frisket_eval::inception::Inception;
use frisket_eval::kid::{self, KidConfig};
use frisket_eval::lpips::Lpips;
use frisket_eval::{folder_features, folder_stats, list_images, preservation, stats, Mode};
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Parser)]
#[command(
    version,
    about = "Evaluation metrics: FID and KID over image folders, PSNR, SSIM and LPIPS inside a mask, CLIP score"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fréchet Inception Distance between folders A and B.
    Fid {
        #[command(flatten)]
        common: Common,
        /// Statistics cache folder (keyed by folder content and settings).
        #[arg(long, default_value_os_t = default_cache())]
        cache: PathBuf,
        /// Do not read or write cached statistics.
        #[arg(long)]
        no_cache: bool,
    },
    /// Kernel Inception Distance between folders A and B (clean-fid's estimator).
    Kid {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = kid::SUBSETS)]
        subsets: usize,
        #[arg(long, default_value_t = kid::MAX_SUBSET_SIZE)]
        max_subset_size: usize,
        /// Seed of the subset draws (unused when both folders fit in one subset).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// PSNR between two images inside a mask (data range 1).
    Psnr(Pair),
    /// SSIM between two images, averaged inside a mask (torchmetrics' SSIM map).
    Ssim(Pair),
    /// LPIPS (AlexNet) between two images, its spatial map averaged inside a mask.
    Lpips {
        #[command(flatten)]
        pair: Pair,
        /// The state dict of an lpips.LPIPS(net="alex") module.
        #[arg(long)]
        weights: PathBuf,
    },
    /// CLIP score (torchmetrics' CLIPScore: max(mean of 100·cos, 0)) of a folder's images against
    /// their prompts.
    ClipScore {
        /// The images, taken in file-name order.
        images: PathBuf,
        /// One prompt per line: line i for the i-th image by name.
        #[arg(long)]
        prompts: PathBuf,
        /// Score the edited region: each image cropped to the bounding box of its mask (pixels at or
        /// above 128), a file of the same name in this folder.
        #[arg(long)]
        masks: Option<PathBuf>,
        #[command(flatten)]
        clip: ClipFolder,
    },
    /// The A/B runner: held-out shapes protect cases × conditions through the gRPC service, scored
    /// by the shapes judge and preservation outside the true objects; report.json and report.html.
    Ab(AbArgs),
    /// The paper's per-pair 64-feature number, not FID: ‖f(a) − f(b)‖² of torch-fidelity's 64
    /// features, what the paper's code gets from torchmetrics' FID with each image fed twice. Two
    /// images, or two folders paired by file name (each pair and the mean).
    Pair64 {
        a: PathBuf,
        b: PathBuf,
        /// pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the network torchmetrics loads).
        #[arg(long)]
        inception: PathBuf,
    },
    /// Directional CLIP similarity: cos(E(edited) − E(reference), E(target) − E(source)), each
    /// embedding normalised first.
    ClipDirection {
        edited: PathBuf,
        reference: PathBuf,
        /// The prompt that describes the reference.
        #[arg(long)]
        source: String,
        /// The prompt of the edit.
        #[arg(long)]
        target: String,
        #[command(flatten)]
        clip: ClipFolder,
    },
}

#[derive(Args)]
struct AbArgs {
    /// The shapes model folder (served under its folder name).
    #[arg(long, default_value = "models/shapes")]
    model: PathBuf,
    /// Held-out cases (seeds from 900_000).
    #[arg(long, default_value_t = 200)]
    cases: usize,
    /// Comma-separated conditions: sd-0.9, sd-tuned, paper, paper-all-layers, blended, protect-only.
    #[arg(long, default_value = "sd-0.9,sd-tuned,paper,paper-all-layers,blended,protect-only")]
    conditions: String,
    /// Where report.json and report.html go.
    #[arg(long)]
    out: PathBuf,
    /// Sampling steps of every condition (default: the paper preset's 50).
    #[arg(long)]
    steps: Option<u32>,
    /// A running server serving the model (default: start target/<profile>/frisket-server).
    #[arg(long)]
    server: Option<String>,
    /// sd-tuned: the strengths tried on the tuning split (comma-separated, each in (0, 1]).
    #[arg(long, default_value = frisket_eval::ab::tune::GRID)]
    tune_grid: String,
    /// sd-tuned: tuning cases (seeds from 950_000, disjoint from the held-out ones).
    #[arg(long, default_value_t = frisket_eval::ab::tune::CASES)]
    tune_cases: usize,
    /// A Hugging Face CLIPModel folder: adds the CLIP score of each output against its prompt,
    /// whole and on the requested object's region.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// The state dict of an lpips.LPIPS(net="alex") module: adds LPIPS outside the true objects.
    #[arg(long)]
    lpips: Option<PathBuf>,
    /// pytorch-fid's pt_inception-*.pth: adds the paper's per-pair 64-feature number (not FID)
    /// of each output against its reference.
    #[arg(long)]
    inception: Option<PathBuf>,
}

#[derive(Args)]
struct ClipFolder {
    /// A Hugging Face CLIPModel folder (config.json, safetensors weights, tokenizer files), such as
    /// clip-vit-large-patch14.
    #[arg(long)]
    clip: PathBuf,
}

/// One image's embedding, cropped to its mask's bounding box when there is a mask.
fn embed_file(net: &Clip, path: &Path, mask: Option<&Path>) -> Result<Tensor> {
    let img = read_rgb(path)?;
    let (w, h) = img.dimensions();
    let Some(mask) = mask else {
        return Ok(net.embed_image(img.as_raw(), w as usize, h as usize));
    };
    let m = preservation::read_mask(mask)?;
    ensure!(
        m.size() == [h as i64, w as i64],
        "the mask {} is {:?}, the image {} [{h}, {w}]",
        mask.display(),
        m.size(),
        path.display()
    );
    let bbox = clip::bounding_box(&m).with_context(|| mask.display().to_string())?;
    let (rgb, cw, ch) = clip::crop_rgb(img.as_raw(), w as usize, bbox);
    Ok(net.embed_image(&rgb, cw, ch))
}

#[derive(Args)]
struct Pair {
    /// The edited image.
    image: PathBuf,
    /// The original.
    reference: PathBuf,
    /// Where to measure: pixels at or above 128 (grey or RGB, the images' size).
    #[arg(long)]
    mask: PathBuf,
}

#[derive(Args)]
struct Common {
    a: PathBuf,
    b: PathBuf,
    /// NVIDIA's inception-2015-12-05.pt (TorchScript) or pytorch-fid's pt_inception-*.pth.
    #[arg(long)]
    inception: PathBuf,
    #[arg(long, value_enum, default_value_t = Mode::Clean)]
    mode: Mode,
    /// Images per network call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

fn default_cache() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache/frisket/eval")
}

fn read_pair(p: &Pair) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        preservation::read_image(&p.image)?,
        preservation::read_image(&p.reference)?,
        preservation::read_mask(&p.mask)?,
    ))
}

fn run_ab(args: &AbArgs) -> Result<serde_json::Value> {
    use frisket_eval::ab::{cases, conditions::Condition, domain_fid, report, run, tune};
    let (model, n, steps) = (args.model.as_path(), args.cases, args.steps);
    let conditions = args.conditions.split(',').map(|c| Condition::parse(c.trim())).collect::<Result<Vec<_>>>()?;
    let tuned = conditions.contains(&Condition::SdTuned);
    let grid = tune::parse_grid(&args.tune_grid)?;
    ensure!(model.join("model_index.json").is_file(), "no model at {} (no model_index.json)", model.display());
    let name = model.file_name().context("the model path has no folder name")?.to_string_lossy().to_string();
    let cases = cases::cases(cases::HELD_OUT_BASE, n)?;
    if tuned {
        cases::cases(cases::TUNING_BASE, args.tune_cases).context("the tuning split (--tune-cases)")?;
    }
    let extras = run::Extras {
        clip: args.clip.as_deref().map(Clip::load).transpose()?,
        lpips: args.lpips.as_deref().map(Lpips::load).transpose()?,
        inception: args.inception.as_deref().map(load_inception_64).transpose()?,
    };
    let parent = model.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let spawned = match &args.server {
        Some(_) => None,
        None => Some(run::spawn_server(&run::default_server_binary(), parent)?),
    };
    let addr = args.server.clone().unwrap_or_else(|| spawned.as_ref().map(|s| s.addr.clone()).unwrap_or_default());
    let started = std::time::Instant::now();
    let mut progress = |i: &run::ItemResult| {
        eprintln!(
            "[ab] case {} {}: adherence {} background PSNR {:.2}",
            i.case, i.condition, i.metrics.adherence, i.metrics.psnr_background
        )
    };
    let (strength, tuning) = if tuned {
        let (s, record) = tune::tune(&addr, &name, args.tune_cases, &grid, steps, &mut progress)?;
        eprintln!("[ab] sd-tuned: strength {s}");
        (Some(s), record)
    } else {
        (None, serde_json::Value::Null)
    };
    let arms: Vec<run::Arm> = conditions
        .iter()
        .map(|&c| -> run::Arm {
            let name = name.as_str();
            (
                c.name().into(),
                Box::new(move |seed: u64, case: &frisket_shapes::protect::ProtectCase| {
                    c.request(name, seed, steps, case, strength)
                }),
            )
        })
        .collect();
    let items = run::run_all(&addr, &cases, &arms, &extras, &mut progress)?;
    let summary = report::summarise(&items, &conditions, cases.len())?;
    let references: Vec<&image::RgbImage> = cases.iter().map(|(_, c)| &c.reference.image).collect();
    let domain_fid =
        extras.clip.as_ref().map(|clip| domain_fid::summarise(clip, &items, &references, &conditions)).transpose()?;
    let (strips, strips_html) = report::strips(&items, &cases, &conditions)?.unzip();
    let report = serde_json::json!({
        "frisket_version": env!("CARGO_PKG_VERSION"),
        "cases": cases.len(),
        "model_sha256": report::model_hashes(model)?,
        "seeds": [cases::HELD_OUT_BASE, cases::HELD_OUT_BASE + n as u64],
        "settings": {
            "model": model.display().to_string(),
            "conditions": conditions.iter().map(|c| c.name()).collect::<Vec<_>>(),
            "steps": steps.unwrap_or(frisket::proto::defaults::paper::STEPS as u32),
            "blend_dilation_px": frisket_eval::ab::conditions::BLEND_DILATION,
            "bootstrap": {"resamples": frisket_eval::ab::stats::RESAMPLES, "seed": frisket_eval::ab::stats::SEED, "level": frisket_eval::ab::stats::LEVEL},
            "wilcoxon": "two-sided, normal approximation, zero_method wilcox, no continuity correction; Holm over the differences",
            "psnr_cap_db": run::PSNR_CAP_DB,
            "clip": args.clip.as_ref().map(|p| p.display().to_string()),
            "clip_sha256": args.clip.as_deref().map(report::model_hashes).transpose()?,
            "lpips": args.lpips.as_ref().map(|p| p.display().to_string()),
            "lpips_sha256": args.lpips.as_deref().map(report::file_hash).transpose()?,
            "inception": args.inception.as_ref().map(|p| p.display().to_string()),
            "inception_sha256": args.inception.as_deref().map(report::file_hash).transpose()?,
            "pair64": frisket_eval::pair64::LABEL,
        },
        "tuning": tuning,
        "strips": strips,
        "seconds": started.elapsed().as_secs_f64(),
        "summary": summary,
        "domain_fid": domain_fid,
        "items": items,
    });
    report::write(&args.out, &report, strips_html.as_deref().unwrap_or(""))?;
    Ok(report["summary"].clone())
}

/// An Inception file for the 64-feature layer: pytorch-fid's state dict only.
fn load_inception_64(path: &Path) -> Result<Inception> {
    let net = Inception::load(path)?;
    ensure!(
        matches!(net, Inception::StateDict { .. }),
        "{}: the 64-feature layer needs pytorch-fid's pt_inception-*.pth state dict (the network torchmetrics loads)",
        path.display()
    );
    Ok(net)
}

/// `pair64`: two images, or two folders paired by file name.
fn run_pair64(a: &Path, b: &Path, inception: &Path) -> Result<serde_json::Value> {
    use frisket_eval::pair64::{pair64, LABEL};
    let net = load_inception_64(inception)?;
    let pairs: Vec<(PathBuf, PathBuf)> = if a.is_dir() && b.is_dir() {
        let (fa, fb) = (list_images(a)?, list_images(b)?);
        ensure!(!fa.is_empty(), "{} has no images", a.display());
        let names = |f: &[PathBuf]| f.iter().map(|p| p.file_name().unwrap().to_owned()).collect::<Vec<_>>();
        ensure!(
            names(&fa[..]) == names(&fb[..]),
            "{} and {} do not hold the same file names (pairs are matched by name)",
            a.display(),
            b.display()
        );
        fa.into_iter().zip(fb).collect()
    } else {
        ensure!(
            a.is_file() && b.is_file(),
            "give two image files or two folders ({} and {})",
            a.display(),
            b.display()
        );
        vec![(a.to_path_buf(), b.to_path_buf())]
    };
    let values = pairs
        .iter()
        .map(|(x, y)| Ok::<_, anyhow::Error>((x, pair64(&net, &read_rgb(x)?, &read_rgb(y)?)?)))
        .collect::<Result<Vec<_>>>()?;
    let mean = values.iter().map(|v| v.1).sum::<f64>() / values.len() as f64;
    let per_pair: Vec<_> = values
        .iter()
        .map(|(x, v)| serde_json::json!({"image": x.file_name().unwrap().to_string_lossy(), "value": v}))
        .collect();
    Ok(serde_json::json!({"metric": "pair64", "label": LABEL, "value": mean, "n": values.len(), "pairs": per_pair}))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let json = match cli.command {
        Command::Ab(args) => run_ab(&args)?,
        Command::Pair64 { a, b, inception } => run_pair64(&a, &b, &inception)?,
        Command::Fid { common: c, cache, no_cache } => {
            let net = Inception::load(&c.inception)?;
            let cache = (!no_cache).then_some(cache.as_path());
            let a = folder_stats(&c.a, &net, &c.inception, c.mode, c.batch, cache)?;
            let b = folder_stats(&c.b, &net, &c.inception, c.mode, c.batch, cache)?;
            let fid = stats::frechet_distance(&a, &b)?;
            serde_json::json!({"metric": "fid", "value": fid, "mode": c.mode.name(), "n_a": a.n, "n_b": b.n})
        }
        Command::Kid { common: c, subsets, max_subset_size, seed } => {
            let net = Inception::load(&c.inception)?;
            let a = folder_features(&c.a, &net, c.mode, c.batch)?;
            let b = folder_features(&c.b, &net, c.mode, c.batch)?;
            let config = KidConfig { subsets, max_subset_size, seed };
            let value = kid::kernel_distance(&a, &b, &config)?;
            serde_json::json!({"metric": "kid", "value": value, "mode": c.mode.name(), "n_a": a.size()[0], "n_b": b.size()[0], "subsets": subsets})
        }
        Command::Psnr(p) => {
            let (a, b, mask) = read_pair(&p)?;
            serde_json::json!({"metric": "psnr", "value": preservation::masked_psnr(&a, &b, &mask)?})
        }
        Command::Ssim(p) => {
            let (a, b, mask) = read_pair(&p)?;
            serde_json::json!({"metric": "ssim", "value": preservation::masked_ssim(&a, &b, &mask)?})
        }
        Command::Lpips { pair, weights } => {
            let net = Lpips::load(&weights)?;
            let (a, b, mask) = read_pair(&pair)?;
            serde_json::json!({"metric": "lpips", "value": net.masked(&a, &b, &mask)?})
        }
        Command::ClipScore { images, prompts, masks, clip } => {
            let files = list_images(&images)?;
            ensure!(!files.is_empty(), "{} has no images", images.display());
            let prompts_list = clip::read_prompts(&prompts)?;
            ensure!(
                files.len() == prompts_list.len(),
                "{} has {} images but {} has {} prompts (one line per image)",
                images.display(),
                files.len(),
                prompts.display(),
                prompts_list.len()
            );
            let net = Clip::load(&clip.clip)?;
            let embeddings = files
                .iter()
                .map(|f| {
                    let mask = masks.as_ref().map(|m| m.join(f.file_name().unwrap()));
                    embed_file(&net, f, mask.as_deref())
                })
                .collect::<Result<Vec<_>>>()?;
            let texts: Vec<&str> = prompts_list.iter().map(String::as_str).collect();
            let scores = clip::pair_scores(&Tensor::cat(&embeddings, 0), &net.text_embeddings(&texts));
            let per_image: Vec<_> = files
                .iter()
                .zip(&scores)
                .map(|(f, s)| serde_json::json!({"image": f.file_name().unwrap().to_string_lossy(), "score": s}))
                .collect();
            serde_json::json!({
                "metric": if masks.is_some() { "clip_score_region" } else { "clip_score" },
                "value": clip::clip_score(&scores),
                "n": files.len(),
                "scores": per_image,
            })
        }
        Command::ClipDirection { edited, reference, source, target, clip } => {
            let net = Clip::load(&clip.clip)?;
            let (e, r) = (embed_file(&net, &edited, None)?, embed_file(&net, &reference, None)?);
            let texts = net.text_embeddings(&[&target, &source]);
            let value = clip::directional(&e, &r, &texts.narrow(0, 0, 1), &texts.narrow(0, 1, 1))[0];
            serde_json::json!({"metric": "clip_directional", "value": value})
        }
    };
    println!("{json}");
    Ok(())
}
