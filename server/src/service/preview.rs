//! Per-step previews and raw latents for the event stream.
use super::request::{Format, Method, PreviewSpec};
use anyhow::{Context, Result};
use frisket_engine::image_io;
use frisket_engine::model::StableDiffusion;
use frisket_engine::tch::{Device, Kind, Tensor};
use image::RgbImage;

/// SD 1.x latent → RGB: the widely used linear fit (ComfyUI's `latent_rgb_factors` for
/// SD1.5), applied to the scaled latent; rows are latent channels, columns R, G, B.
pub const SD15_LATENT_RGB: [[f32; 3]; 4] =
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]];

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
        Method::Vae => image_io::tensor_to_rgb(&model.decode_latents(denoised)?)?,
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

/// A result's change map ([H, W] in [0, 1], the engine's comparison with the reference)
/// as an 8-bit grey PNG.
pub fn change_map_png(map: &Tensor) -> Result<Vec<u8>> {
    let (h, w) = map.size2().context("expected an [H, W] change map")?;
    let levels =
        (map.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8);
    let bytes = Vec::<u8>::try_from(levels.contiguous().view(-1)).context("copying the change map")?;
    let grey = image::GrayImage::from_raw(w as u32, h as u32, bytes).context("change map size")?;
    image_io::encode_grey_png(&grey)
}

/// A [C, h, w] map as an [h, w] plane: `sum` over channels, else their mean.
fn plane(t: &Tensor, sum: bool) -> Result<(u32, u32, Vec<f32>)> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float);
    let t = if t.dim() == 2 { t.unsqueeze(0) } else { t };
    let (_, h, w) = t.size3().context("expected a [C, h, w] map")?;
    let p = if sum {
        t.sum_dim_intlist([0i64].as_slice(), false, Kind::Float)
    } else {
        t.mean_dim([0i64].as_slice(), false, Kind::Float)
    };
    let values = Vec::<f32>::try_from(p.contiguous().view(-1)).context("copying map values")?;
    Ok((w as u32, h as u32, values))
}

/// A mask [C, h, w] (0/1) as an 8-bit grey PNG at `width`×`height` (nearest): the share of
/// channels set at each position.
pub fn mask_png(mask: &Tensor, width: u32, height: u32) -> Result<Vec<u8>> {
    let (w, h, values) = plane(mask, false)?;
    let grey = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([(values[(y * w + x) as usize].clamp(0.0, 1.0) * 255.0).round() as u8])
    });
    let grey = if (w, h) == (width, height) {
        grey
    } else {
        image::imageops::resize(&grey, width, height, image::imageops::FilterType::Nearest)
    };
    image_io::encode_grey_png(&grey)
}

/// Where an importance map [C, h, w] puts its subject, as an 8-bit grey PNG (0 or 255) at
/// `width`×`height` (`mask::pixel_masks` at `SUBJECT_MASK_TAU`).
pub fn subject_mask_png(map: &Tensor, width: u32, height: u32) -> Result<Vec<u8>> {
    use frisket_engine::explain::mask::{pixel_masks, SUBJECT_MASK_TAU};
    let mask = pixel_masks(&map.to_device(Device::Cpu).unsqueeze(0), width as i64, height as i64, SUBJECT_MASK_TAU);
    mask_png(&mask.to_kind(Kind::Float), width, height)
}

/// An importance map [C, h, w] as an RGB PNG at `width`×`height` (nearest): summed over
/// channels, min-max normalised, colour-mapped and blended half and half over `base` (the
/// step's approximate preview at latent size; ignored when its size differs).
pub fn heatmap_png(map: &Tensor, base: &RgbImage, width: u32, height: u32) -> Result<Vec<u8>> {
    let (w, h, values) = plane(map, true)?;
    let lo = values.iter().copied().filter(|v| v.is_finite()).fold(f32::INFINITY, f32::min);
    let hi = values.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let blend = base.dimensions() == (w, h);
    let img = RgbImage::from_fn(w, h, |x, y| {
        let v = values[(y * w + x) as usize];
        let unit = if v.is_finite() && hi > lo { (v - lo) / span } else { 0.0 };
        let heat = frisket_engine::explain::dump::colormap(unit);
        if !blend {
            return heat;
        }
        let b = base.get_pixel(x, y);
        image::Rgb([0, 1, 2].map(|c| (heat[c] as u16 + b[c] as u16).div_ceil(2) as u8))
    });
    let img = if (w, h) == (width, height) {
        img
    } else {
        image::imageops::resize(&img, width, height, image::imageops::FilterType::Nearest)
    };
    image_io::encode_png(&img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_map_is_the_rounded_mean_difference() {
        let a = RgbImage::from_raw(2, 1, vec![10, 20, 30, 0, 0, 0]).unwrap();
        let b = RgbImage::from_raw(2, 1, vec![11, 22, 30, 255, 255, 254]).unwrap();
        // The output as the engine holds it ([3, H, W] in [0, 1]) and the reference as a request brings it.
        let output = image_io::rgb_to_tensor(&a).squeeze_dim(0) / 2.0 + 0.5;
        let comparison = frisket_engine::compare::compare(&output, &image_io::rgb_to_tensor(&b), None);
        let png = change_map_png(&comparison.change_map).unwrap();
        let g = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(g.as_raw(), &vec![1, 255]);
    }

    #[test]
    fn masks_and_heatmaps_are_upscaled() {
        let mask = Tensor::from_slice(&[1f32, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]).reshape([2, 2, 2]);
        let g = image::load_from_memory(&mask_png(&mask, 4, 4).unwrap()).unwrap().to_luma8();
        assert_eq!(g.dimensions(), (4, 4));
        assert_eq!(
            (g.get_pixel(0, 0)[0], g.get_pixel(3, 0)[0], g.get_pixel(0, 3)[0], g.get_pixel(3, 3)[0]),
            (128, 0, 255, 128)
        );
        let base = RgbImage::from_pixel(2, 2, image::Rgb([0, 0, 0]));
        let rgb = image::load_from_memory(&heatmap_png(&mask, &base, 4, 4).unwrap()).unwrap().to_rgb8();
        assert_eq!(rgb.dimensions(), (4, 4));
        // The hottest position (x 0, y 1: sum 2) is the ramp's top blended with black,
        // the coldest (x 1, y 0: sum 0) its bottom.
        assert_eq!(rgb.get_pixel(0, 3).0, [126, 128, 82]);
        assert_eq!(rgb.get_pixel(3, 0).0, [0, 0, 2]);
    }
}
