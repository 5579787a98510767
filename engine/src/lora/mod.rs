//! LoRA files as people have them (kohya/A1111 and diffusers/PEFT layouts), resolved
//! against a model's parameters by their diffusers names and merged into the weights
//! (`StableDiffusion::set_loras`).
mod header;
mod keys;
mod merge;
mod params;
mod sgm;

pub use header::Header;
pub use keys::{parse_key, Component, ModuleName, ParsedKey, Role};
pub use merge::{AppliedLoras, LoraSet};
pub use params::ParamIndex;

use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

/// Why a LoRA cannot be applied to a model. The service answers INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraError {
    /// A key of a layout or LoRA variant this engine does not know.
    Unsupported { key: String, why: String },
    /// The key's module is not in the model.
    NoTarget { key: String, module: String },
    /// The update's shape differs from the parameter's.
    Shape { key: String, param: String, lora: Vec<i64>, model: Vec<i64> },
    /// The file's tensors do not form a LoRA (a down without its up, ranks that differ).
    Malformed { key: String, why: String },
}

impl std::fmt::Display for LoraError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsupported { key, why } => write!(f, "LoRA key `{key}`: {why} is not supported"),
            Self::NoTarget { key, module } => {
                write!(f, "LoRA key `{key}` modifies `{module}`, which this model does not have")
            }
            Self::Shape { key, param, lora, model } => write!(
                f,
                "LoRA key `{key}` changes `{param}` by a {lora:?} update, but the model's `{param}` is {model:?}"
            ),
            Self::Malformed { key, why } => write!(f, "LoRA key `{key}`: {why}"),
        }
    }
}

impl std::error::Error for LoraError {}

/// The parts of one module's update as a file names them.
#[derive(Default)]
struct Parts {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// The file's keys grouped by module, in a fixed order (so the first mismatch reported
/// is the same on every run).
fn group_keys<'a>(
    keys: impl Iterator<Item = &'a String>,
) -> Result<BTreeMap<(Component, ModuleName), Parts>, LoraError> {
    let mut modules: BTreeMap<(Component, ModuleName), Parts> = BTreeMap::new();
    for key in keys {
        let parsed = parse_key(key)?;
        let parts = modules.entry((parsed.component, parsed.module)).or_default();
        let slot = match parsed.role {
            Role::Down => &mut parts.down,
            Role::Up => &mut parts.up,
            Role::Alpha => &mut parts.alpha,
        };
        *slot = Some(key.clone());
    }
    Ok(modules)
}

/// The shape of the update a [rank, in(, kh, kw)] down and [out, rank(, 1, 1)] up make.
fn update_shape(key: &str, down: &[i64], up: &[i64]) -> Result<Vec<i64>, LoraError> {
    let malformed = |why: String| LoraError::Malformed { key: key.to_string(), why };
    let shape = match (down, up) {
        ([r, i], [o, r2]) if r == r2 => vec![*o, *i],
        ([r, i, kh, kw], [o, r2, 1, 1]) if r == r2 => vec![*o, *i, *kh, *kw],
        _ => return Err(malformed(format!("down {down:?} and up {up:?} do not form a low-rank update"))),
    };
    Ok(shape)
}

