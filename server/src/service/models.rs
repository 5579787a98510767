//! The models directory: diffusers folders and single-file checkpoints (`.safetensors`, and
//! `.ckpt`/`.pt`/`.pth` read without unpickling) side by side, the folder or file stem
//! naming the model. Names are checked before they touch
//! the file system, and a name must resolve (after symlinks) to a path inside the models
//! root. Metadata comes from config files or a checkpoint's header (no weights loaded), so
//! ListModels and request validation never wait for the engine.
use super::loras::LoraCatalog;
use anyhow::{bail, Context, Result};
use frisket_engine::checkpoint::{self, LoadOptions};
use frisket_engine::model::{is_sdxl_folder, Family};
use frisket_engine::schedulers::{PredictionType, SchedulerConfig};
use frisket_engine::text::quote;
use frisket_engine::tokenizer::ClipTokenizer;
use frisket_engine::vae::VaeConfig;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::Status;

/// How a model is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// A diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    Diffusers,
    /// One checkpoint file in the original SD layout (`checkpoint::FILE_EXTENSIONS`).
    SingleFile,
}

impl ModelFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Diffusers => "diffusers",
            Self::SingleFile => "single-file",
        }
    }
}

/// What a client needs to know about a model, read from its config files or header.
#[derive(Clone, Debug)]
pub struct ModelMeta {
    pub name: String,
    /// The model folder or checkpoint file.
    pub dir: PathBuf,
    pub format: ModelFormat,
    pub family: Family,
    pub native_width: u32,
    pub native_height: u32,
    /// The VAE's scale factor: width and height must be multiples of it.
    pub size_multiple: u32,
    pub prediction_type: String,
}

impl ModelMeta {
    /// The model's scheduler config: its scheduler/ folder, or its family's defaults.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        match self.format {
            ModelFormat::Diffusers => SchedulerConfig::load(&self.dir.join("scheduler/scheduler_config.json")),
            ModelFormat::SingleFile => self.family.scheduler_config(PredictionType::parse(&self.prediction_type)?),
        }
    }
}

/// One entry of the models folder: its metadata, or why it cannot be used.
#[derive(Clone, Debug)]
pub struct Listed {
    pub name: String,
    pub format: ModelFormat,
    pub meta: Result<ModelMeta, String>,
}

pub struct Catalog {
    root: PathBuf,
    /// `root`, canonicalized: every model path must resolve inside it.
    canonical_root: PathBuf,
    tokenizers: Mutex<HashMap<String, Arc<ClipTokenizer>>>,
    loras: LoraCatalog,
    /// Prediction types of single files that cannot tell (`--prediction MODEL=TYPE`).
    predictions: HashMap<String, PredictionType>,
}

/// A model name is one path component of letters, digits, `.`, `_` and `-`, not starting
/// with a dot (so never `.` or `..`), at most 128 bytes.
pub fn check_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("model is required: pass a model name from ListModels"));
    }
    if !valid_name(name) {
        return Err(Status::invalid_argument(format!(
            "invalid model name {}: use a name from ListModels (letters, digits, '.', '_' and '-', not starting with '.')",
            quote(name)
        )));
    }
    Ok(())
}

