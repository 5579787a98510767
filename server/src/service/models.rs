//! The models directory: one diffusers folder per model name. Names are checked before
//! they touch the file system; metadata comes from the config files (no weights loaded),
//! so ListModels and request validation never wait for the engine.
use super::loras::LoraCatalog;
use anyhow::{bail, Context, Result};
use frisket_engine::tokenizer::ClipTokenizer;
use frisket_engine::vae::VaeConfig;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::Status;

/// Scheduler names every model accepts (GenerateRequest.scheduler).
pub const SCHEDULERS: [&str; 5] = ["ddim", "euler", "euler-a", "dpm++", "dpm++-karras"];

/// What a client needs to know about a model, read from its config files.
#[derive(Clone, Debug)]
pub struct ModelMeta {
    pub name: String,
    pub dir: PathBuf,
    /// "sd1" or "sd2".
    pub architecture: String,
    pub native_width: u32,
    pub native_height: u32,
    /// The VAE's scale factor: width and height must be multiples of it.
    pub size_multiple: u32,
    pub prediction_type: String,
}

pub struct Catalog {
    root: PathBuf,
    tokenizers: Mutex<HashMap<String, Arc<ClipTokenizer>>>,
    loras: LoraCatalog,
}

/// A model name is one path component of letters, digits, `.`, `_` and `-`, not starting
/// with a dot (so never `.` or `..`), at most 128 bytes.
pub fn check_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("model is required: pass a model name from ListModels"));
    }
    if !valid_name(name) {
        return Err(Status::invalid_argument(format!(
            "invalid model name {name:?}: use a name from ListModels (letters, digits, '.', '_' and '-', not starting with '.')"
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
        Ok(Self { root: root.to_path_buf(), tokenizers: Mutex::new(HashMap::new()), loras: LoraCatalog::default() })
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

    /// Valid model names under the root (subfolders with unet/config.json), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| check_name(n).is_ok() && is_model_dir(&self.root.join(n)))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The folder of a model, or INVALID_ARGUMENT (bad name) / NOT_FOUND (no such model).
    pub fn resolve(&self, name: &str) -> Result<PathBuf, Status> {
        check_name(name)?;
        let dir = self.root.join(name);
        if !is_model_dir(&dir) {
            let names = self.names();
            return Err(Status::not_found(format!(
                "model {name:?} not found; available: {}",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        }
        Ok(dir)
    }

    /// Metadata of one model (reads its small config files).
    pub fn meta(&self, name: &str) -> Result<ModelMeta, Status> {
        let dir = self.resolve(name)?;
        read_meta(name, &dir).map_err(|e| Status::failed_precondition(format!("model {name:?} is unusable: {e:#}")))
    }

    /// Every usable model; folders whose configs do not parse are logged and left out.
    pub fn list(&self) -> Vec<ModelMeta> {
        self.names()
            .into_iter()
            .filter_map(|name| match read_meta(&name, &self.root.join(&name)) {
                Ok(meta) => Some(meta),
                Err(e) => {
                    tracing::warn!(model = %name, "skipping model folder: {e:#}");
                    None
                }
            })
            .collect()
    }

    /// The model's tokenizer, loaded once (blocking: call from a blocking context).
    pub fn tokenizer(&self, name: &str) -> Result<Arc<ClipTokenizer>, Status> {
        let dir = self.resolve(name)?;
        if let Some(t) = self.tokenizers.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(t.clone());
        }
        let tok = ClipTokenizer::from_dir(&dir.join("tokenizer"))
            .map_err(|e| Status::failed_precondition(format!("model {name:?}: loading tokenizer/ failed: {e:#}")))?;
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

fn read_meta(name: &str, dir: &Path) -> Result<ModelMeta> {
    let unet = read_json(&dir.join("unet/config.json"))?;
    let vae = VaeConfig::from_dir(&dir.join("vae"))?;
    let factor = vae.scale_factor() as u32;
    let prediction_type = match read_json(&dir.join("scheduler/scheduler_config.json")) {
        Ok(cfg) => cfg.get("prediction_type").and_then(Value::as_str).unwrap_or("epsilon").to_string(),
        Err(_) => "epsilon".to_string(),
    };
    let width = read_json(&dir.join("text_encoder/config.json"))
        .ok()
        .and_then(|cfg| cfg.get("hidden_size").and_then(Value::as_u64));
    let architecture = match width {
        Some(768) => "sd1",
        Some(1024) => "sd2",
        _ if prediction_type == "v_prediction" => "sd2",
        _ => "sd1",
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
        architecture: architecture.to_string(),
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
}
