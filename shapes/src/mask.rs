//! Binary masks (one byte per pixel, 0 or 1).

use image::GrayImage;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    /// Row-major, `1` = in the mask, `0` = not.
    pub data: Vec<u8>,
}

impl Mask {
    pub fn new(width: u32, height: u32) -> Self {
        Mask { width, height, data: vec![0; (width * height) as usize] }
    }

    pub fn from_fn(width: u32, height: u32, mut f: impl FnMut(u32, u32) -> bool) -> Self {
        let mut m = Mask::new(width, height);
        for y in 0..height {
            for x in 0..width {
                if f(x, y) {
                    m.data[(y * width + x) as usize] = 1;
                }
            }
        }
        m
    }

    /// `values[i] >= threshold` (e.g. a heatmap, row-major, same size).
    pub fn from_threshold(width: u32, height: u32, values: &[f32], threshold: f32) -> Self {
        assert_eq!(values.len(), (width * height) as usize);
        Mask { width, height, data: values.iter().map(|&v| (v >= threshold) as u8).collect() }
    }

    /// Pixels of a grey image that are ≥ 128.
    pub fn from_gray(img: &GrayImage) -> Self {
        Mask {
            width: img.width(),
            height: img.height(),
            data: img.as_raw().iter().map(|&v| (v >= 128) as u8).collect(),
        }
    }

    /// 0 / 255 grey image.
    pub fn to_gray(&self) -> GrayImage {
        GrayImage::from_raw(self.width, self.height, self.data.iter().map(|&v| v * 255).collect()).unwrap()
    }

    pub fn get(&self, x: u32, y: u32) -> bool {
        self.data[(y * self.width + x) as usize] != 0
    }

    pub fn set(&mut self, x: u32, y: u32, v: bool) {
        self.data[(y * self.width + x) as usize] = v as u8;
    }

    pub fn count(&self) -> u32 {
        self.data.iter().map(|&v| v as u32).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.data.iter().all(|&v| v == 0)
    }

    pub fn intersection_count(&self, other: &Mask) -> u32 {
        self.check_size(other);
        self.data.iter().zip(&other.data).map(|(&a, &b)| (a & b) as u32).sum()
    }

    pub fn union_count(&self, other: &Mask) -> u32 {
        self.check_size(other);
        self.data.iter().zip(&other.data).map(|(&a, &b)| (a | b) as u32).sum()
    }

    /// Intersection over union; two empty masks give 1.0.
    pub fn iou(&self, other: &Mask) -> f64 {
        let u = self.union_count(other);
        if u == 0 {
            1.0
        } else {
            self.intersection_count(other) as f64 / u as f64
        }
    }

    /// Inclusive-exclusive box `[x0, y0, x1, y1]`, or `None` when empty.
    pub fn bbox(&self) -> Option<[u32; 4]> {
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for y in 0..self.height {
            for x in 0..self.width {
                if self.get(x, y) {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x + 1);
                    y1 = y1.max(y + 1);
                }
            }
        }
        (x0 != u32::MAX).then_some([x0, y0, x1, y1])
    }

    /// Mean of pixel centres `(x + 0.5, y + 0.5)`, or `None` when empty.
    pub fn centroid(&self) -> Option<[f64; 2]> {
        let (mut sx, mut sy, mut n) = (0u64, 0u64, 0u64);
        for y in 0..self.height {
            for x in 0..self.width {
                if self.get(x, y) {
                    sx += 2 * x as u64 + 1;
                    sy += 2 * y as u64 + 1;
                    n += 1;
                }
            }
        }
        (n > 0).then(|| [sx as f64 / (2 * n) as f64, sy as f64 / (2 * n) as f64])
    }

    /// Is the mask one 8-connected piece (empty counts as not connected)?
    pub fn is_connected(&self) -> bool {
        let total = self.count();
        let Some(start) = self.data.iter().position(|&v| v != 0) else {
            return false;
        };
        let (w, h) = (self.width as i64, self.height as i64);
        let mut seen = vec![false; self.data.len()];
        let mut stack = vec![start];
        seen[start] = true;
        let mut n = 0;
        while let Some(i) = stack.pop() {
            n += 1;
            let (x, y) = ((i as i64) % w, (i as i64) / w);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx >= 0 && ny >= 0 && nx < w && ny < h {
                        let j = (ny * w + nx) as usize;
                        if self.data[j] != 0 && !seen[j] {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
        }
        n == total
    }

    fn check_size(&self, other: &Mask) {
        assert!(self.width == other.width && self.height == other.height, "mask sizes differ");
    }
}
