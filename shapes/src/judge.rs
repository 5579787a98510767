//! The judge: which coloured shapes are where, from pixels alone.
//!
//! 1. Every pixel gets the nearest named colour in CIELAB (object colours and
//!    background colours are disjoint palettes, see [`crate::palette`]).
//! 2. Pixels of each object colour are split into 8-connected components. Components
//!    that are too small, or that have no "core" (pixels whose 4 neighbours are all in
//!    the component; blur fringes between two colours are 1–2 pixels thin and have
//!    none), are dropped.
//! 3. Each component is compared with every shape template, drawn into the
//!    component's bounding box (with sub-pixel variations of the box); the shape with
//!    the highest IoU wins. Pixels of other found objects are ignored, so a slightly
//!    occluded shape still fits. Holes are part of the comparison, which separates
//!    rings from circles.
//! 4. Position is the 3×3 cell of the centroid; size the class of the box extent.
//! 5. The rest of the image is the background: its named colours and whether it is
//!    solid, a gradient, stripes or checks (from colour changes along rows/columns).

use std::collections::HashMap;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::caption::ObjectQuery;
use crate::geometry::Shape;
use crate::mask::Mask;
use crate::palette::{nearest, srgb_to_lab, Colour};
use crate::scene::{BgKind, Position, Scene, Size};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeConfig {
    /// Smallest object, as a fraction of the image area (0.003 = 12 px at 64×64).
    pub min_area_fraction: f64,
    /// Smallest number of core pixels (all 4 neighbours in the component).
    pub min_core: u32,
    /// Pixels farther than this (ΔE) from every named colour belong to no object.
    pub max_colour_distance: f32,
    /// A background colour is reported when it covers at least this share of the background.
    pub min_background_share: f64,
    /// Pixels within this ΔE of a named colour are "clean" samples of it.
    pub confident_distance: f32,
    /// Most rounds (one pixel each) of growing objects from their cores into their
    /// blurred edges.
    pub grow_rounds: u32,
    /// Largest RGB distance between a pixel and the mix line for it to be unmixed.
    pub max_unmix_residual: f32,
    /// When no sharp template fits better than this IoU, also try blurred templates.
    pub blur_search_below: f64,
    /// A component that fits no shape better than this IoU is not an object.
    pub min_shape_score: f64,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            min_area_fraction: 0.003,
            min_core: 3,
            max_colour_distance: 60.0,
            min_background_share: 0.1,
            confident_distance: 25.0,
            grow_rounds: 64,
            max_unmix_residual: 40.0,
            blur_search_below: 0.9,
            min_shape_score: 0.4,
        }
    }
}

/// An object the judge found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FoundObject {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
    /// Mean of pixel centres.
    pub centroid: [f64; 2],
    /// Pixels in the mask.
    pub area: u32,
    /// `[x0, y0, x1, y1]`, x1/y1 exclusive.
    pub bbox: [u32; 4],
    /// Pixels enclosed by the object but not part of it.
    pub hole_area: u32,
    /// Template IoU for every shape, best first.
    pub shape_scores: Vec<(Shape, f64)>,
    /// Mean ΔE between its pixels and its named colour.
    pub colour_distance: f32,
    #[serde(skip)]
    pub mask: Mask,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackgroundFound {
    pub kind: BgKind,
    /// Named colours with their share of the background pixels, largest first.
    pub colours: Vec<(Colour, f64)>,
}

impl BackgroundFound {
    pub fn colour_set(&self) -> Vec<Colour> {
        let mut v: Vec<Colour> = self.colours.iter().map(|c| c.0).collect();
        v.sort();
        v
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub width: u32,
    pub height: u32,
    /// Largest first.
    pub objects: Vec<FoundObject>,
    pub background: BackgroundFound,
}

impl Judgement {
    /// The largest found object of this colour and shape.
    pub fn find(&self, colour: Colour, shape: Shape) -> Option<&FoundObject> {
        self.objects.iter().find(|o| o.colour == colour && o.shape == shape)
    }

