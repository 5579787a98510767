//! From importance maps to the manipulation mask, and a subject's map as a pixel mask.
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Mask construction: Gaussian blur → max-filter dilation → per-channel threshold at
/// mean + k·std → union over subjects.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskParams {
    /// Odd Gaussian kernel size (1 = no blur).
    pub blur_kernel: i64,
    pub blur_sigma: f64,
    /// Odd max-filter size (1 = no dilation).
    pub dilate_kernel: i64,
    pub dilate_passes: usize,
    /// k in mean + k·std (std with Bessel's correction, as torch.std).
    pub threshold_k: f64,
}

impl Default for MaskParams {
    /// The paper's: blur 3×3 with σ 6, one 3×3 dilation, k = 0.5.
    fn default() -> Self {
        Self { blur_kernel: 3, blur_sigma: 6.0, dilate_kernel: 3, dilate_passes: 1, threshold_k: 0.5 }
    }
}

impl MaskParams {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.blur_kernel >= 1 && self.blur_kernel % 2 == 1 && self.blur_kernel <= 31,
            "mask blur kernel must be odd, 1 to 31, got {}",
            self.blur_kernel
        );
        ensure!(
            self.blur_sigma.is_finite() && self.blur_sigma > 0.0,
            "mask blur sigma must be > 0, got {}",
            self.blur_sigma
        );
        ensure!(
            self.dilate_kernel >= 1 && self.dilate_kernel % 2 == 1 && self.dilate_kernel <= 31,
            "mask dilation size must be odd, 1 to 31, got {}",
            self.dilate_kernel
        );
        ensure!(self.dilate_passes <= 16, "at most 16 dilation passes, got {}", self.dilate_passes);
        ensure!(self.threshold_k.is_finite(), "mask threshold k must be a number, got {}", self.threshold_k);
        Ok(())
    }
}

