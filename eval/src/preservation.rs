//! Preservation metrics inside a mask: PSNR and SSIM between two images, averaged over the mask's
//! pixels only (all three channels), so an edit elsewhere does not count. Images are float32 in
//! [0, 1] (data range 1). SSIM follows torchmetrics' `structural_similarity_index_measure`
//! (Gaussian window 11, σ 1.5, reflect padding, k1 0.01, k2 0.03, float32) and takes the mean of
//! its full SSIM map over the mask; PSNR is torchmetrics' `peak_signal_noise_ratio` of the masked
//! values.
use anyhow::{bail, Context, Result};
use frisket_engine::image_io::read_rgb;
use std::path::Path;
use tch::{Kind, Tensor};

const SIGMA: f64 = 1.5;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// An RGB image file → [3, H, W] float32 in [0, 1].
pub fn read_image(path: &Path) -> Result<Tensor> {
    Ok(unit_rgb(&read_rgb(path)?))
}

/// An RGB image → [3, H, W] float32 in [0, 1].
pub fn unit_rgb(img: &image::RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    let t = Tensor::from_slice(img.as_raw()).reshape([h as i64, w as i64, 3]).permute([2, 0, 1]);
    t.to_kind(Kind::Float) / 255.0
}

/// A mask file (grey or RGB; a pixel is inside where its first channel is at least 128) → [H, W] bool.
pub fn read_mask(path: &Path) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("reading mask {}", path.display()))?.to_luma8();
    let (w, h) = img.dimensions();
    Ok(Tensor::from_slice(img.as_raw()).reshape([h as i64, w as i64]).ge(128))
}

pub fn check(a: &Tensor, b: &Tensor, mask: &Tensor) -> Result<()> {
    if a.size() != b.size() {
        bail!("the images differ in size: {:?} vs {:?}", a.size(), b.size());
    }
    if a.size()[1..] != mask.size()[..] {
        bail!("the mask is {:?}, the images {:?}", mask.size(), &a.size()[1..]);
    }
    ensure_nonempty(mask)
}

/// A mask with no pixel inside is an error (nothing to measure).
pub fn ensure_nonempty(mask: &Tensor) -> Result<()> {
    if mask.sum(Kind::Int64).int64_value(&[]) == 0 {
        bail!("the mask is empty (no pixel at or above 128)");
    }
    Ok(())
}

/// Mean of a [3, H, W] map over the mask's pixels.
fn masked_mean(map: &Tensor, mask: &Tensor) -> f64 {
    map.masked_select(&mask.unsqueeze(0).expand_as(map)).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

pub fn masked_psnr(a: &Tensor, b: &Tensor, mask: &Tensor) -> Result<f64> {
    check(a, b, mask)?;
    let diff = (a - b).to_kind(Kind::Double);
    let mse = masked_mean(&(&diff * &diff), mask);
    Ok(10.0 * (1.0 / mse).log10())
}

/// torchmetrics' SSIM map, [3, H, W].
pub fn ssim_map(a: &Tensor, b: &Tensor) -> Tensor {
    let k = (3.5 * SIGMA + 0.5) as i64 * 2 + 1;
    let pad = (k - 1) / 2;
    let dist = Tensor::arange_start_step((1 - k) as f64 / 2.0, (1 + k) as f64 / 2.0, 1.0, (Kind::Float, a.device()));
    let gauss = (-(dist / SIGMA).pow_tensor_scalar(2) / 2.0).exp();
    let g = (&gauss / gauss.sum(Kind::Float)).unsqueeze(0);
    let kernel = g.transpose(0, 1).matmul(&g).expand([3, 1, k, k], false);
    let p = a.unsqueeze(0).pad([pad, pad, pad, pad], "reflect", None);
    let t = b.unsqueeze(0).pad([pad, pad, pad, pad], "reflect", None);
    let input = Tensor::cat(&[&p, &t, &(&p * &p), &(&t * &t), &(&p * &t)], 0);
    let out = input.conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], 3);
    let o = out.split(1, 0);
    let mu_p_sq = o[0].pow_tensor_scalar(2);
    let mu_t_sq = o[1].pow_tensor_scalar(2);
    let mu_pt = &o[0] * &o[1];
    let sigma_p_sq = (&o[2] - &mu_p_sq).clamp_min(0.0);
    let sigma_t_sq = (&o[3] - &mu_t_sq).clamp_min(0.0);
    let sigma_pt = &o[4] - &mu_pt;
    let (c1, c2) = (K1.powi(2), K2.powi(2));
    let upper = sigma_pt * 2.0 + c2;
    let lower = (sigma_p_sq + sigma_t_sq) + c2;
    let ssim = ((mu_pt * 2.0 + c1) * upper) / ((mu_p_sq + mu_t_sq + c1) * lower);
    ssim.squeeze_dim(0)
}

pub fn masked_ssim(a: &Tensor, b: &Tensor, mask: &Tensor) -> Result<f64> {
    check(a, b, mask)?;
    Ok(masked_mean(&ssim_map(a, b), mask))
}
