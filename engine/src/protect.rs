//! Protected regions: a region of the reference that comes through unchanged. Its latents
//! come from the reference noised to each step, the final latent takes the clean
//! reference there, and the decoded pixels are composited back bit-exact.
use super::hooks::{ReferenceLatents, StepHook, StepPoint};
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// Widest outward feather of a protected region, in pixels.
pub const MAX_FEATHER: u32 = 256;

/// A region of the reference that must come through unchanged.
#[derive(Debug)]
pub struct ProtectParams {
    /// [H, W] 8-bit mask at image size; non-zero pixels are protected.
    pub mask: Tensor,
    /// Outward feather in pixels: unprotected pixels within this (chessboard) distance of
    /// the region are blended towards the reference, weight 1 − d/(feather+1).
    pub feather: u32,
}

impl Clone for ProtectParams {
    fn clone(&self) -> Self {
        Self { mask: self.mask.shallow_clone(), feather: self.feather }
    }
}

/// A protected region resolved for a job's size and model.
#[derive(Debug)]
pub struct ProtectPlan {
    /// [1, 1, H, W] float 0/1 at image size (CPU).
    pub pixels: Tensor,
    /// [1, 1, h, w] float 0/1 at latent size: the protected latent elements (CPU).
    pub latents: Tensor,
    pub feather: u32,
}

impl ProtectPlan {
    /// Validates `params` for a `width`×`height` image and a VAE of scale `factor`.
    pub fn new(params: &ProtectParams, width: i64, height: i64, factor: i64) -> Result<Self> {
        let (pixels, latents) = protect_masks(&params.mask, width, height, factor)?;
        ensure!(params.feather <= MAX_FEATHER, "feather {} is too wide (at most {MAX_FEATHER} pixels)", params.feather);
        Ok(Self { pixels, latents, feather: params.feather })
    }
}

impl Clone for ProtectPlan {
    fn clone(&self) -> Self {
        Self { pixels: self.pixels.shallow_clone(), latents: self.latents.shallow_clone(), feather: self.feather }
    }
}

/// Checks a protect mask ([H, W] 8-bit, non-zero = protected) against the image size and
/// returns it at image size [1, 1, H, W] and at latent size [1, 1, H/f, W/f] (float 0/1,
/// CPU): a latent element is protected if any pixel under it is.
pub fn protect_masks(mask: &Tensor, width: i64, height: i64, factor: i64) -> Result<(Tensor, Tensor)> {
    let size = mask.size();
    ensure!(
        size.len() == 2,
        "the protect mask must be one 8-bit channel at image size ([height, width]), got shape {size:?}"
    );
    ensure!(
        size[0] == height && size[1] == width,
        "the protect mask is {}×{} pixels but the image is {width}×{height}; it must be the image's size",
        size[1],
        size[0]
    );
    let pixels = mask.to_device(Device::Cpu).ne(0).to_kind(Kind::Float).reshape([1, 1, height, width]);
    let count = pixels.sum(Kind::Float).double_value(&[]);
    ensure!(count > 0.0, "the protect mask is blank: no pixel is protected (send no mask to protect nothing)");
    ensure!(count < (width * height) as f64, "the protect mask covers the whole image: nothing could change");
    let latents = pixels.max_pool2d([factor, factor], [factor, factor], [0, 0], [1, 1], false);
    let covered = latents.mean(Kind::Float).double_value(&[]);
    ensure!(
        covered < 1.0,
        "the protect mask touches every {factor}×{factor} pixel block, so it protects every latent element: nothing could change"
    );
    Ok((pixels, latents))
}

/// The reference [1, 3, H, W] in [-1, 1] as the [3, H, W] image in [0, 1] whose 8-bit
/// conversion (`image_io::tensor_to_rgb`) gives back the reference's bytes exactly.
pub fn reference_unit(reference: &Tensor) -> Tensor {
    (reference.to_device(Device::Cpu).to_kind(Kind::Float).squeeze_dim(0) / 2.0 + 0.5).clamp(0.0, 1.0)
}

/// Composites the reference back into the protected pixels of `image` ([3, H, W] in
/// [0, 1], CPU): protected pixels take the reference's values exactly; with a feather F,
/// unprotected pixels at chessboard distance d ≤ F from the region take the weight
/// 1 − d/(F+1) of the reference (the feather reaches only outward).
pub fn composite(image: &Tensor, reference: &Tensor, protected: &Tensor, feather: u32) -> Tensor {
    let reference = reference_unit(reference);
    let inside = protected.reshape([1, 1, protected.size()[2], protected.size()[3]]).to_kind(Kind::Float);
    let mut weight = inside.copy();
    let mut reached = inside.copy();
    for d in 1..=feather {
        let grown = reached.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false);
        let ring = &grown - &reached;
        weight += ring * (1.0 - d as f64 / (feather as f64 + 1.0));
        reached = grown;
    }
    let weight = weight.squeeze_dim(0);
    let blended = &reference * &weight + image * (weight.rsub_scalar(1.0));
    let inside = inside.squeeze_dim(0).ne(0);
    blended.where_self(&inside.logical_not(), &reference)
}

/// A job's protected region as a step hook.
pub struct Protect {
    plan: ProtectPlan,
    reference: ReferenceLatents,
    /// The plan's latent mask on the model's device, in its dtype.
    latents: Tensor,
    /// The reference image [1, 3, H, W] in [-1, 1].
    image: Tensor,
}

impl Protect {
    pub fn new(plan: ProtectPlan, reference: ReferenceLatents, image: &Tensor) -> Self {
        let latents = plan.latents.to_device(reference.clean.device()).to_kind(reference.clean.kind());
        Self { plan, reference, latents, image: image.shallow_clone() }
    }

    /// The protected latent elements [1, 1, h, w] on the model's device.
    pub fn latent_mask(&self) -> &Tensor {
        &self.latents
    }
}

impl StepHook for Protect {
    fn before_step(&mut self, at: &StepPoint, latents: &mut Tensor) -> Result<()> {
        let p = &self.latents;
        *latents = &*latents * p.rsub_scalar(1.0) + self.reference.noised(at.scheduler, at.step_index) * p;
        Ok(())
    }

    fn before_decode(&mut self, latents: &mut Tensor) {
        let m = &self.latents;
        *latents = &*latents * m.rsub_scalar(1.0) + &self.reference.clean * m;
    }

    fn after_decode(&mut self, image: &mut Tensor) {
        *image = composite(image, &self.image, &self.plan.pixels, self.plan.feather);
    }
}