    /// The union of all found objects.
    pub fn foreground(&self) -> Mask {
        let mut m = Mask::new(self.width, self.height);
        for o in &self.objects {
            for (d, s) in m.data.iter_mut().zip(&o.mask.data) {
                *d |= *s;
            }
        }
        m
    }
}

#[derive(Clone, Debug, Default)]
pub struct Judge {
    pub config: JudgeConfig,
}

/// [`Judge::judge`] with the default config.
pub fn judge(img: &RgbImage) -> Judgement {
    Judge::default().judge(img)
}

const NONE: u8 = u8::MAX;
const NOBODY: u32 = u32::MAX;

impl Judge {
    pub fn new(config: JudgeConfig) -> Self {
        Judge { config }
    }

    pub fn judge(&self, img: &RgbImage) -> Judgement {
        let (w, h) = (img.width(), img.height());
        let n = (w * h) as usize;
        let all = Colour::ALL;
        // 1. Nearest named colour per pixel.
        let mut cache: HashMap<[u8; 3], (u8, f32, u8)> = HashMap::new();
        let mut label = vec![NONE; n]; // object colour index into Colour::ALL, or NONE
        let mut dist = vec![0f32; n];
        let mut bg_label = vec![0u8; n]; // nearest background colour index into Colour::ALL
        for (i, p) in img.pixels().enumerate() {
            let (l, d, b) = *cache.entry(p.0).or_insert_with(|| {
                let lab = srgb_to_lab(p.0);
                let (c, d) = nearest(lab, all);
                let (bc, _) = nearest(lab, &Colour::BACKGROUND);
                let l = if c.is_object() && d <= self.config.max_colour_distance { c as u8 } else { NONE };
                (l, d, bc as u8)
            });
            label[i] = l;
            dist[i] = d;
            bg_label[i] = b;
        }

        // 2. Components.
        let min_area = ((self.config.min_area_fraction * n as f64).ceil() as u32).max(4);
        let mut comp = vec![u32::MAX; n];
        let mut comps: Vec<Vec<u32>> = Vec::new();
        for start in 0..n {
            if label[start] == NONE || comp[start] != u32::MAX {
                continue;
            }
            let id = comps.len() as u32;
            let mut pixels = vec![start as u32];
            comp[start] = id;
            let mut k = 0;
            while k < pixels.len() {
                let p = pixels[k];
                k += 1;
                let (x, y) = ((p % w) as i64, (p / w) as i64);
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                            continue;
                        }
                        let q = (ny * w as i64 + nx) as usize;
                        if comp[q] == u32::MAX && label[q] == label[start] {
                            comp[q] = id;
                            pixels.push(q as u32);
                        }
                    }
                }
            }
            comps.push(pixels);
        }
        let kept: Vec<u32> = (0..comps.len() as u32)
            .filter(|&id| {
                let px = &comps[id as usize];
                if (px.len() as u32) < min_area {
                    return false;
                }
                let core = px.iter().filter(|&&p| is_interior(&comp, p, w, h, id)).count() as u32;
                core >= self.config.min_core
            })
            .collect();
        // owner[i]: index into `objs` of the object owning pixel i, or NOBODY.
        let mut owner = vec![NOBODY; n];
        let mut objs: Vec<(Colour, Vec<u32>)> = Vec::new();
        for &id in &kept {
            let px = comps[id as usize].clone();
            for &p in &px {
                owner[p as usize] = objs.len() as u32;
            }
            objs.push((all[label[px[0] as usize] as usize], px));
        }
        let rgb: Vec<[f32; 3]> = img.pixels().map(|p| p.0.map(|v| v as f32)).collect();
        self.grow(&mut owner, &mut objs, &rgb, &dist, &label, &bg_label, w, h);
        // What is left of a blur fringe after growing is too small to be an object.
        for (_, px) in objs.iter_mut() {
            if (px.len() as u32) < min_area {
                for &p in px.iter() {
                    owner[p as usize] = NOBODY;
                }
                px.clear();
            }
        }

        // 3. Describe each kept component.
        let mut objects = Vec::new();
        let mut dropped: Vec<u32> = Vec::new();
        for (id, (colour, px)) in objs.iter().enumerate() {
            let (id, colour) = (id as u32, *colour);
            if px.is_empty() {
                continue;
            }
            let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
            let (mut sx, mut sy) = (0u64, 0u64);
            let mut dsum = 0f64;
            for &p in px.iter() {
                let (x, y) = (p % w, p / w);
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
                sx += 2 * x as u64 + 1;
                sy += 2 * y as u64 + 1;
                dsum += dist[p as usize] as f64;
            }
            let area = px.len() as u32;
            let centroid = [sx as f64 / (2 * area) as f64, sy as f64 / (2 * area) as f64];
            // Local window with a pad: 1 = object, 2 = another found object or outside
            // the image (ignored: it may hide part of this one), 0 = background.
            let touches = px.iter().any(|&p| {
                let (x, y) = ((p % w) as i64, (p / w) as i64);
                (-1..=1).any(|dy| {
                    (-1..=1).any(|dx| {
                        let (nx, ny) = (x + dx, y + dy);
                        nx >= 0 && ny >= 0 && nx < w as i64 && ny < h as i64 && {
                            let o = owner[(ny * w as i64 + nx) as usize];
                            o != NOBODY && o != id
                        }
                    })
                })
            });
            let pad = if touches { PAD + (0.35 * (x1 - x0).max(y1 - y0) as f64).ceil() as usize } else { PAD };
            let (lx0, ly0) = (x0 as i64 - pad as i64, y0 as i64 - pad as i64);
            let (lw, lh) = ((x1 - x0) as usize + 2 * pad, (y1 - y0) as usize + 2 * pad);
            let mut local = vec![0u8; lw * lh];
            for ly in 0..lh {
                for lx in 0..lw {
                    let (gx, gy) = (lx0 + lx as i64, ly0 + ly as i64);
                    if gx < 0 || gy < 0 || gx >= w as i64 || gy >= h as i64 {
                        local[ly * lw + lx] = 2;
                        continue;
                    }
                    let c = owner[(gy * w as i64 + gx) as usize];
                    local[ly * lw + lx] = if c == id {
                        1
                    } else if c != NOBODY {
                        2
                    } else {
                        0
                    };
                }
            }
            let hole_area = holes(&local, lw, lh);
            let shape_scores =
                fit_shapes(&local, lw, lh, pad, (x1 - x0) as f64, (y1 - y0) as f64, self.config.blur_search_below);
            let shape = shape_scores[0].0;
            if shape_scores[0].1 < self.config.min_shape_score {
                // Scattered pixels that fit no shape at all.
                dropped.push(id);
                continue;
            }
            // Size from the area (blur rounds off tips, which changes the box more).
            let (_, ah) = shape.aspect();
            let extent = (area as f64 / (shape.unit_area() * ah)).sqrt() / w.max(h) as f64;
            let mut mask = Mask::new(w, h);
            for &p in px.iter() {
                mask.data[p as usize] = 1;
            }
            objects.push(FoundObject {
                shape,
                colour,
                size: Size::classify(extent),
                position: Position::of_point(centroid[0], centroid[1], w, h),
                centroid,
                area,
                bbox: [x0, y0, x1, y1],
                hole_area,
                shape_scores,
                colour_distance: (dsum / area as f64) as f32,
                mask,
            });
        }
        objects.sort_by(|a, b| b.area.cmp(&a.area).then(a.bbox.cmp(&b.bbox)));

        for id in dropped {
            for &p in &objs[id as usize].1 {
                owner[p as usize] = NOBODY;
            }
        }
        // 5. Background.
        let in_object: Vec<bool> = owner.iter().map(|&c| c != NOBODY).collect();
        let background = analyse_background(&bg_label, &in_object, w, h, self.config.min_background_share);
        Judgement { width: w, height: h, objects, background }
    }
}

