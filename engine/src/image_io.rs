//! Images in and out of the engine: 8-bit RGB files ↔ float tensors in diffusers' ranges.
use anyhow::{bail, Context, Result};
use image::{GrayImage, ImageFormat, RgbImage};
use std::path::Path;
use tch::{Kind, Tensor};

/// Decodes PNG/JPEG bytes to 8-bit RGB (alpha dropped, grey expanded).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let img = image::load_from_memory(bytes).context("not a readable PNG or JPEG image")?;
    Ok(img.to_rgb8())
}

pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_rgb(&bytes).with_context(|| format!("decoding {}", path.display()))
}

/// RGB8 → [1, 3, H, W] float in [-1, 1], as diffusers' VaeImageProcessor.preprocess
/// (x / 255 in float32, then 2x − 1).
pub fn rgb_to_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    let t = Tensor::from_slice(img.as_raw()).reshape([h as i64, w as i64, 3]).permute([2, 0, 1]).unsqueeze(0);
    let unit = t.to_kind(Kind::Float) / 255.0;
    unit * 2.0 - 1.0
}

/// Decoder output [1, 3, H, W] → [3, H, W] float in [0, 1] (diffusers' postprocess:
/// (x / 2 + 0.5).clamp(0, 1), computed in float32 on the CPU).
pub fn postprocess(decoded: &Tensor) -> Tensor {
    let x = decoded.to_device(tch::Device::Cpu).to_kind(Kind::Float).squeeze_dim(0);
    (x / 2.0 + 0.5).clamp(0.0, 1.0)
}

/// [3, H, W] float in [0, 1] → RGB8 with numpy's rounding ((x·255).round(), half to even).
pub fn tensor_to_rgb(image: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = image.size3().context("expected a [3, H, W] image")?;
    if c != 3 {
        bail!("expected 3 channels, got {c}");
    }
    let bytes = (image * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).permute([1, 2, 0]).contiguous();
    let data: Vec<u8> = Vec::<u8>::try_from(bytes.flatten(0, -1)).context("copying image bytes")?;
    RgbImage::from_raw(w as u32, h as u32, data).context("image buffer size")
}

/// An 8-bit greyscale image as PNG bytes (masks, change maps).
pub fn encode_grey_png(img: &GrayImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).context("encoding PNG")?;
    Ok(out.into_inner())
}

pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).context("encoding PNG")?;
    Ok(out.into_inner())
}
