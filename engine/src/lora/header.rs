//! A safetensors file's header: tensor names, shapes and the `__metadata__` strings,
//! read without loading the tensors (for checking which LoRAs fit which model).
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

/// Headers larger than this are refused (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensor name → shape.
    pub shapes: BTreeMap<String, Vec<i64>>,
    pub metadata: HashMap<String, String>,
}

impl Header {
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(|| format!("reading {}", path.display()))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER {
            bail!("{}: safetensors header of {len} bytes is too large", path.display());
        }
        let mut text = vec![0u8; len as usize];
        file.read_exact(&mut text).with_context(|| format!("reading the header of {}", path.display()))?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a safetensors file (bad header)", path.display()))?;
        let mut header = Self::default();
        for (name, value) in json {
            if name == "__metadata__" {
                if let Some(map) = value.as_object() {
                    for (k, v) in map {
                        if let Some(s) = v.as_str() {
                            header.metadata.insert(k.clone(), s.to_string());
                        }
                    }
                }
                continue;
            }
            let shape = value["shape"]
                .as_array()
                .and_then(|dims| dims.iter().map(serde_json::Value::as_i64).collect::<Option<Vec<i64>>>())
                .with_context(|| format!("{}: tensor `{name}` has no shape", path.display()))?;
            header.shapes.insert(name, shape);
        }
        Ok(header)
    }
}