impl Judge {
    /// Blur turns an object's edge pixels into mixtures of its colour and its
    /// neighbour's. Give each undecided pixel next to an object to that object when it
    /// is at least half that object's colour: unmix it against the colours seen
    /// nearby (background, or another object) along the straight RGB line.
    #[allow(clippy::too_many_arguments)]
    fn grow(
        &self,
        owner: &mut [u32],
        objs: &mut [(Colour, Vec<u32>)],
        rgb: &[[f32; 3]],
        dist: &[f32],
        label: &[u8],
        bg_label: &[u8],
        w: u32,
        h: u32,
    ) {
        // Observed mean colour of each object (its well-coloured pixels).
        let obj_rgb: Vec<[f32; 3]> = objs
            .iter()
            .map(|(_, px)| {
                let mut acc = [0f64; 3];
                let mut n = 0f64;
                for &p in px {
                    if dist[p as usize] <= self.config.confident_distance {
                        for c in 0..3 {
                            acc[c] += rgb[p as usize][c] as f64;
                        }
                        n += 1.0;
                    }
                }
                if n == 0.0 {
                    for &p in px {
                        for c in 0..3 {
                            acc[c] += rgb[p as usize][c] as f64;
                        }
                    }
                    n = px.len() as f64;
                }
                acc.map(|v| (v / n) as f32)
            })
            .collect();
        let (wi, hi) = (w as i64, h as i64);
        // Start from each object's core (its pixels whose 4 neighbours are all its own):
        // this drops blur fringes and the thin spurs they leave where an object meets
        // two other colours; true object pixels grow back below.
        for (o, (_, px)) in objs.iter_mut().enumerate() {
            let o = o as u32;
            let core: Vec<u32> = px.iter().copied().filter(|&p| is_interior(owner, p, w, h, o)).collect();
            if core.is_empty() {
                continue;
            }
            let dropped: Vec<u32> = px.iter().copied().filter(|&p| !is_interior(owner, p, w, h, o)).collect();
            for p in dropped {
                owner[p as usize] = NOBODY;
            }
            *px = core;
        }
        let mut frontier: Vec<usize> = (0..owner.len()).filter(|&i| owner[i] == NOBODY).collect();
        for _round in 0..self.config.grow_rounds {
            let mut add: Vec<(u32, u32)> = Vec::new();
            for &i in &frontier {
                if owner[i] != NOBODY {
                    continue;
                }
                let (x, y) = ((i as i64) % wi, (i as i64) / wi);
                // Objects touching this pixel.
                let mut cands: Vec<u32> = Vec::new();
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx >= 0 && ny >= 0 && nx < wi && ny < hi {
                            let o = owner[(ny * wi + nx) as usize];
                            if o != NOBODY && !cands.contains(&o) {
                                cands.push(o);
                            }
                        }
                    }
                }
                if cands.is_empty() {
                    continue;
                }
                // What else is nearby: background colours (confident pixels, averaged per
                // named colour) and other objects.
                let mut bg_acc: Vec<(u8, [f32; 3], f32)> = Vec::new();
                let mut near_objs: Vec<u32> = Vec::new();
                for dy in -2..=2 {
                    for dx in -2..=2 {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx < 0 || ny < 0 || nx >= wi || ny >= hi {
                            continue;
                        }
                        let j = (ny * wi + nx) as usize;
                        if owner[j] != NOBODY {
                            if !near_objs.contains(&owner[j]) {
                                near_objs.push(owner[j]);
                            }
                        } else if label[j] == NONE && dist[j] <= self.config.confident_distance {
                            let b = bg_label[j];
                            match bg_acc.iter_mut().find(|e| e.0 == b) {
                                Some(e) => {
                                    for (acc, v) in e.1.iter_mut().zip(rgb[j]) {
                                        *acc += v;
                                    }
                                    e.2 += 1.0;
                                }
                                None => bg_acc.push((b, rgb[j], 1.0)),
                            }
                        }
                    }
                }
                let mut others: Vec<[f32; 3]> = bg_acc.iter().map(|e| e.1.map(|v| v / e.2)).collect();
                if others.is_empty() {
                    // No clean background in sight: use the nearest background colour.
                    others.push(Colour::ALL[bg_label[i] as usize].rgb().map(|v| v as f32));
                }
                let p = rgb[i];
                let mut best: Option<(f32, u32)> = None; // (residual, object)
                for &o in &cands {
                    let a = obj_rgb[o as usize];
                    let mut bs = others.clone();
                    bs.extend(near_objs.iter().filter(|&&q| q != o).map(|&q| obj_rgb[q as usize]));
                    // How well do the other colours nearby explain p without this object
                    // (a blurred stripe edge, or the fringe between another object and
                    // the background)?
                    let mut alt_fit = f32::INFINITY;
                    for (k, c) in bs.iter().enumerate() {
                        for d in &bs[k..] {
                            alt_fit = alt_fit.min(mix_fit(p, *c, *d).0);
                        }
                    }
                    // The best explanation of p as a mix of a and one neighbour colour.
                    let mut fit: Option<(f32, f32)> = None; // (residual, alpha)
                    for b in bs {
                        let (r, alpha) = mix_fit(p, a, b);
                        if fit.is_none_or(|f| r < f.0) {
                            fit = Some((r, alpha));
                        }
                    }
                    if let Some((r, alpha)) = fit {
                        if alpha >= 0.5
                            && r <= self.config.max_unmix_residual
                            && r < alt_fit
                            && best.is_none_or(|b| r < b.0)
                        {
                            best = Some((r, o));
                        }
                    }
                }
                if let Some((_, o)) = best {
                    add.push((i as u32, o));
                }
            }
            if add.is_empty() {
                break;
            }
            frontier.clear();
            for &(i, o) in &add {
                owner[i as usize] = o;
                objs[o as usize].1.push(i);
                let (x, y) = ((i as i64) % wi, (i as i64) / wi);
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx >= 0 && ny >= 0 && nx < wi && ny < hi && owner[(ny * wi + nx) as usize] == NOBODY {
                            frontier.push((ny * wi + nx) as usize);
                        }
                    }
                }
            }
            frontier.sort_unstable();
            frontier.dedup();
        }
        for (_, px) in objs.iter_mut() {
            px.sort_unstable();
        }
    }
}

