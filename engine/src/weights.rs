//! Loading a component's safetensors and handing out tensors by diffusers' names, with
//! errors that name the tensor when it is missing or its shape disagrees with the config.
use super::checkpoint::safetensors::MappedFile;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Why a component's weights do not fit the model its config describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightError {
    /// The config implies a tensor the files lack.
    Missing { name: String, source: String },
    /// The tensor exists with another shape than the config implies.
    Shape { name: String, source: String, actual: Vec<i64>, expected: Vec<i64> },
}

impl std::fmt::Display for WeightError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { name, source } => write!(f, "missing tensor `{name}` in {source}"),
            Self::Shape { name, source, actual, expected } => {
                write!(f, "tensor `{name}` in {source} has shape {actual:?}, the config implies {expected:?}")
            }
        }
    }
}

impl std::error::Error for WeightError {}

/// All tensors of one model component (unet, vae, text_encoder), on the target device.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    files: Vec<PathBuf>,
    device: Device,
    kind: Kind,
}

/// Which file of a component folder to read. diffusers saves `<stem>.safetensors`, an
/// fp16 variant `<stem>.fp16.safetensors`, or shards listed in `<stem>.safetensors.index.json`.
pub fn find_weight_files(dir: &Path, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    let stems = ["diffusion_pytorch_model", "model"];
    let variants: &[&str] = if prefer_fp16 { &[".fp16", ""] } else { &["", ".fp16"] };
    for variant in variants {
        for stem in stems {
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}.safetensors{variant}.index.json"));
            let index_alt = dir.join(format!("{stem}{variant}.safetensors.index.json"));
            for index in [index, index_alt] {
                if index.is_file() {
                    return shard_files(&index);
                }
            }
        }
    }
    bail!("no *.safetensors weights in {}", dir.display())
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = json["weight_map"].as_object().ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

impl Weights {
    /// Loads every tensor of `files` (memory-mapped, one tensor at a time), converted to
    /// `kind` (floating tensors only) on `device`, in the layout the modules use
    /// (`nn::conv_layout`), so that the map's tensors are the very tensors the modules built
    /// from it hold (LoRAs merge into them).
    pub fn load(files: &[PathBuf], device: Device, kind: Kind) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in files {
            let mapped = MappedFile::open(file)?;
            for name in mapped.header.tensors.keys() {
                tensors.insert(name.clone(), crate::nn::conv_layout(mapped.tensor(name, device, kind)?));
            }
        }
        Ok(Self { tensors, files: files.to_vec(), device, kind })
    }

    /// Loads the weights of a component folder such as `model/unet`.
    pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let files = find_weight_files(dir, kind == Kind::Half)?;
        Self::load(&files, device, kind)
    }

    /// Tensors already read (a converted checkpoint), put in the modules' layout as `load` does.
    pub fn from_map(tensors: HashMap<String, Tensor>, device: Device, kind: Kind) -> Self {
        let tensors = tensors.into_iter().map(|(name, t)| (name, crate::nn::conv_layout(t))).collect();
        Self { tensors, files: Vec::new(), device, kind }
    }

    pub fn root(&self) -> WeightPath<'_> {
        WeightPath { weights: self, prefix: String::new() }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` itself (sharing storage with the modules built from it).
    pub fn tensor(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).map(Tensor::shallow_clone)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// Bytes of all its tensors' elements.
    pub fn bytes(&self) -> u64 {
        self.tensors.values().map(tensor_bytes).sum()
    }

    fn source(&self) -> String {
        match self.files.as_slice() {
            [] => "weights".into(),
            [one] => one.display().to_string(),
            many => format!("{} (+{} shards)", many[0].display(), many.len() - 1),
        }
    }
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// A position in the weight tree, like `down_blocks.0.resnets.1`.
#[derive(Clone)]
pub struct WeightPath<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> WeightPath<'a> {
    /// The child path `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> WeightPath<'a> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        WeightPath { weights: self.weights, prefix }
    }

    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    pub fn contains(&self, leaf: &str) -> bool {
        self.weights.contains(&self.name(leaf))
    }

    /// The tensor `prefix.leaf`, which must have exactly `shape`.
    pub fn get(&self, leaf: &str, shape: &[i64]) -> Result<Tensor> {
        let name = self.name(leaf);
        let source = || self.weights.source();
        let t = self
            .weights
            .tensors
            .get(&name)
            .ok_or_else(|| WeightError::Missing { name: name.clone(), source: source() })?;
        if t.size() != shape {
            return Err(
                WeightError::Shape { name, source: source(), actual: t.size(), expected: shape.to_vec() }.into()
            );
        }
        Ok(t.shallow_clone())
    }

    /// Like `get`, but a missing tensor is `None` (optional biases, alternative key names).
    pub fn get_opt(&self, leaf: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        if self.contains(leaf) {
            self.get(leaf, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn device(&self) -> Device {
        self.weights.device
    }

    pub fn kind(&self) -> Kind {
        self.weights.kind
    }

    /// Bytes of the tensors under this path (all of them at the root).
    pub fn bytes(&self) -> u64 {
        let prefix = format!("{}.", self.prefix);
        self.weights
            .tensors
            .iter()
            .filter(|(name, _)| self.prefix.is_empty() || name.starts_with(&prefix))
            .map(|(_, t)| tensor_bytes(t))
            .sum()
    }
}
