//! Loss curves as a PNG with the `image` crate only (no plotting dependency, no fonts): one
//! panel per series, log-scale y with a faint line at every power of ten, the raw loss in
//! light grey and a 100-step moving average in colour. The model card says what the panels are.
use anyhow::Result;
use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 640;
const H: u32 = 240;
const PAD: u32 = 12;

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as u32).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

pub fn loss_curves(path: &Path, series: &[(&str, &[f64])]) -> Result<()> {
    let mut img = RgbImage::from_pixel(W, H * series.len() as u32, Rgb([255, 255, 255]));
    let colours = [Rgb([31, 119, 180]), Rgb([44, 160, 44]), Rgb([214, 39, 40])];
    for (k, (_, ys)) in series.iter().enumerate() {
        let top = k as u32 * H;
        let ys: Vec<f64> = ys.iter().map(|v| v.max(1e-6).log10()).collect();
        if ys.is_empty() {
            continue;
        }
        let lo = ys.iter().cloned().fold(f64::INFINITY, f64::min).floor();
        let hi = ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max).ceil().max(lo + 1.0);
        let px = |i: usize| PAD as f64 + (W - 2 * PAD) as f64 * i as f64 / (ys.len().max(2) - 1) as f64;
        let py = |v: f64| (top + PAD) as f64 + (H - 2 * PAD) as f64 * (hi - v) / (hi - lo);
        let mut decade = lo;
        while decade <= hi {
            line(&mut img, (PAD as f64, py(decade)), ((W - PAD) as f64, py(decade)), Rgb([225, 225, 225]));
            decade += 1.0;
        }
        line(&mut img, (PAD as f64, py(lo)), (PAD as f64, py(hi)), Rgb([0, 0, 0]));
        line(&mut img, (PAD as f64, py(lo)), ((W - PAD) as f64, py(lo)), Rgb([0, 0, 0]));
        for i in 1..ys.len() {
            line(&mut img, (px(i - 1), py(ys[i - 1])), (px(i), py(ys[i])), Rgb([200, 200, 200]));
        }
        let avg: Vec<f64> = (0..ys.len())
            .map(|i| {
                let s = i.saturating_sub(99);
                ys[s..=i].iter().sum::<f64>() / (i + 1 - s) as f64
            })
            .collect();
        for i in 1..avg.len() {
            line(&mut img, (px(i - 1), py(avg[i - 1])), (px(i), py(avg[i])), colours[k % colours.len()]);
        }
    }
    img.save(path)?;
    Ok(())
}