/// Distance from `p` to the segment from `b` to `a`, and where on it (0 = b, 1 = a).
fn mix_fit(p: [f32; 3], a: [f32; 3], b: [f32; 3]) -> (f32, f32) {
    let ab = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    let pb = [p[0] - b[0], p[1] - b[1], p[2] - b[2]];
    let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
    let alpha =
        if len2 < 1e-3 { 0.0 } else { ((pb[0] * ab[0] + pb[1] * ab[1] + pb[2] * ab[2]) / len2).clamp(0.0, 1.0) };
    let r = (0..3).map(|c| (pb[c] - alpha * ab[c]).powi(2)).sum::<f32>().sqrt();
    (r, alpha)
}

/// Count pixels of the window that are not object (value 1) and cannot be reached from
/// the window's border without crossing object pixels (4-connected).
fn holes(local: &[u8], lw: usize, lh: usize) -> u32 {
    let mut seen = vec![false; local.len()];
    let mut stack = Vec::new();
    for y in 0..lh {
        for x in 0..lw {
            if (x == 0 || y == 0 || x == lw - 1 || y == lh - 1) && local[y * lw + x] != 1 {
                seen[y * lw + x] = true;
                stack.push((x, y));
            }
        }
    }
    while let Some((x, y)) = stack.pop() {
        let nb = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
        for (nx, ny) in nb {
            if nx < lw && ny < lh && !seen[ny * lw + nx] && local[ny * lw + nx] != 1 {
                seen[ny * lw + nx] = true;
                stack.push((nx, ny));
            }
        }
    }
    local.iter().zip(&seen).filter(|(&v, &s)| v != 1 && !s).count() as u32
}

