//! `frisket-eval`: FID and KID between two image folders, printed as JSON.
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use frisket_eval::inception::Inception;
use frisket_eval::kid::{self, KidConfig};
use frisket_eval::lpips::Lpips;
use frisket_eval::{folder_features, folder_stats, preservation, stats, Mode};
use std::path::PathBuf;
use tch::Tensor;

#[derive(Parser)]
#[command(version, about = "Evaluation metrics: FID and KID over image folders, PSNR, SSIM and LPIPS inside a mask")]
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    let json = match cli.command {
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
    };
    println!("{json}");
    Ok(())
}
