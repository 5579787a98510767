//! Running the A/B: a server (started here from target/debug/frisket-server, or the user's
//! address), every case under every condition with the case's seed, and per-item metrics.
//!
//! Adherence: the judge finds the requested object with its colour, shape and position
//! (`ObjectCheck::all_right`). Preservation: PSNR and SSIM against the reference over the pixels
//! that belong to neither true object (the kept object and the requested object's region in the
//! target scene), and the kept object's PSNR (exact pixels give PSNR_CAP_DB). With the user's
//! networks (`Extras`): LPIPS over the same background pixels, and the CLIP score (clip.rs:
//! 100·max(cos, 0)) of the output against the prompt, whole and cropped to the bounding box of
//! the requested object's true region; the paper's per-pair 64-feature number (pair64.rs, not
//! FID) of the output against the reference.
use crate::clip::{self, Clip};
use crate::lpips::Lpips;
use crate::preservation;
use anyhow::{bail, ensure, Context, Result};
use frisket::Client;
use frisket_shapes::protect::ProtectCase;
use frisket_shapes::{check_object, judge, ObjectQuery};
use image::RgbImage;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use tch::Tensor;

/// The kept object's PSNR when its pixels are bit-exact (infinite PSNR; JSON has no infinity).
pub const PSNR_CAP_DB: f64 = 100.0;

/// A server this runner started; killed when dropped.
pub struct Spawned {
    child: Child,
    pub addr: String,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `frisket-server serve --models DIR --listen 127.0.0.1:0 --device cpu` and waits for its
/// listening line.
pub fn spawn_server(binary: &Path, models: &Path) -> Result<Spawned> {
    ensure!(
        binary.is_file(),
        "no server binary at {} (cargo build -p frisket-server, or pass --server ADDR)",
        binary.display()
    );
    let mut child = Command::new(binary)
        .args(["serve", "--models"])
        .arg(models)
        .args(["--listen", "127.0.0.1:0", "--device", "cpu"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(addr) = line.strip_prefix("frisket-server listening on ") {
            return Ok(Spawned { child, addr: addr.trim().to_string() });
        }
    }
    let status = child.wait()?;
    bail!("{} exited ({status}) before listening", binary.display())
}

/// The optional metrics' networks, supplied by the user.
#[derive(Default)]
pub struct Extras {
    pub clip: Option<Clip>,
    pub lpips: Option<Lpips>,
    /// pytorch-fid's network, for the paper's per-pair 64-feature number (pair64.rs).
    pub inception: Option<crate::inception::Inception>,
}

/// One output's metrics; the optional ones are present when `Extras` has their network.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Metrics {
    pub adherence: f64,
    pub psnr_background: f64,
    pub ssim_background: f64,
    pub psnr_kept: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lpips_background: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_score_region: Option<f64>,
    /// Output vs reference, whole images (pair64.rs: not FID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pair64: Option<f64>,
}

/// One case under one condition (or one tuning arm).
#[derive(Debug, serde::Serialize)]
pub struct ItemResult {
    pub case: usize,
    pub seed: u64,
    pub condition: String,
    #[serde(flatten)]
    pub metrics: Metrics,
    #[serde(skip)]
    pub image: RgbImage,
    /// The CLIP's embedding [1, d] of the whole output (with `Extras::clip`), which the CLIP
    /// score used and the domain FID uses again.
    #[serde(skip)]
    pub clip_embedding: Option<Tensor>,
}

/// One arm of a run: its name and the job it makes of a case (seed, case).
pub type Arm<'a> = (String, Box<dyn Fn(u64, &ProtectCase) -> Result<frisket::proto::v1::GenerateRequest> + 'a>);

fn bool_tensor(values: Vec<bool>, w: u32, h: u32) -> Tensor {
    let bytes: Vec<u8> = values.into_iter().map(u8::from).collect();
    Tensor::from_slice(&bytes).reshape([h as i64, w as i64]).gt(0)
}