/// IoU of the object (value 1 in the padded window) with `shape` drawn in the box
/// whose pixel extent is `bw`×`bh` (starting at window pixel (1,1)), its edges moved
/// by `da`..`dd` pixels. Pixels of other objects (value 2) are ignored.
#[allow(clippy::too_many_arguments)]
fn template_iou(local: &[u8], lw: usize, lh: usize, pad: usize, shape: Shape, bw: f64, bh: f64, e: [f64; 4]) -> f64 {
    let (x0, y0) = (pad as f64 + e[0], pad as f64 + e[1]);
    let (tw, th) = (bw - e[0] + e[2], bh - e[1] + e[3]);
    let (mut inter, mut uni) = (0u32, 0u32);
    for y in 0..lh {
        let v = (y as f64 + 0.5 - y0) / th;
        for x in 0..lw {
            let o = local[y * lw + x];
            if o == 2 {
                continue;
            }
            let u = (x as f64 + 0.5 - x0) / tw;
            let t = shape.inside_unit(u, v);
            let a = o == 1;
            inter += (a && t) as u32;
            uni += (a || t) as u32;
        }
    }
    if uni == 0 {
        0.0
    } else {
        inter as f64 / uni as f64
    }
}

/// Padding (pixels) around a component's box in its local window.
const PAD: usize = 3;