/// PEFT's adapter settings that diffusers stores in the file's `lora_adapter_metadata`,
/// per component: the alpha (global and per module) and whether rank-stabilised scaling
/// (alpha/√rank) is used.
#[derive(Default)]
struct AdapterMeta {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

fn adapter_meta(metadata: &HashMap<String, String>, component: Component) -> AdapterMeta {
    let Some(json) =
        metadata.get("lora_adapter_metadata").and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
    else {
        return AdapterMeta::default();
    };
    let field = |name: &str| json.get(format!("{}.{name}", component.as_str()));
    AdapterMeta {
        lora_alpha: field("lora_alpha").and_then(serde_json::Value::as_f64),
        alpha_pattern: field("alpha_pattern")
            .and_then(serde_json::Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
            .unwrap_or_default(),
        rslora: field("use_rslora").and_then(serde_json::Value::as_bool).unwrap_or(false),
    }
}

/// One module's low-rank update: `scale · up · down`.
pub struct LoraModule {
    pub component: Component,
    pub module: ModuleName,
    /// The down tensor's key, to name in errors.
    pub key: String,
    pub down: Tensor,
    pub up: Tensor,
    /// alpha / rank (1 without an alpha).
    pub scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    pub fn update_shape(&self) -> Result<Vec<i64>, LoraError> {
        update_shape(&self.key, &self.down.size(), &self.up.size())
    }
}

/// A LoRA file, parsed (tensors on the CPU as stored).
pub struct Lora {
    /// Unique per loaded file in this process (how a model tells LoRA sets apart).
    pub id: u64,
    pub name: String,
    pub path: PathBuf,
    pub modules: Vec<LoraModule>,
}

impl Lora {
    /// Reads `path`; the name is its file stem. Errors name the file and, for keys that
    /// form no LoRA, the key (`LoraError` in the chain).
    pub fn load(path: &Path) -> Result<Self> {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let header = Header::read(path)?;
        let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .with_context(|| format!("reading LoRA {}", path.display()))?
            .into_iter()
            .collect();
        let modules = Self::modules(&header, tensors).with_context(|| format!("LoRA {}", path.display()))?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), name, path: path.to_path_buf(), modules })
    }

    fn modules(header: &Header, mut tensors: HashMap<String, Tensor>) -> Result<Vec<LoraModule>, LoraError> {
        let keys: Vec<String> = tensors.keys().cloned().collect();
        let mut out = Vec::new();
        for ((component, module), parts) in group_keys(keys.iter())? {
            let (down_key, up_key) = match (parts.down, parts.up) {
                (Some(d), Some(u)) => (d, u),
                (d, u) => {
                    let key = d.or(u).or(parts.alpha).unwrap_or_default();
                    return Err(LoraError::Malformed { key, why: "the down or up factor is missing".into() });
                }
            };
            let down = tensors.remove(&down_key).expect("grouped from the map's keys");
            let up = tensors.remove(&up_key).expect("grouped from the map's keys");
            update_shape(&down_key, &down.size(), &up.size())?;
            let rank = down.size()[0] as f64;
            let meta = adapter_meta(&header.metadata, component);
            let alpha = match &parts.alpha {
                Some(k) => Some(tensors[k].to_kind(tch::Kind::Double).double_value(&[])),
                None => meta
                    .alpha_pattern
                    .iter()
                    .find(|(m, _)| module.as_str() == m || module.as_str().ends_with(&format!(".{m}")))
                    .map(|(_, a)| *a)
                    .or(meta.lora_alpha),
            };
            let scale = match alpha {
                Some(a) if meta.rslora => a / rank.sqrt(),
                Some(a) => a / rank,
                None => 1.0,
            };
            out.push(LoraModule { component, module, key: down_key, down, up, scale });
        }
        Ok(out)
    }

    /// The parameter each module changes, checked against `index`: a module the model
    /// lacks or an update of another shape is an error naming the first such key.
    pub fn targets(&self, index: &ParamIndex) -> Result<Vec<String>, LoraError> {
        self.modules.iter().map(|m| index.target(m.component, &m.module, &m.key, &m.update_shape()?)).collect()
    }

    /// Whether a file's header (no tensors read) fits the model `index` describes, with
    /// the same checks as `targets`.
    pub fn check_header(header: &Header, index: &ParamIndex) -> Result<(), LoraError> {
        for ((component, module), parts) in group_keys(header.shapes.keys())? {
            let (Some(down), Some(up)) = (&parts.down, &parts.up) else {
                let key = parts.down.or(parts.up).or(parts.alpha).unwrap_or_default();
                return Err(LoraError::Malformed { key, why: "the down or up factor is missing".into() });
            };
            let shape = update_shape(down, &header.shapes[down], &header.shapes[up])?;
            index.target(component, &module, down, &shape)?;
        }
        Ok(())
    }

    /// The components the file changes.
    pub fn components(&self) -> Vec<Component> {
        let mut c: Vec<Component> = self.modules.iter().map(|m| m.component).collect();
        c.sort();
        c.dedup();
        c
    }
}