/// Separable Gaussian blur of [B, C, h, w] per channel, reflect padding (as torchvision's
/// gaussian_blur; replicate where a side is too short to reflect).
pub fn gaussian_blur(x: &Tensor, kernel: i64, sigma: f64) -> Tensor {
    if kernel <= 1 {
        return x.shallow_clone();
    }
    let (_, c, h, w) = x.size4().expect("[B, C, h, w]");
    let r = kernel / 2;
    let weights: Vec<f32> = (-r..=r).map(|i| (-0.5 * (i as f64 / sigma).powi(2)).exp() as f32).collect();
    let sum: f32 = weights.iter().sum();
    let k1 = Tensor::from_slice(&weights.iter().map(|v| v / sum).collect::<Vec<_>>())
        .to_device(x.device())
        .to_kind(x.kind());
    let kx = k1.reshape([1, 1, 1, kernel]).repeat([c, 1, 1, 1]);
    let ky = k1.reshape([1, 1, kernel, 1]).repeat([c, 1, 1, 1]);
    let padded = if r < h && r < w { x.reflection_pad2d([r, r, r, r]) } else { x.replication_pad2d([r, r, r, r]) };
    let y = padded.conv2d(&kx, None::<Tensor>, [1, 1], [0, 0], [1, 1], c);
    y.conv2d(&ky, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
}

/// Max filter of size `kernel` (odd), `passes` times; the border counts as −∞.
pub fn dilate(x: &Tensor, kernel: i64, passes: usize) -> Tensor {
    let mut y = x.shallow_clone();
    if kernel <= 1 {
        return y;
    }
    for _ in 0..passes {
        y = y.max_pool2d([kernel, kernel], [1, 1], [kernel / 2, kernel / 2], [1, 1], false);
    }
    y
}

/// The per-subject masks [S, C, h, w] (bool) of importance maps [S, C, h, w].
pub fn subject_masks(maps: &Tensor, p: &MaskParams) -> Tensor {
    let x = maps.to_kind(Kind::Float);
    let y = dilate(&gaussian_blur(&x, p.blur_kernel, p.blur_sigma), p.dilate_kernel, p.dilate_passes);
    let dims = [2i64, 3].as_slice();
    let mean = y.mean_dim(dims, true, Kind::Float);
    let std = y.std_dim(dims, true, true);
    y.gt_tensor(&(mean + std * p.threshold_k))
}

/// The τ of `pixel_masks` that the service streams and eval_tiny scores, chosen on the
/// shapes model's tuning set (the sweep is in docs/shapes-model-journal.md).
pub const SUBJECT_MASK_TAU: f64 = 0.15;

/// Pixel masks [S, H, W] (bool) of importance maps [S, C, h, w]: channels summed, negative
/// heat dropped, the map brought to the image's size bicubically (torch's, a = −0.75), and
/// kept where it reaches τ × its maximum (DAAM's rule, with its own τ). This is for showing
/// and scoring where a subject is. The manipulation mask (`build_mask`) stays at latent
/// cells, blurred and dilated, because it decides which latents are generated and must
/// cover the subject; on a small latent (16 cells for the shapes model) one cell of
/// dilation is a quarter of an object's width. A map with no positive heat gives an empty
/// mask.
pub fn pixel_masks(maps: &Tensor, width: i64, height: i64, tau: f64) -> Tensor {
    let heat = maps.to_kind(Kind::Float).sum_dim_intlist([1i64].as_slice(), true, Kind::Float).relu();
    let y = heat.upsample_bicubic2d([height, width], false, None, None);
    let peak = y.amax([2i64, 3].as_slice(), true).clamp_min(1e-12);
    y.ge_tensor(&(peak * tau)).squeeze_dim(1)
}

/// The manipulation mask [C, h, w] (float 0/1): the union over subjects. 1 = the element
/// belongs to a subject and is kept from generation; 0 = it comes from the reference.
pub fn build_mask(maps: &Tensor, p: &MaskParams) -> Tensor {
    subject_masks(maps, p).any_dim(0, false).to_kind(Kind::Float)
}

/// Intersection over union of two masks of the same shape (non-zero = set); 1 when both
/// are empty.
pub fn iou(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.ne(0), b.ne(0));
    let inter = a.logical_and(&b).sum(Kind::Float).double_value(&[]);
    let union = a.logical_or(&b).sum(Kind::Float).double_value(&[]);
    if union == 0.0 {
        1.0
    } else {
        inter / union
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::compare;
    use crate::image_io;
    use crate::protect::{composite, protect_masks, reference_unit};

    #[test]
    fn reference_bytes_survive_the_round_trip() {
        let bytes: Vec<u8> = (0..=255u8).flat_map(|v| [v, 255 - v, v / 2]).collect();
        let img = image::RgbImage::from_raw(256, 1, bytes.clone()).unwrap();
        let back = image_io::tensor_to_rgb(&reference_unit(&image_io::rgb_to_tensor(&img))).unwrap();
        assert_eq!(back.into_raw(), bytes);
    }

    #[test]
    fn mask_pipeline() {
        let mut v = vec![0f32; 2 * 8 * 8];
        v[8 * 3 + 4] = 10.0; // channel 0, one hot spot
        let maps = Tensor::from_slice(&v).reshape([1, 2, 8, 8]);
        let m = build_mask(&maps, &MaskParams::default());
        assert_eq!(m.size(), vec![2, 8, 8]);
        // blur reaches 3×3, dilation 5×5 around (3, 4); channel 1 is flat: nothing passes.
        assert_eq!(m.get(0).sum(Kind::Float).double_value(&[]), 25.0);
        assert_eq!(m.get(1).sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(m.get(0).double_value(&[1, 2]), 1.0);
        assert_eq!(m.get(0).double_value(&[0, 4]), 0.0);
    }

    #[test]
    fn pixel_masks_follow_the_heat_at_image_size() {
        // Subject 0: a 2×2 hot block at cells (2..4, 4..6) of an 8×8 latent, split over two
        // channels, on a faint floor; subject 1: no positive heat, so nothing is kept.
        let mut v = vec![0f32; 2 * 2 * 8 * 8];
        for e in &mut v[..64] {
            *e = 0.05;
        }
        for (c, y, x) in [(0, 2, 4), (0, 2, 5), (1, 3, 4), (1, 3, 5)] {
            v[c * 64 + y * 8 + x] = 1.0;
        }
        for e in &mut v[128..] {
            *e = -0.5;
        }
        let maps = Tensor::from_slice(&v).reshape([2, 2, 8, 8]);
        let m = pixel_masks(&maps, 32, 32, 0.15);
        assert_eq!(m.size(), vec![2, 32, 32]);
        // Cells are 4 px: the block covers pixels y 8..16, x 16..24; bicubic keeps it and a
        // rim of at most a cell, nothing far away (the floor is under τ × the peak).
        let kept = m.get(0).sum(Kind::Int64).int64_value(&[]);
        assert!((64..=256).contains(&kept), "kept {kept} pixels for a 64-pixel block");
        assert!(m.get(0).int64_value(&[12, 20]) == 1 && m.get(0).int64_value(&[12, 4]) == 0);
        assert_eq!(m.get(0).int64_value(&[30, 30]), 0);
        assert_eq!(m.get(1).sum(Kind::Int64).int64_value(&[]), 0);
    }

    #[test]
    fn protect_checks() {
        let mask = Tensor::zeros([8, 12], (Kind::Uint8, tch::Device::Cpu));
        assert!(protect_masks(&mask, 12, 8, 4).unwrap_err().to_string().contains("blank"));
        let _ = mask.get(1).get(5).fill_(255);
        let (pixels, latents) = protect_masks(&mask, 12, 8, 4).unwrap();
        assert_eq!(pixels.sum(Kind::Float).double_value(&[]), 1.0);
        assert_eq!(latents.size(), vec![1, 1, 2, 3]);
        assert_eq!(latents.double_value(&[0, 0, 0, 1]), 1.0);
        assert_eq!(latents.sum(Kind::Float).double_value(&[]), 1.0);
        assert!(protect_masks(&mask, 8, 12, 4).unwrap_err().to_string().contains("image's size"));
        let full = Tensor::ones([8, 12], (Kind::Uint8, tch::Device::Cpu));
        assert!(protect_masks(&full, 12, 8, 4).unwrap_err().to_string().contains("whole image"));
    }

    #[test]
    fn feather_reaches_outward_only() {
        let image = Tensor::zeros([3, 5, 5], (Kind::Float, tch::Device::Cpu));
        let reference = Tensor::ones([1, 3, 5, 5], (Kind::Float, tch::Device::Cpu)); // white
        let p = Tensor::zeros([1, 1, 5, 5], (Kind::Float, tch::Device::Cpu));
        let _ = p.get(0).get(0).get(2).get(2).fill_(1.0);
        let out = composite(&image, &reference, &p, 1);
        assert_eq!(out.double_value(&[0, 2, 2]), 1.0);
        assert_eq!(out.double_value(&[0, 1, 1]), 0.5);
        assert_eq!(out.double_value(&[0, 0, 0]), 0.0);
        let c = compare(&out, &reference, Some(&p));
        assert_eq!(c.psnr_protected, Some(f64::INFINITY));
        assert!(c.psnr_outside.is_finite());
    }
}