/// `shape` drawn in the box `(x0, y0, tw, th)` of the window, blurred by a Gaussian of
/// `sigma` pixels and cut at one half: how a blurred picture of the shape, segmented,
/// looks (tips rounded off, notches filled in).
fn blurred_template(shape: Shape, lw: usize, lh: usize, b: [f64; 4], sigma: f64) -> Vec<bool> {
    const SS: usize = 3;
    let mut cov = vec![0f64; lw * lh];
    for y in 0..lh {
        for x in 0..lw {
            let mut n = 0;
            for j in 0..SS {
                let v = (y as f64 + (j as f64 + 0.5) / SS as f64 - b[1]) / b[3];
                for i in 0..SS {
                    let u = (x as f64 + (i as f64 + 0.5) / SS as f64 - b[0]) / b[2];
                    n += shape.inside_unit(u, v) as u32;
                }
            }
            cov[y * lw + x] = n as f64 / (SS * SS) as f64;
        }
    }
    let r = (2.5 * sigma).ceil() as i64;
    let k: Vec<f64> = (-r..=r).map(|i| (-((i * i) as f64) / (2.0 * sigma * sigma)).exp()).collect();
    let ks: f64 = k.iter().sum();
    let mut tmp = vec![0f64; lw * lh];
    for y in 0..lh {
        for x in 0..lw {
            let mut acc = 0.0;
            for (t, kv) in k.iter().enumerate() {
                let xx = x as i64 + t as i64 - r;
                if xx >= 0 && xx < lw as i64 {
                    acc += kv * cov[y * lw + xx as usize];
                }
            }
            tmp[y * lw + x] = acc / ks;
        }
    }
    let mut out = vec![false; lw * lh];
    for y in 0..lh {
        for x in 0..lw {
            let mut acc = 0.0;
            for (t, kv) in k.iter().enumerate() {
                let yy = y as i64 + t as i64 - r;
                if yy >= 0 && yy < lh as i64 {
                    acc += kv * tmp[yy as usize * lw + x];
                }
            }
            out[y * lw + x] = acc / ks >= 0.5;
        }
    }
    out
}

fn mask_iou(local: &[u8], t: &[bool]) -> f64 {
    let (mut inter, mut uni) = (0u32, 0u32);
    for (&o, &t) in local.iter().zip(t) {
        if o == 2 {
            continue;
        }
        let a = o == 1;
        inter += (a && t) as u32;
        uni += (a || t) as u32;
    }
    if uni == 0 {
        0.0
    } else {
        inter as f64 / uni as f64
    }
}

fn fit_shapes(
    local: &[u8],
    lw: usize,
    lh: usize,
    pad: usize,
    bw: f64,
    bh: f64,
    blur_search_below: f64,
) -> Vec<(Shape, f64)> {
    let iou = |s: Shape, e: [f64; 4]| template_iou(local, lw, lh, pad, s, bw, bh, e);
    let mut scores: Vec<(Shape, f64)> = Shape::ALL.iter().map(|&s| (s, iou(s, [0.0; 4]))).collect();
    scores.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Refine the three best with sub-pixel box variations.
    const D: [f64; 2] = [-0.3, 0.3];
    for entry in scores.iter_mut().take(3) {
        for a in D {
            for b in D {
                for c in D {
                    for d in D {
                        entry.1 = entry.1.max(iou(entry.0, [a, b, c, d]));
                    }
                }
            }
        }
    }
    // Sides where another object (or the image border) may hide part of this one:
    // let the template's box reach behind it.
    // (A side is hidden when a 2 lies within 2 pixels outside the box on that side.)
    let side_hidden = |side: usize| {
        let (xr, yr) = match side {
            0 => (pad - 2..pad, pad..lh - pad),
            1 => (pad..lw - pad, pad - 2..pad),
            2 => (lw - pad..lw - pad + 2, pad..lh - pad),
            _ => (pad..lw - pad, lh - pad..lh - pad + 2),
        };
        yr.clone().any(|y| xr.clone().any(|x| local[y * lw + x] == 2))
    };
    let hidden: Vec<usize> = (0..4).filter(|&s| side_hidden(s)).collect();
    if !hidden.is_empty() {
        let mut sets: Vec<Vec<usize>> = hidden.iter().map(|&s| vec![s]).collect();
        if hidden.len() > 1 {
            sets.push(hidden.clone());
        }
        for entry in scores.iter_mut() {
            for set in &sets {
                for f in [0.1, 0.2, 0.3] {
                    let mut e = [0.0; 4];
                    for &side in set {
                        match side {
                            0 => e[0] = -f * bw,
                            1 => e[1] = -f * bh,
                            2 => e[2] = f * bw,
                            _ => e[3] = f * bh,
                        }
                    }
                    entry.1 = entry.1.max(iou(entry.0, e));
                }
            }
        }
    }
    // A poor fit: maybe the picture is blurred. Try blurred templates, in boxes a
    // little larger than what is left of the shape.
    if scores.iter().map(|s| s.1).fold(0.0, f64::max) < blur_search_below {
        for entry in scores.iter_mut() {
            for sigma in [0.6, 1.0, 1.4] {
                for g in [0.0, 0.5, 1.0, 1.5] {
                    let e = g * sigma;
                    let b = [pad as f64 - e, pad as f64 - e, bw + 2.0 * e, bh + 2.0 * e];
                    entry.1 = entry.1.max(mask_iou(local, &blurred_template(entry.0, lw, lh, b, sigma)));
                }
            }
        }
    }
    scores.sort_by(|a, b| b.1.total_cmp(&a.1));
    scores
}

