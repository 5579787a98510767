//! The LoRA folder: `*.safetensors` files named by their stem (names as for models, so they
//! never leave the folder). Which LoRAs fit a model is read from the files' headers and the
//! model's weight headers (keys and shapes, no tensors).
use super::models::valid_name;
use frisket_engine::lora::{Header, Lora, LoraError, ParamIndex};
use frisket_engine::text::quote;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tonic::Status;

/// The largest |weight| a request may give a LoRA.
pub const MAX_WEIGHT: f32 = 4.0;

#[derive(Default)]
pub struct LoraCatalog {
    root: Option<PathBuf>,
}

impl LoraCatalog {
    /// `root`: the folder (must exist), or none (no LoRAs offered).
    pub fn new(root: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(root) = root {
            anyhow::ensure!(root.is_dir(), "LoRA directory {} does not exist", root.display());
        }
        Ok(Self { root: root.map(Path::to_path_buf) })
    }

    /// Valid LoRA names in the folder, sorted.
    pub fn names(&self) -> Vec<String> {
        let Some(root) = &self.root else { return Vec::new() };
        let mut names: Vec<String> = std::fs::read_dir(root)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".safetensors").map(str::to_owned))
                    .filter(|n| valid_name(n))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The file of a LoRA, or INVALID_ARGUMENT naming the available ones.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, Status> {
        let path = self.root.as_ref().filter(|_| valid_name(name)).map(|r| r.join(format!("{name}.safetensors")));
        match path {
            Some(p) if p.is_file() => Ok(p),
            _ => {
                let names = self.names();
                let available = if self.root.is_none() {
                    "none (the server has no --loras folder)".to_string()
                } else if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                };
                Err(Status::invalid_argument(format!("LoRA {} not found; available: {available}", quote(name))))
            }
        }
    }

    /// For each model (a folder or a file), the LoRAs whose keys and shapes fit it. Each
    /// LoRA's header is read once, whatever the number of models.
    pub fn fitting(&self, models: &[&Path]) -> Vec<Vec<String>> {
        let headers: Vec<(String, Header)> = self
            .names()
            .into_iter()
            .filter_map(|name| {
                let path = self.resolve(&name).ok()?;
                match Header::read(&path) {
                    Ok(header) => Some((name, header)),
                    Err(e) => {
                        tracing::warn!(lora = %name, "unreadable LoRA: {e:#}");
                        None
                    }
                }
            })
            .collect();
        models
            .iter()
            .map(|model| {
                if headers.is_empty() {
                    return Vec::new();
                }
                match ParamIndex::from_model_path(model) {
                    Ok(index) => headers
                        .iter()
                        .filter(|(_, header)| Lora::check_header(header, &index).is_ok())
                        .map(|(name, _)| name.clone())
                        .collect(),
                    Err(e) => {
                        tracing::warn!(model = %model.display(), "reading the model's weight headers: {e:#}");
                        Vec::new()
                    }
                }
            })
            .collect()
    }
}

/// Checks a request's LoRAs: at most `limits.max_loras`, known names, finite weights within
/// ±MAX_WEIGHT. The name, file and weight (absent → 1) of each.
pub fn check(
    specs: &[frisket_proto::v1::LoraSpec],
    catalog: &LoraCatalog,
    limits: &frisket_proto::limits::Limits,
) -> Result<Vec<JobLora>, Status> {
    limits.check_loras(specs.len())?;
    specs
        .iter()
        .map(|s| {
            let weight = s.weight.unwrap_or(1.0);
            if !weight.is_finite() || weight.abs() > MAX_WEIGHT {
                return Err(Status::invalid_argument(format!(
                    "LoRA {}: weight must be within [-{MAX_WEIGHT}, {MAX_WEIGHT}], got {weight}",
                    quote(&s.name)
                )));
            }
            Ok(JobLora { name: s.name.clone(), path: catalog.resolve(&s.name)?, weight })
        })
        .collect()
}

/// Reads a job's LoRA files, reusing those in `cache` whose file is unchanged (same path,
/// size and modification time). A file that is not a LoRA this engine can merge is
/// INVALID_ARGUMENT naming its key; an unreadable one FAILED_PRECONDITION.
pub fn load<'c>(specs: &[JobLora], cache: &'c mut LoadedLoras) -> Result<Vec<(&'c Lora, f32)>, Status> {
    for spec in specs {
        let stamp = file_stamp(&spec.path);
        let fresh = cache.get(&spec.path).is_some_and(|(s, _)| *s == stamp && stamp.is_some());
        if !fresh {
            let lora = Lora::load(&spec.path).map_err(|e| status(&spec.name, &e))?;
            cache.insert(spec.path.clone(), (stamp, lora));
        }
    }
    Ok(specs.iter().map(|s| (&cache[&s.path].1, s.weight)).collect())
}

/// LoRAs read by `load`, by path, with the size and modification time they were read at.
pub type LoadedLoras = HashMap<PathBuf, (Option<(u64, SystemTime)>, Lora)>;

fn file_stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// The status of a LoRA that cannot be read or merged: INVALID_ARGUMENT when the file
/// does not fit the model or is no LoRA the engine knows (a `LoraError` names the key),
/// else FAILED_PRECONDITION.
pub fn status(what: &str, e: &anyhow::Error) -> Status {
    let message = format!("LoRA {}: {e:#}", quote(what));
    if e.chain().any(|c| c.downcast_ref::<LoraError>().is_some()) {
        Status::invalid_argument(message)
    } else {
        Status::failed_precondition(message)
    }
}

/// One LoRA of a job, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct JobLora {
    pub name: String,
    pub path: PathBuf,
    pub weight: f32,
}
