//! Writes every streamed artifact of a job into a folder, with a `manifest.json`.
//!
//! | event | files |
//! |---|---|
//! | Preview | `preview_<step>.png` / `.jpg` |
//! | Latent | `latent_<step>.npy` (the latent entering step `step`) |
//! | Mask (manipulation) | `mask_<step>.png` + `mask_<step>.npy` |
//! | Mask (protected) | `protected_mask_<step>.png` + `.npy` |
//! | Heatmap | `heatmap_<step>_tok<index>.png` + `.npy`, and its subject mask `…_mask.png` |
//! | Result | `result.png` (+ `change_map.png` + `change_map.npy` for img2img) |
//!
//! `manifest.json` is a JSON array, one object per artifact in stream order, with
//! `kind`, `step`, `timestep`, `token_index` / `token` (heatmaps, subject masks), `reference_fraction`
//! (masks), `shape` and `path` (relative to the folder), plus `npy` for masks, heatmaps
//! and the change map.
use crate::events::{extension_for_mime, Event, MaskKind};
use crate::tensor::Tensor;
use crate::Error;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One manifest entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestEntry {
    /// `preview`, `latent`, `mask`, `protected_mask`, `heatmap`, `subject_mask`, `result` or
    /// `change_map`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Masks: the share of latent elements taken from the reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_fraction: Option<f64>,
    /// Tensor shape for `.npy` data; `[height, width, channels]` for images.
    pub shape: Vec<u64>,
    /// Relative to the dump folder: the image, or the `.npy` for latents.
    pub path: String,
    /// The raw tensor of a mask, heatmap or change map, relative to the dump folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub npy: Option<String>,
}

/// Files written for one event (full paths: the dump folder joined with the name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Written {
    /// The image (preview, mask, heatmap, result) or the `.npy` of a latent.
    pub path: Option<PathBuf>,
    /// The `.npy` of a mask or heatmap.
    pub npy: Option<PathBuf>,
    /// The change map of an img2img result (PNG) and its values as `.npy`.
    pub change_map: Option<PathBuf>,
    pub change_map_npy: Option<PathBuf>,
    /// A heatmap's subject mask (PNG).
    pub subject_mask: Option<PathBuf>,
}

/// Writes artifacts as they stream in; call [`Dumper::finish`] to write the manifest.
#[derive(Debug)]
pub struct Dumper {
    dir: PathBuf,
    entries: Vec<ManifestEntry>,
}

