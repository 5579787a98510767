//! Evaluation metrics on tch: FID (stats.rs) and KID (kid.rs) over image folders, with the user's
//! Inception network (inception.rs) and each reference implementation's preprocessing (`Mode`);
//! CLIP score with the user's CLIPModel folder (clip.rs); the paper's per-pair 64-feature number, not FID
//! (pair64.rs).
pub mod ab;
pub mod clip;
pub mod inception;
pub mod kid;
pub mod lpips;
pub mod pair64;
pub mod preservation;
pub mod resize;
mod rng;
pub mod stats;

use anyhow::{bail, Context, Result};
use frisket_engine::checkpoint::torch_file;
use frisket_engine::image_io::read_rgb;
use inception::{Inception, INPUT_SIZE};
use sha2::{Digest, Sha256};
use stats::Stats;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Whose preprocessing the features follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// clean-fid's "clean" mode: PIL bicubic resize of the uint8 image to 299 in float32 (no
    /// re-quantisation, resize.rs), then (x − 128) / 128. Statistics as clean-fid: f64 covariance.
    Clean,
    /// pytorch-fid: x / 255 in float32, bilinear resize to 299 (`F.interpolate`,
    /// align_corners=False) inside the network, then 2x − 1.
    PytorchFid,
    /// torchmetrics' `FrechetInceptionDistance` (antialias=True, its default): uint8 to float32
    /// in [0, 255], antialiased bilinear resize to 299 (`F.interpolate(..., antialias=True)`), then
    /// (x − 128) / 128, on pytorch-fid's network (torch-fidelity's is the same file and layout).
    Torchmetrics,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Clean => "clean",
            Mode::PytorchFid => "pytorch-fid",
            Mode::Torchmetrics => "torchmetrics",
        }
    }

    /// One RGB8 image → [3, 299, 299] float32: [0, 255] in clean mode (the network normalises,
    /// inception.rs), [-1, 1] in the other modes.
    pub fn preprocess(self, rgb: &[u8], w: usize, h: usize) -> Tensor {
        let size = INPUT_SIZE as i64;
        match self {
            Mode::Clean => {
                let resized = resize::resize_clean(rgb, w, h, INPUT_SIZE);
                Tensor::from_slice(&resized).reshape([size, size, 3]).permute([2, 0, 1])
            }
            Mode::PytorchFid => {
                let x = Tensor::from_slice(rgb).reshape([h as i64, w as i64, 3]).permute([2, 0, 1]);
                let x = (x.to_kind(Kind::Float) / 255.0).unsqueeze(0);
                let x = x.upsample_bilinear2d([size, size], false, None, None);
                (x * 2.0 - 1.0).squeeze_dim(0)
            }
            Mode::Torchmetrics => {
                let x = Tensor::from_slice(rgb).reshape([h as i64, w as i64, 3]).permute([2, 0, 1]);
                let x = x.to_kind(Kind::Float).unsqueeze(0);
                let x = x.internal_upsample_bilinear2d_aa([size, size], false, None, None);
                ((x - 128.0) / 128.0).squeeze_dim(0)
            }
        }
    }
}

/// A PyTorch state dict file → name → tensor: `torch.save`'s zip or legacy format, a dict or
/// OrderedDict (nested ones by dotted keys), read without unpickling ([`torch_file`]).
pub fn load_state_dict(path: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    Ok(torch_file::read(path)?.into_iter().collect())
}

/// clean-fid's image extensions.
const EXTENSIONS: &[&str] = &["bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"];

/// The images of a folder (not recursive), sorted by name, at least 2 (what the statistics need).
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let files = list_images(dir)?;
    if files.len() < 2 {
        bail!("{} has {} images; the statistics need at least 2", dir.display(), files.len());
    }
    Ok(files)
}

/// The images of a folder (not recursive), sorted by name. Hidden files are skipped; any other
/// file that is not an image is an error, so a wrong folder is not measured silently.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || path.is_dir() {
            continue;
        }
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if !ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
            bail!("{} is not an image (expected one of {})", path.display(), EXTENSIONS.join(", "));
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// [n, 2048] float32 features of a folder's images, `batch` at a time.
pub fn folder_features(dir: &Path, net: &Inception, mode: Mode, batch: usize) -> Result<Tensor> {
    let files = image_files(dir)?;
    if files.len() < stats::RECOMMENDED_IMAGES {
        eprintln!(
            "warning: {} has {} images; FID and KID are biased below {} (the covariance of 2,048 features is singular)",
            dir.display(),
            files.len(),
            stats::RECOMMENDED_IMAGES
        );
    }
    let mut out = Vec::new();
    for chunk in files.chunks(batch.max(1)) {
        let xs = chunk
            .iter()
            .map(|f| {
                let img = read_rgb(f)?;
                let (w, h) = img.dimensions();
                Ok(mode.preprocess(img.as_raw(), w as usize, h as usize))
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(net.features(&Tensor::stack(&xs, 0), mode)?);
    }
    Ok(Tensor::cat(&out, 0))
}

/// The cache key of a folder's statistics: the network file, the mode and every image's name and
/// bytes, so any change to what would be measured is a new entry.
fn cache_key(files: &[PathBuf], network: &Path, mode: Mode) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"frisket-eval stats v1\0");
    h.update(mode.name().as_bytes());
    h.update(std::fs::read(network).with_context(|| format!("reading {}", network.display()))?);
    for f in files {
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        h.update(b"\0");
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A folder's statistics, from `cache` when it holds them for this content and these settings.
pub fn folder_stats(
    dir: &Path,
    net: &Inception,
    network: &Path,
    mode: Mode,
    batch: usize,
    cache: Option<&Path>,
) -> Result<Stats> {
    let entry = match cache {
        Some(cache) => Some(cache.join(format!("{}.stats", cache_key(&image_files(dir)?, network, mode)?))),
        None => None,
    };
    if let Some(entry) = entry.as_ref().filter(|e| e.is_file()) {
        return Stats::load(entry);
    }
    let stats = Stats::from_features(&folder_features(dir, net, mode, batch)?)?;
    if let Some(entry) = entry {
        std::fs::create_dir_all(entry.parent().unwrap())?;
        stats.save(&entry)?;
    }
    Ok(stats)
}
