//! The paper's per-pair 64-feature number, not FID: its published code feeds each image of a pair
//! twice to torchmetrics' `FrechetInceptionDistance(feature=64)`, so both covariances are zero
//! and the "FID" it reports is the squared distance ‖f(a) − f(b)‖² between the two images' 64-d
//! features (torch-fidelity's "64" layer, `Inception::features_64`, torchmetrics' preprocessing),
//! in float64 as torchmetrics computes it.
use crate::inception::Inception;
use crate::Mode;
use anyhow::Result;
use image::RgbImage;
use tch::{Kind, Tensor};

/// How reports and output name it.
pub const LABEL: &str = "the paper's per-pair 64-feature number, not FID";

/// The number for one pair (either order gives the same).
pub fn pair64(net: &Inception, a: &RgbImage, b: &RgbImage) -> Result<f64> {
    let x = |img: &RgbImage| Mode::Torchmetrics.preprocess(img.as_raw(), img.width() as usize, img.height() as usize);
    let f = net.features_64(&Tensor::stack(&[x(a), x(b)], 0))?.to_kind(Kind::Double);
    let d = f.get(0) - f.get(1);
    Ok(d.dot(&d).double_value(&[]))
}