impl Dumper {
    /// Creates the folder (and its parents) if needed.
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Dumper { dir, entries: Vec::new() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    /// Writes the artifacts an event carries (none for queued/loading/started/step).
    pub fn record(&mut self, event: &Event) -> Result<Written, Error> {
        let mut written = Written::default();
        match event {
            Event::Queued(_) | Event::Loading(_) | Event::Started(_) | Event::Step(_) => {}
            Event::Preview(p) => {
                let name = format!("preview_{}.{}", p.step, extension_for_mime(&p.mime_type));
                written.path = Some(self.write(&name, &p.image)?);
                let shape = image_shape(&p.image).unwrap_or_else(|| vec![p.height as u64, p.width as u64, 3]);
                self.push("preview", Some(p.step), Some(p.timestep), shape, name, None);
            }
            Event::Latent(l) => {
                let name = format!("latent_{}.npy", l.step);
                written.path = Some(self.write(&name, &l.latent.to_npy())?);
                self.push("latent", Some(l.step), Some(l.timestep), tensor_shape(&l.latent), name, None);
            }
            Event::Mask(m) => {
                let (kind, stem) = match m.kind {
                    MaskKind::Manipulation => ("mask", format!("mask_{}", m.step)),
                    MaskKind::Protected => ("protected_mask", format!("protected_mask_{}", m.step)),
                };
                let (png, npy) = (format!("{stem}.png"), format!("{stem}.npy"));
                if !m.png.is_empty() {
                    written.path = Some(self.write(&png, &m.png)?);
                }
                written.npy = Some(self.write(&npy, &m.mask.to_npy())?);
                let path = if m.png.is_empty() { npy.clone() } else { png };
                self.push(kind, Some(m.step), Some(m.timestep), tensor_shape(&m.mask), path, Some(npy));
                if let Some(e) = self.entries.last_mut() {
                    e.reference_fraction = Some(m.reference_fraction);
                }
            }
            Event::Heatmap(h) => {
                let stem = format!("heatmap_{}_tok{}", h.step, h.token_index);
                let (png, npy) = (format!("{stem}.png"), format!("{stem}.npy"));
                if !h.png.is_empty() {
                    written.path = Some(self.write(&png, &h.png)?);
                }
                written.npy = Some(self.write(&npy, &h.map.to_npy())?);
                let path = if h.png.is_empty() { npy.clone() } else { png };
                let entry = ManifestEntry {
                    kind: "heatmap",
                    step: Some(h.step),
                    timestep: Some(h.timestep),
                    token_index: Some(h.token_index),
                    token: Some(h.token.clone()),
                    reference_fraction: None,
                    shape: tensor_shape(&h.map),
                    path,
                    npy: Some(npy),
                };
                if !h.subject_mask_png.is_empty() {
                    let name = format!("{stem}_mask.png");
                    written.subject_mask = Some(self.write(&name, &h.subject_mask_png)?);
                    let shape = image_shape(&h.subject_mask_png).unwrap_or_default();
                    let mask_entry =
                        ManifestEntry { kind: "subject_mask", shape, path: name, npy: None, ..entry.clone() };
                    self.entries.extend([entry, mask_entry]);
                } else {
                    self.entries.push(entry);
                }
            }
            Event::Result(r) => {
                let name = format!("result.{}", extension_for_mime(&r.mime_type));
                written.path = Some(self.write(&name, &r.image)?);
                let shape =
                    image_shape(&r.image).unwrap_or_else(|| vec![r.settings.height as u64, r.settings.width as u64, 3]);
                self.push("result", None, None, shape, name, None);
                if let Some(change_map) = &r.change_map {
                    let name = "change_map.png".to_string();
                    written.change_map = Some(self.write(&name, change_map)?);
                    let shape = image_shape(change_map).unwrap_or_default();
                    // The grey levels as [H, W] float32 in [0, 1].
                    let npy = match image::load_from_memory(change_map) {
                        Ok(img) => {
                            let grey = img.to_luma8();
                            let (w, h) = grey.dimensions();
                            let values: Vec<f32> = grey.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
                            let npy = "change_map.npy".to_string();
                            let bytes = crate::tensor::npy::encode_f32(&[h as usize, w as usize], &values);
                            written.change_map_npy = Some(self.write(&npy, &bytes)?);
                            Some(npy)
                        }
                        Err(_) => None,
                    };
                    self.push("change_map", None, None, shape, name, npy);
                }
            }
        }
        Ok(written)
    }

    /// Writes `manifest.json` (the entries so far) and returns its path.
    pub fn finish(&self) -> Result<PathBuf, Error> {
        let path = self.dir.join("manifest.json");
        // One entry per line: readable and diff-friendly without splitting shapes.
        let lines: Vec<String> =
            self.entries.iter().map(|e| serde_json::to_string(e).expect("manifest serialises")).collect();
        let json = if lines.is_empty() { "[]\n".to_string() } else { format!("[\n  {}\n]\n", lines.join(",\n  ")) };
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, Error> {
        let path = self.dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    fn push(
        &mut self,
        kind: &'static str,
        step: Option<u32>,
        timestep: Option<f64>,
        shape: Vec<u64>,
        path: String,
        npy: Option<String>,
    ) {
        self.entries.push(ManifestEntry {
            kind,
            step,
            timestep,
            token_index: None,
            token: None,
            reference_fraction: None,
            shape,
            path,
            npy,
        });
    }
}

fn tensor_shape(t: &Tensor) -> Vec<u64> {
    t.shape.iter().map(|&d| d as u64).collect()
}

/// `[height, width, channels]` read from an encoded image's header.
pub fn image_shape(bytes: &[u8]) -> Option<Vec<u64>> {
    use image::ImageDecoder;
    let decoder =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?.into_decoder().ok()?;
    let (w, h) = decoder.dimensions();
    Some(vec![h as u64, w as u64, decoder.color_type().channel_count() as u64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Heatmap, Latent, Mask, Preview};
    use crate::tensor::DType;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::GrayImage::new(w, h).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    fn tensor(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor { shape: shape.to_vec(), dtype: DType::F32, data: vec![0; 4 * n] }
    }

    #[test]
    fn writes_every_kind_and_the_manifest() {
        let dir = std::env::temp_dir().join(format!("frisket-dump-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut d = Dumper::create(&dir).unwrap();
        let preview = Event::Preview(Preview {
            step: 1,
            timestep: 500.0,
            image: png(4, 3),
            mime_type: "image/png".into(),
            width: 4,
            height: 3,
        });
        let w = d.record(&preview).unwrap();
        assert_eq!(w.path, Some(dir.join("preview_1.png")));
        d.record(&Event::Latent(Latent { step: 0, timestep: 999.0, latent: tensor(&[1, 4, 3, 4]) })).unwrap();
        for kind in [MaskKind::Manipulation, MaskKind::Protected] {
            let mask = Mask {
                step: 2,
                timestep: 320.0,
                kind,
                mask: tensor(&[1, 1, 3, 4]),
                png: png(4, 3),
                reference_fraction: 0.5,
            };
            d.record(&Event::Mask(mask)).unwrap();
        }
        let heatmap = Heatmap {
            step: 2,
            timestep: 320.0,
            token_index: 3,
            token: "star</w>".into(),
            map: tensor(&[4, 3, 4]),
            png: png(4, 3),
            subject_mask_png: png(4, 3),
        };
        let w = d.record(&Event::Heatmap(heatmap)).unwrap();
        assert_eq!(w.npy, Some(dir.join("heatmap_2_tok3.npy")));
        assert_eq!(w.subject_mask, Some(dir.join("heatmap_2_tok3_mask.png")));
        let manifest = d.finish().unwrap();
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
        let kinds: Vec<&str> = m.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["preview", "latent", "mask", "protected_mask", "heatmap", "subject_mask"]);
        assert_eq!(m[0]["shape"], serde_json::json!([3, 4, 1]));
        assert_eq!(m[1]["path"], "latent_0.npy");
        assert_eq!(m[1]["shape"], serde_json::json!([1, 4, 3, 4]));
        assert_eq!(m[2]["path"], "mask_2.png");
        assert_eq!(m[2]["npy"], "mask_2.npy");
        assert_eq!(m[3]["path"], "protected_mask_2.png");
        assert_eq!(m[4]["path"], "heatmap_2_tok3.png");
        assert_eq!(m[4]["token_index"], 3);
        assert_eq!(m[4]["token"], "star</w>");
        assert_eq!(m[5]["path"], "heatmap_2_tok3_mask.png");
        assert_eq!(m[5]["token_index"], 3);
        assert_eq!(m[5]["shape"], serde_json::json!([3, 4, 1]));
        assert!(m[5].get("npy").is_none());
        assert!(m[0].get("token").is_none());
        for f in [
            "preview_1.png",
            "latent_0.npy",
            "mask_2.png",
            "mask_2.npy",
            "protected_mask_2.npy",
            "heatmap_2_tok3.png",
            "heatmap_2_tok3.npy",
            "heatmap_2_tok3_mask.png",
        ] {
            assert!(dir.join(f).exists(), "{f}");
        }
        assert_eq!(std::fs::read(dir.join("latent_0.npy")).unwrap().len(), 128 + 4 * 48);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
