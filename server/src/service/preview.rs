//! Per-step previews and raw latents for the event stream.
use super::request::{Format, Method, PreviewSpec};
use crate::engine::image_io;
use crate::engine::model::StableDiffusion;
use anyhow::{Context, Result};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

/// SD 1.x latent → RGB: the widely used linear fit (ComfyUI's `latent_rgb_factors` for
/// SD1.5), applied to the scaled latent; rows are latent channels, columns R, G, B.
pub const SD15_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// The predicted clean latent [1, C, h, w] → an RGB image at latent resolution by the
/// fixed linear map (grey from the channel mean for latents that are not 4-channel).
pub fn approx_rgb(latent: &Tensor) -> Result<RgbImage> {
    let x = latent.to_device(Device::Cpu).to_kind(Kind::Float).squeeze_dim(0);
    let (c, h, w) = x.size3().context("expected a [1, C, h, w] latent")?;
    let rgb = if c == 4 {
        let factors = Tensor::from_slice(&SD15_LATENT_RGB.concat()).reshape([4, 3]);
        factors.transpose(0, 1).matmul(&x.reshape([4, h * w])).reshape([3, h, w])
    } else {
        x.mean_dim(0, true, Kind::Float).expand([3, h, w], false)
    };
    image_io::tensor_to_rgb(&((rgb + 1.0) / 2.0).clamp(0.0, 1.0))
}

/// One preview: (encoded bytes, MIME type, width, height).
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub mime: &'static str,
    pub width: u32,
    pub height: u32,
}

/// The preview of a step's x̂0 as the request asked for it.
pub fn render(model: &StableDiffusion, denoised: &Tensor, spec: &PreviewSpec) -> Result<Encoded> {
    let img = match spec.method {
        Method::Approx => approx_rgb(denoised)?,
        Method::Vae => image_io::tensor_to_rgb(&model.decode_latents(denoised))?,
    };
    encode(&downscale(img, spec.max_size), spec.format)
}

/// Shrinks so the longest side is at most `max_size` (0: no limit); never enlarges.
pub fn downscale(img: RgbImage, max_size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if max_size == 0 || w.max(h) <= max_size {
        return img;
    }
    let scale = max_size as f64 / w.max(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).clamp(1, max_size);
    let nh = ((h as f64 * scale).round() as u32).clamp(1, max_size);
    image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle)
}

pub fn encode(img: &RgbImage, format: Format) -> Result<Encoded> {
    let bytes = match format {
        Format::Png => image_io::encode_png(img)?,
        Format::Jpeg => {
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .encode_image(img)
                .context("encoding JPEG")?;
            out
        }
    };
    let mime = match format {
        Format::Png => "image/png",
        Format::Jpeg => "image/jpeg",
    };
    Ok(Encoded { bytes, mime, width: img.width(), height: img.height() })
}

/// A latent as float32 little-endian bytes with its shape.
pub fn latent_bytes(latent: &Tensor) -> Result<(Vec<i64>, Vec<u8>)> {
    let x = latent.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = x.size();
    let values = Vec::<f32>::try_from(x.flatten(0, -1)).context("copying latent")?;
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Ok((shape, bytes))
}

/// Per-pixel |output − reference| (largest over R, G, B) as an 8-bit grey PNG.
pub fn change_map(output: &RgbImage, reference: &RgbImage) -> Result<Vec<u8>> {
    let (w, h) = output.dimensions();
    let grey = image::GrayImage::from_fn(w, h, |x, y| {
        let (a, b) = (output.get_pixel(x, y), reference.get_pixel(x, y));
        image::Luma([(0..3).map(|c| a[c].abs_diff(b[c])).max().unwrap_or(0)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    grey.write_to(&mut out, image::ImageFormat::Png).context("encoding change map")?;
    Ok(out.into_inner())
}