/// The item's metrics for an output image, and the CLIP's embedding of it (with a CLIP).
pub fn score(case: &ProtectCase, out: &RgbImage, extras: &Extras) -> Result<(Metrics, Option<Tensor>)> {
    let reference = &case.reference.image;
    ensure!(
        out.dimensions() == reference.dimensions(),
        "the output is {:?}, the reference {:?}",
        out.dimensions(),
        reference.dimensions()
    );
    let (w, h) = reference.dimensions();
    let adherence = check_object(&judge(out), &ObjectQuery::from_info(&case.wanted)).all_right();
    let pixels = |f: &dyn Fn(u32, u32) -> bool| {
        (0..h).flat_map(|y| (0..w).map(move |x| (x, y))).map(|(x, y)| f(x, y)).collect::<Vec<_>>()
    };
    let background =
        bool_tensor(pixels(&|x, y| !case.target.masks.iter().chain(&case.reference.masks).any(|m| m.get(x, y))), w, h);
    let kept = bool_tensor(pixels(&|x, y| case.reference.masks[0].get(x, y)), w, h);
    let (a, b) = (preservation::unit_rgb(out), preservation::unit_rgb(reference));
    let psnr_kept = preservation::masked_psnr(&a, &b, &kept)?.min(PSNR_CAP_DB);
    let lpips_background = extras.lpips.as_ref().map(|net| net.masked(&a, &b, &background)).transpose()?;
    let (clip_score, clip_score_region, clip_embedding) = match &extras.clip {
        Some(net) => {
            let text = net.text_embeddings(&[&case.prompt]);
            let whole = net.embed_image(out.as_raw(), w as usize, h as usize);
            let wanted = bool_tensor(pixels(&|x, y| case.target.masks[1].get(x, y)), w, h);
            let (rgb, cw, ch) = clip::crop_rgb(out.as_raw(), w as usize, clip::bounding_box(&wanted)?);
            let region = net.embed_image(&rgb, cw, ch);
            let score = |image: &Tensor| clip::pair_scores(image, &text)[0].max(0.0);
            (Some(score(&whole)), Some(score(&region)), Some(whole))
        }
        None => (None, None, None),
    };
    let metrics = Metrics {
        adherence: f64::from(u8::from(adherence)),
        psnr_background: preservation::masked_psnr(&a, &b, &background)?.min(PSNR_CAP_DB),
        ssim_background: preservation::masked_ssim(&a, &b, &background)?,
        psnr_kept,
        lpips_background,
        clip_score,
        clip_score_region,
        pair64: extras.inception.as_ref().map(|net| crate::pair64::pair64(net, out, reference)).transpose()?,
    };
    Ok((metrics, clip_embedding))
}

/// Every case under every arm, in case order then arm order.
pub fn run_all(
    addr: &str,
    cases: &[(u64, ProtectCase)],
    arms: &[Arm],
    extras: &Extras,
    progress: &mut dyn FnMut(&ItemResult),
) -> Result<Vec<ItemResult>> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let client = Client::connect(addr).await?;
        let mut items = Vec::new();
        for (i, (seed, case)) in cases.iter().enumerate() {
            for (name, request) in arms {
                let result = client
                    .generate(request(*seed, case)?)
                    .await?
                    .result()
                    .await
                    .with_context(|| format!("case {i} (seed {seed}) under {name}"))?;
                let image = image::load_from_memory(&result.image)?.to_rgb8();
                let (metrics, clip_embedding) = score(case, &image, extras)?;
                let item = ItemResult { case: i, seed: *seed, condition: name.clone(), metrics, image, clip_embedding };
                progress(&item);
                items.push(item);
            }
        }
        Ok::<_, anyhow::Error>(items)
    })
}

/// The server binary next to this one (both live in target/<profile>/).
pub fn default_server_binary() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("frisket-server"))).unwrap_or_default()
}