fn analyse_background(bg_label: &[u8], in_object: &[bool], w: u32, h: u32, min_share: f64) -> BackgroundFound {
    let (wu, hu) = (w as usize, h as usize);
    // 3×3 majority filter over background pixels, to calm noise.
    let mut smooth = vec![u8::MAX; bg_label.len()];
    for y in 0..hu {
        for x in 0..wu {
            let i = y * wu + x;
            if in_object[i] {
                continue;
            }
            let mut counts = [0u8; 16];
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx >= 0 && ny >= 0 && nx < w as i64 && ny < h as i64 {
                        let j = ny as usize * wu + nx as usize;
                        if !in_object[j] {
                            counts[bg_label[j] as usize] += 1;
                        }
                    }
                }
            }
            let best = (0..16).max_by_key(|&k| (counts[k], k == bg_label[i] as usize)).unwrap();
            smooth[i] = best as u8;
        }
    }
    // Shares: only pixels inside a patch of one colour (all 8 neighbours alike), so
    // the blurred edges of stripes and checks, which can look like a third colour,
    // do not count.
    let mut counts = [0u32; 16];
    let mut total = 0u32;
    for y in 1..hu.saturating_sub(1) {
        for x in 1..wu.saturating_sub(1) {
            let l = smooth[y * wu + x];
            if l == u8::MAX {
                continue;
            }
            let uniform = (-1i64..=1).all(|dy| {
                (-1i64..=1).all(|dx| {
                    let j = (y as i64 + dy) as usize * wu + (x as i64 + dx) as usize;
                    smooth[j] == l || smooth[j] == u8::MAX
                })
            });
            if uniform {
                counts[l as usize] += 1;
                total += 1;
            }
        }
    }
    if total == 0 {
        for &l in &smooth {
            if l != u8::MAX {
                counts[l as usize] += 1;
                total += 1;
            }
        }
    }
    let mut colours: Vec<(Colour, f64)> = (0..16)
        .filter(|&k| counts[k] > 0)
        .map(|k| (Colour::ALL[k], counts[k] as f64 / total.max(1) as f64))
        .filter(|&(_, s)| s >= min_share)
        .collect();
    colours.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Colour changes along rows (th) and columns (tv), per row/column, counting only
    // runs of at least 3 pixels (noise flickers where a gradient is halfway).
    let changes = |line: &mut dyn Iterator<Item = u8>| -> u32 {
        let mut runs: Vec<(u8, u32)> = Vec::new();
        for l in line.filter(|&l| l != u8::MAX) {
            match runs.last_mut() {
                Some(r) if r.0 == l => r.1 += 1,
                _ => runs.push((l, 1)),
            }
        }
        let long: Vec<u8> = runs.iter().filter(|r| r.1 >= 3).map(|r| r.0).collect();
        long.windows(2).filter(|p| p[0] != p[1]).count() as u32
    };
    let th: u32 = (0..hu).map(|y| changes(&mut (0..wu).map(|x| smooth[y * wu + x]))).sum();
    let tv: u32 = (0..wu).map(|x| changes(&mut (0..hu).map(|y| smooth[y * wu + x]))).sum();
    let (th, tv) = (th as f64 / h as f64, tv as f64 / w as f64);
    let kind = if colours.first().is_none_or(|c| c.1 >= 0.9) {
        colours.truncate(1);
        BgKind::Solid
    } else if th >= 2.5 && tv >= 2.5 {
        BgKind::Checks
    } else if th >= 2.5 || tv >= 2.5 {
        BgKind::Stripes
    } else {
        BgKind::Gradient
    };
    BackgroundFound { kind, colours }
}