/// Whether `name` is a valid model or LoRA name (see `check_name`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Catalog {
    pub fn new(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            bail!("models directory {} does not exist", root.display());
        }
        let canonical_root = root.canonicalize().with_context(|| format!("resolving {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            canonical_root,
            tokenizers: Mutex::new(HashMap::new()),
            loras: LoraCatalog::default(),
            predictions: HashMap::new(),
        })
    }

    /// Sets the prediction type of single-file models (a folder's comes from its
    /// scheduler_config.json, which is where to change it).
    pub fn with_predictions(mut self, overrides: &[(String, PredictionType)]) -> Result<Self> {
        for (name, prediction) in overrides {
            match self.locate(name) {
                Some((_, ModelFormat::SingleFile)) => {}
                Some((path, ModelFormat::Diffusers)) => bail!(
                    "--prediction {name}=…: {} is a diffusers folder; set prediction_type in its \
                     scheduler/scheduler_config.json",
                    path.display()
                ),
                None => bail!("--prediction {name}=…: no single-file model {name:?} in {}", self.root.display()),
            }
            self.predictions.insert(name.clone(), *prediction);
        }
        Ok(self)
    }

    /// How the engine loads the model `name`.
    pub fn load_options(&self, name: &str) -> LoadOptions<'static> {
        LoadOptions { prediction: self.predictions.get(name).copied(), vae: None }
    }

    /// Offers the LoRAs of `dir` (`--loras`).
    pub fn with_loras(mut self, dir: Option<&Path>) -> Result<Self> {
        self.loras = LoraCatalog::new(dir)?;
        Ok(self)
    }

    pub fn loras(&self) -> &LoraCatalog {
        &self.loras
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The model `name` as stored under the root (folder first, then `name.safetensors`,
    /// `name.ckpt`, … in `checkpoint::FILE_EXTENSIONS` order), if it exists and resolves
    /// inside the root.
    fn locate(&self, name: &str) -> Option<(PathBuf, ModelFormat)> {
        let dir = self.root.join(name);
        let file = || {
            checkpoint::FILE_EXTENSIONS.iter().map(|ext| self.root.join(format!("{name}.{ext}"))).find(|f| f.is_file())
        };
        let found = if is_model_dir(&dir) {
            (dir, ModelFormat::Diffusers)
        } else if let Some(file) = file() {
            (file, ModelFormat::SingleFile)
        } else {
            return None;
        };
        let inside = found.0.canonicalize().is_ok_and(|real| real.starts_with(&self.canonical_root));
        if !inside {
            tracing::warn!(model = %name, "ignoring {}: it resolves outside the models folder", found.0.display());
            return None;
        }
        Some(found)
    }

    /// Valid model names under the root (diffusers folders with unet/config.json and
    /// checkpoint files, by stem), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .map(|n| {
                        let stem =
                            checkpoint::FILE_EXTENSIONS.iter().find_map(|ext| n.strip_suffix(&format!(".{ext}")));
                        stem.map(str::to_string).unwrap_or(n)
                    })
                    .filter(|n| check_name(n).is_ok() && self.locate(n).is_some())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    }

    /// The folder or file of a model, or INVALID_ARGUMENT (bad name) / NOT_FOUND (no such model).
    pub fn resolve(&self, name: &str) -> Result<PathBuf, Status> {
        check_name(name)?;
        match self.locate(name) {
            Some((path, _)) => Ok(path),
            None => {
                let names = self.names();
                Err(Status::not_found(format!(
                    "model {name:?} not found; available: {}",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )))
            }
        }
    }

    /// Metadata of one model (reads its small config files or its checkpoint header).
    pub fn meta(&self, name: &str) -> Result<ModelMeta, Status> {
        let path = self.resolve(name)?;
        let format = if path.is_dir() { ModelFormat::Diffusers } else { ModelFormat::SingleFile };
        read_meta(name, &path, format, self.predictions.get(name).copied())
            .map_err(|e| Status::failed_precondition(format!("model {name:?} is unusable: {e:#}")))
    }

    /// Every model under the root; those that cannot be used carry their error.
    pub fn list(&self) -> Vec<Listed> {
        self.names()
            .into_iter()
            .filter_map(|name| {
                let (path, format) = self.locate(&name)?;
                let meta =
                    read_meta(&name, &path, format, self.predictions.get(&name).copied()).map_err(|e| format!("{e:#}"));
                if let Err(e) = &meta {
                    tracing::warn!(model = %name, "unusable model: {e}");
                }
                Some(Listed { name, format, meta })
            })
            .collect()
    }

    /// The model's tokenizer, loaded once (blocking: call from a blocking context). Single
    /// files use the standard CLIP tokenizer with their family's pad token.
    pub fn tokenizer(&self, name: &str) -> Result<Arc<ClipTokenizer>, Status> {
        let path = self.resolve(name)?;
        if let Some(t) = self.tokenizers.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(t.clone());
        }
        let tok = if path.is_dir() {
            ClipTokenizer::from_dir(&path.join("tokenizer")).context("loading tokenizer/")
        } else {
            checkpoint::inspect(&path, None).and_then(|info| ClipTokenizer::standard(info.family.pad_tokens()[0]))
        };
        let tok = tok.map_err(|e| Status::failed_precondition(format!("model {name:?}: tokenizer: {e:#}")))?;
        let tok = Arc::new(tok);
        self.tokenizers.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), tok.clone());
        Ok(tok)
    }
}

