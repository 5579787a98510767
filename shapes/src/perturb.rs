//! Degradations that imitate a small diffusion model's output (blur, colour shift,
//! noise), for testing the judge's robustness.

use image::RgbImage;

use crate::rng::Rng;

/// Separable Gaussian blur (edges clamp).
pub fn gaussian_blur(img: &RgbImage, sigma: f64) -> RgbImage {
    if sigma <= 0.0 {
        return img.clone();
    }
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f64> = (-r..=r).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f64 = k.iter().sum();
    let k: Vec<f64> = k.iter().map(|v| v / sum).collect();
    let (w, h) = (img.width() as i64, img.height() as i64);
    let src: Vec<f64> = img.as_raw().iter().map(|&v| v as f64).collect();
    let mut tmp = vec![0f64; src.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut acc = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    let xx = (x + j as i64 - r).clamp(0, w - 1);
                    acc += kv * src[((y * w + xx) * 3 + c) as usize];
                }
                tmp[((y * w + x) * 3 + c) as usize] = acc;
            }
        }
    }
    let mut out = RgbImage::new(img.width(), img.height());
    for y in 0..h {
        for x in 0..w {
            let mut px = [0u8; 3];
            for c in 0..3 {
                let mut acc = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    let yy = (y + j as i64 - r).clamp(0, h - 1);
                    acc += kv * tmp[((yy * w + x) * 3 + c) as usize];
                }
                px[c as usize] = acc.round().clamp(0.0, 255.0) as u8;
            }
            out.put_pixel(x as u32, y as u32, image::Rgb(px));
        }
    }
    out
}

/// Add an independent uniform integer in `-amp..=amp` to every channel of every pixel.
pub fn add_noise(img: &RgbImage, amp: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed);
    let mut out = img.clone();
    for v in out.iter_mut() {
        let d = rng.below(2 * amp as u64 + 1) as i32 - amp as i32;
        *v = (*v as i32 + d).clamp(0, 255) as u8;
    }
    out
}

/// Add a constant per channel (a global colour cast).
pub fn shift_colour(img: &RgbImage, shift: [i32; 3]) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for (v, d) in p.0.iter_mut().zip(shift) {
            *v = (*v as i32 + d).clamp(0, 255) as u8;
        }
    }
    out
}

/// The "mild" degradation used by the robustness test: blur σ, then a random colour
/// cast of up to ±`cast` per channel, then uniform noise of ±`noise`.
pub fn degrade(img: &RgbImage, sigma: f64, cast: u32, noise: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed ^ 0xD15_7047);
    let shift = [0; 3].map(|_: i32| rng.below(2 * cast as u64 + 1) as i32 - cast as i32);
    add_noise(&shift_colour(&gaussian_blur(img, sigma), shift), noise, rng.next_u64())
}