// ---------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------

/// How well an image shows one object of a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectCheck {
    /// Index into `Judgement::objects` of the object compared (see [`check_object`]).
    pub found: Option<usize>,
    pub colour_right: bool,
    pub shape_right: bool,
    /// Same 3×3 cell (`None` when the query gives no position).
    pub position_right: Option<bool>,
    /// Same column (left / middle / right).
    pub column_right: Option<bool>,
    /// Same row (top / middle / bottom).
    pub row_right: Option<bool>,
    pub size_right: Option<bool>,
}

impl ObjectCheck {
    /// Colour, shape and (if asked) position right.
    pub fn all_right(&self) -> bool {
        self.colour_right && self.shape_right && self.position_right.unwrap_or(true)
    }
}

/// Compare the judged image with a prompt's object. The object compared is the
/// found object that gets the most right, in this order of importance: colour, shape,
/// position; ties go to the larger object. With no objects found, all is wrong.
pub fn check_object(j: &Judgement, q: &ObjectQuery) -> ObjectCheck {
    let best = j
        .objects
        .iter()
        .enumerate()
        .max_by_key(|(_, o)| (o.colour == q.colour, o.shape == q.shape, q.position == Some(o.position), o.area));
    match best {
        None => ObjectCheck {
            found: None,
            colour_right: false,
            shape_right: false,
            position_right: q.position.map(|_| false),
            column_right: q.position.map(|_| false),
            row_right: q.position.map(|_| false),
            size_right: q.size.map(|_| false),
        },
        Some((i, o)) => ObjectCheck {
            found: Some(i),
            colour_right: o.colour == q.colour,
            shape_right: o.shape == q.shape,
            position_right: q.position.map(|p| p == o.position),
            column_right: q.position.map(|p| p.col() == o.position.col()),
            row_right: q.position.map(|p| p.row() == o.position.row()),
            size_right: q.size.map(|s| s == o.size),
        },
    }
}

/// A judgement compared with a generated scene's ground truth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TruthReport {
    /// For each true object: the found object with the highest mask IoU, and that IoU.
    pub matches: Vec<Option<(usize, f64)>>,
    /// For each true object: were shape, colour and position all right?
    pub object_right: Vec<bool>,
    /// Found objects matched to no true object.
    pub extra: usize,
    /// Every object right and nothing extra.
    pub all_right: bool,
}

/// Compare a judgement of `scene.image` (or of a degraded copy) with the scene's truth.
pub fn compare_to_truth(j: &Judgement, scene: &Scene) -> TruthReport {
    let mut used = vec![false; j.objects.len()];
    let mut matches = Vec::new();
    let mut object_right = Vec::new();
    for (k, t) in scene.meta.objects.iter().enumerate() {
        let best = j
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| (i, o.mask.iou(&scene.masks[k])))
            .filter(|&(_, iou)| iou > 0.0)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, _)) = best {
            used[i] = true;
        }
        object_right.push(best.is_some_and(|(i, _)| {
            let o = &j.objects[i];
            o.shape == t.shape && o.colour == t.colour && o.position == t.position
        }));
        matches.push(best);
    }
    let extra = used.iter().filter(|&&u| !u).count();
    let all_right = extra == 0 && object_right.iter().all(|&r| r);
    TruthReport { matches, object_right, extra, all_right }
}

/// Whether pixel `p` of a `w`×`h` label image is off the border and its four neighbours
/// carry the same label `id`.
fn is_interior<T: PartialEq>(labels: &[T], p: u32, w: u32, h: u32, id: T) -> bool {
    let (x, y) = (p % w, p / w);
    x > 0
        && y > 0
        && x + 1 < w
        && y + 1 < h
        && labels[(p - 1) as usize] == id
        && labels[(p + 1) as usize] == id
        && labels[(p - w) as usize] == id
        && labels[(p + w) as usize] == id
}