fn is_model_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join("unet/config.json").is_file()
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn read_meta(name: &str, path: &Path, format: ModelFormat, prediction: Option<PredictionType>) -> Result<ModelMeta> {
    match format {
        ModelFormat::Diffusers => read_folder_meta(name, path),
        ModelFormat::SingleFile => {
            let info = checkpoint::inspect(path, prediction)?;
            if !info.has_vae {
                bail!("{} has no VAE (no first_stage_model.* tensors)", path.display());
            }
            Ok(ModelMeta {
                name: name.to_string(),
                dir: path.to_path_buf(),
                format,
                family: info.family,
                native_width: info.native_size as u32,
                native_height: info.native_size as u32,
                size_multiple: info.vae_scale_factor as u32,
                prediction_type: info.prediction.name().to_string(),
            })
        }
    }
}

fn read_folder_meta(name: &str, dir: &Path) -> Result<ModelMeta> {
    let unet = read_json(&dir.join("unet/config.json"))?;
    let vae = VaeConfig::from_dir(&dir.join("vae"))?;
    let factor = vae.scale_factor() as u32;
    let prediction_type = match read_json(&dir.join("scheduler/scheduler_config.json")) {
        Ok(cfg) => cfg.get("prediction_type").and_then(Value::as_str).unwrap_or("epsilon").to_string(),
        Err(_) => "epsilon".to_string(),
    };
    let family = if is_sdxl_folder(dir) {
        Family::Sdxl
    } else {
        let width = read_json(&dir.join("text_encoder/config.json"))
            .ok()
            .and_then(|cfg| cfg.get("hidden_size").and_then(Value::as_i64));
        Family::single_encoder(width.unwrap_or(0), Some(&prediction_type))
    };
    // sample_size is one int, or [height, width].
    let (sample_h, sample_w) = match unet.get("sample_size") {
        Some(Value::Number(n)) => {
            let n = n.as_u64().unwrap_or(64) as u32;
            (n, n)
        }
        Some(Value::Array(a)) if a.len() == 2 => {
            let get = |i: usize| a[i].as_u64().unwrap_or(64) as u32;
            (get(0), get(1))
        }
        _ => (64, 64),
    };
    Ok(ModelMeta {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        format: ModelFormat::Diffusers,
        family,
        native_width: sample_w * factor,
        native_height: sample_h * factor,
        size_multiple: factor,
        prediction_type,
    })
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn names_cannot_escape() {
        for good in ["sd1", "sd-2.1_base", "A.b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "../sd1", "a/b", "a\\b", ".hidden", "sd 1", "/abs", "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    /// The user-facing lists of scheduler names (docs, CLI help, the proto) name every
    /// scheduler the engine has.
    #[test]
    fn every_scheduler_is_documented() {
        let docs = [
            ("README.md", include_str!("../../../README.md")),
            ("client/README.md", include_str!("../../../client/README.md")),
            ("proto/frisket/v1/frisket.proto", include_str!("../../../proto/frisket/v1/frisket.proto")),
            ("client/src/main.rs", include_str!("../../../client/src/main.rs")),
            ("server/src/cli.rs", include_str!("../cli.rs")),
        ];
        for (path, text) in docs {
            for name in frisket_engine::schedulers::NAMES {
                let quoted = [format!("`{name}`"), format!("{name},"), format!("{name} "), format!("{name};")];
                assert!(quoted.iter().any(|q| text.contains(q.as_str())), "{path} does not name the scheduler {name}");
            }
        }
    }
}
