//! Writing maps and masks for people and notebooks: .npy (float32, C order), colour-mapped
//! PNGs (channels side by side), and a manifest.json listing them.
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A tensor as NumPy's .npy v1.0 bytes (little-endian float32).
pub fn npy_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = t.size();
    let dims = match shape.len() {
        0 => String::new(),
        1 => format!("{},", shape[0]),
        _ => shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let values = Vec::<f32>::try_from(t.view(-1)).context("copying tensor values")?;
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// A perceptual dark-to-bright colour ramp (approximately "inferno") at x in [0, 1].
pub fn colormap(x: f32) -> Rgb<u8> {
    const STOPS: [(f32, [f32; 3]); 6] = [
        (0.0, [0.0, 0.0, 4.0]),
        (0.2, [40.0, 11.0, 84.0]),
        (0.4, [101.0, 21.0, 110.0]),
        (0.6, [159.0, 42.0, 99.0]),
        (0.8, [212.0, 72.0, 66.0]),
        (1.0, [252.0, 255.0, 164.0]),
    ];
    let x = if x.is_finite() { x.clamp(0.0, 1.0) } else { 0.0 };
    let i = STOPS.iter().position(|(s, _)| *s >= x).unwrap_or(STOPS.len() - 1).max(1);
    let ((s0, c0), (s1, c1)) = (STOPS[i - 1], STOPS[i]);
    let f = (x - s0) / (s1 - s0);
    Rgb([0, 1, 2].map(|k| (c0[k] + (c1[k] - c0[k]) * f).round() as u8))
}

/// A [C, h, w] (or [h, w]) map as one image: the channels side by side, each scaled
/// `scale`× (nearest), values normalised by the map's min and max and colour-mapped
/// (`colour` false: grey, for masks).
pub fn map_image(t: &Tensor, scale: u32, colour: bool) -> Result<RgbImage> {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float);
    let t = if t.dim() == 2 { t.unsqueeze(0) } else { t };
    let (c, h, w) = t.size3().context("expected a [C, h, w] map")?;
    let values = Vec::<f32>::try_from(t.contiguous().view(-1)).context("copying map values")?;
    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let (s, gap) = (scale.max(1), if c > 1 { 1 } else { 0 });
    let width = c as u32 * (w as u32 * s + gap) - gap;
    let mut img = RgbImage::from_pixel(width, h as u32 * s, Rgb([255, 255, 255]));
    for ch in 0..c as u32 {
        for y in 0..h as u32 * s {
            for x in 0..w as u32 * s {
                let v = values[((ch as i64 * h + (y / s) as i64) * w + (x / s) as i64) as usize];
                let unit = (v - lo) / span;
                let px = if colour { colormap(unit) } else { Rgb([(unit * 255.0).round() as u8; 3]) };
                img.put_pixel(ch * (w as u32 * s + gap) + x, y, px);
            }
        }
    }
    Ok(img)
}

/// One manifest entry.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Entry {
    /// "heatmap", "mask", "protect" or "change".
    pub kind: String,
    pub step: Option<usize>,
    pub timestep: Option<f64>,
    pub token_index: Option<usize>,
    pub token: Option<String>,
    pub shape: Vec<i64>,
    /// The .npy file, relative to the dump folder (the .png has the same stem).
    pub path: String,
}

/// Writes maps into a folder and keeps the manifest.
pub struct Dump {
    dir: PathBuf,
    entries: Vec<Entry>,
}

impl Dump {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir: dir.to_path_buf(), entries: Vec::new() })
    }

    /// Writes `stem`.npy and `stem`.png and records the entry (`path` is filled in).
    pub fn write(&mut self, stem: &str, t: &Tensor, colour: bool, mut entry: Entry) -> Result<()> {
        let npy = format!("{stem}.npy");
        std::fs::write(self.dir.join(&npy), npy_bytes(t)?).with_context(|| format!("writing {npy}"))?;
        let h = *t.size().iter().rev().nth(1).unwrap_or(&1);
        let scale = (128 / h.max(1)).clamp(1, 16) as u32;
        let png = format!("{stem}.png");
        map_image(t, scale, colour)?.save(self.dir.join(&png)).with_context(|| format!("writing {png}"))?;
        entry.shape = t.size();
        entry.path = npy;
        self.entries.push(entry);
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Writes manifest.json (an array of entries, in the order written).
    pub fn finish(&self) -> Result<PathBuf> {
        let path = self.dir.join("manifest.json");
        std::fs::write(&path, serde_json::to_string_pretty(&self.entries)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header() {
        let t = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let b = npy_bytes(&t).unwrap();
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(b.len(), 10 + len + 24);
        assert_eq!(f32::from_le_bytes(b[10 + len..14 + len].try_into().unwrap()), 1.0);
        assert_eq!(colormap(0.0), Rgb([0, 0, 4]));
        assert_eq!(colormap(1.0), Rgb([252, 255, 164]));
    }
}
