//! A result against its reference, at the 8-bit level the result is written at.
use super::protect::reference_unit;
use tch::{Kind, Tensor};

/// An image [3, H, W] in [0, 1] as the 8-bit values `image_io::tensor_to_rgb` writes,
/// in float.
fn levels(image: &Tensor) -> Tensor {
    (image.to_kind(Kind::Float) * 255.0).round().clamp(0.0, 255.0)
}

/// What a result changed against its reference, at the 8-bit level.
pub struct Comparison {
    /// [H, W] per-pixel mean over RGB of |output − reference|, in [0, 1].
    pub change_map: Tensor,
    /// PSNR (dB) inside the protected region; +∞ when identical; None without a region.
    pub psnr_protected: Option<f64>,
    /// PSNR (dB) outside the protected region (the whole image without one).
    pub psnr_outside: f64,
}

fn psnr(diff_sq: &Tensor, region: &Tensor) -> Option<f64> {
    let count = region.sum(Kind::Float).double_value(&[]) * 3.0;
    if count == 0.0 {
        return None;
    }
    let mse = (diff_sq * region).sum(Kind::Float).double_value(&[]) / count;
    Some(if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() })
}

/// Compares `image` ([3, H, W] in [0, 1]) with `reference` ([1, 3, H, W] in [-1, 1]);
/// `protected` [1, 1, H, W] 0/1 splits the PSNR.
pub fn compare(image: &Tensor, reference: &Tensor, protected: Option<&Tensor>) -> Comparison {
    let out = levels(image);
    let refv = levels(&reference_unit(reference));
    let diff = out - refv;
    let change_map = diff.abs().mean_dim([0i64].as_slice(), false, Kind::Float) / 255.0;
    let diff_sq = diff.square();
    let (h, w) = (diff_sq.size()[1], diff_sq.size()[2]);
    match protected {
        Some(p) => {
            let inside = p.reshape([1, h, w]).to_kind(Kind::Float);
            let outside = inside.rsub_scalar(1.0);
            Comparison {
                change_map,
                psnr_protected: psnr(&diff_sq, &inside),
                psnr_outside: psnr(&diff_sq, &outside).unwrap_or(f64::INFINITY),
            }
        }
        None => Comparison {
            change_map,
            psnr_protected: None,
            psnr_outside: psnr(&diff_sq, &Tensor::ones([1, h, w], (Kind::Float, tch::Device::Cpu)))
                .unwrap_or(f64::INFINITY),
        },
    }
}
