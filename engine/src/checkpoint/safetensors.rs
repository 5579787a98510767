//! A safetensors reader that memory-maps the file and creates one tensor at a time, so a
//! checkpoint is never held twice in memory (the libtorch reader copies the whole file).
//! The header is validated before any tensor is touched: its length against the file
//! size, every tensor's byte range against the data section, and its dtype and shape
//! against that range. A zip `torch.save` checkpoint is indexed as such a header
//! (`torch_file::header`) and read through the same map.
use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The header may not exceed this (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's place in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<i64>,
    /// Byte range within the data section (after the header): the tensor's elements, or
    /// for a strided view, its first through its last element.
    pub start: usize,
    pub end: usize,
    /// Element strides of a view that is not row-major contiguous (only in `.ckpt` files,
    /// whose tensors may be views of a shared storage).
    pub strides: Option<Vec<i64>>,
}

impl Entry {
    pub fn is_float(&self) -> bool {
        matches!(self.dtype.as_str(), "F16" | "BF16" | "F32" | "F64")
    }
}

/// The parsed header of a safetensors file.
#[derive(Clone, Debug)]
pub struct Header {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Entry>,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    /// Plain integers stored beside the tensors (a `.ckpt`'s `global_step`).
    pub ints: BTreeMap<String, i64>,
    /// Where the data section starts in the file.
    data_offset: usize,
}

fn dtype_kind(dtype: &str) -> Option<(Kind, usize)> {
    Some(match dtype {
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "F32" => (Kind::Float, 4),
        "F64" => (Kind::Double, 8),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        "I16" => (Kind::Int16, 2),
        "I8" => (Kind::Int8, 1),
        "U8" => (Kind::Uint8, 1),
        "BOOL" => (Kind::Bool, 1),
        _ => return None,
    })
}

impl Header {
    /// Reads and checks the header only (no tensor data is read).
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        Self::parse(path, &mut file, file_len)
    }

    fn parse(path: &Path, file: &mut impl Read, file_len: u64) -> Result<Self> {
        let name = path.display();
        ensure!(
            file_len >= 8,
            "{name} is not a safetensors file: {file_len} bytes, shorter than the 8-byte header length"
        );
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(|| format!("reading {name}"))?;
        let header_len = u64::from_le_bytes(len);
        ensure!(
            header_len <= MAX_HEADER && 8 + header_len <= file_len,
            "{name} is not a valid safetensors file: its header claims {header_len} bytes but the file has {file_len} \
             bytes (truncated, or not a safetensors file)"
        );
        let mut text = vec![0u8; header_len as usize];
        file.read_exact(&mut text).with_context(|| format!("reading the header of {name}"))?;
        let json: Value = serde_json::from_slice(&text)
            .with_context(|| format!("{name} is not a valid safetensors file: its header is not JSON"))?;
        let Value::Object(map) = json else { bail!("{name}: the safetensors header is not a JSON object") };
        let data_len = (file_len - 8 - header_len) as usize;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (key, v) in map {
            if key == "__metadata__" {
                if let Value::Object(m) = v {
                    metadata = m.into_iter().filter_map(|(k, v)| Some((k, v.as_str()?.to_string()))).collect();
                }
                continue;
            }
            let entry = parse_entry(&v).with_context(|| format!("{name}: tensor `{key}` has a malformed entry"))?;
            let (_, width) = dtype_kind(&entry.dtype)
                .with_context(|| format!("{name}: tensor `{key}` has unsupported dtype {}", entry.dtype))?;
            let bytes =
                entry.shape.iter().try_fold(width as u64, |n, &d| n.checked_mul(d as u64)).with_context(|| {
                    format!("{name}: tensor `{key}` has an impossibly large shape {:?}", entry.shape)
                })?;
            ensure!(
                entry.start <= entry.end && entry.end <= data_len,
                "{name}: tensor `{key}` lies at bytes {}..{} but the data section has {data_len} bytes (truncated file?)",
                entry.start,
                entry.end
            );
            ensure!(
                (entry.end - entry.start) as u64 == bytes,
                "{name}: tensor `{key}` ({} {:?}) needs {bytes} bytes but its range has {}",
                entry.dtype,
                entry.shape,
                entry.end - entry.start
            );
            tensors.insert(key, entry);
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
            ints: BTreeMap::new(),
            data_offset: 8 + header_len as usize,
        })
    }

    /// A header whose entries' byte ranges are offsets in the file itself.
    pub(super) fn from_parts(path: &Path, tensors: BTreeMap<String, Entry>, ints: BTreeMap<String, i64>) -> Self {
        Self { path: path.to_path_buf(), tensors, metadata: BTreeMap::new(), ints, data_offset: 0 }
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.tensors.get(name)
    }

    /// The shape of `name`, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// The value of a plain integer or of a one-element integer tensor (e.g.
    /// `global_step`), read from the file.
    pub fn read_int(&self, name: &str) -> Result<Option<i64>> {
        if let Some(&n) = self.ints.get(name) {
            return Ok(Some(n));
        }
        let Some(e) = self.get(name) else { return Ok(None) };
        let width = match e.dtype.as_str() {
            "I64" => 8,
            "I32" => 4,
            _ => return Ok(None),
        };
        if e.end - e.start != width {
            return Ok(None);
        }
        let mut file = File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        let mut bytes = [0u8; 8];
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start((self.data_offset + e.start) as u64))?;
        file.read_exact(&mut bytes[..width]).with_context(|| format!("reading `{name}` of {}", self.path.display()))?;
        Ok(Some(if width == 8 { i64::from_le_bytes(bytes) } else { i32::from_le_bytes(bytes[..4].try_into()?) as i64 }))
    }

    /// The shape of the weight `name` (at least 2-d), or an error naming it as a `what` tensor.
    pub fn weight_shape(&self, name: &str, what: &str) -> Result<&[i64]> {
        let shape = self.shape(name).with_context(|| format!("{}: no {what} tensor `{name}`", self.path.display()))?;
        ensure!(shape.len() >= 2, "{}: {what} tensor `{name}` has shape {shape:?}, not a weight", self.path.display());
        Ok(shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor names starting with `prefix`.
    pub fn names_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tensors.range(prefix.to_string()..).map(|(k, _)| k.as_str()).take_while(move |k| k.starts_with(prefix))
    }
}

fn parse_entry(v: &Value) -> Result<Entry> {
    let dtype = v["dtype"].as_str().context("no dtype")?.to_string();
    let shape = v["shape"]
        .as_array()
        .context("no shape")?
        .iter()
        .map(|d| d.as_i64().filter(|&d| d >= 0).context("a dimension is not a non-negative integer"))
        .collect::<Result<Vec<_>>>()?;
    let offsets = v["data_offsets"].as_array().context("no data_offsets")?;
    ensure!(offsets.len() == 2, "data_offsets has {} values", offsets.len());
    let off = |i: usize| offsets[i].as_u64().map(|o| o as usize).context("an offset is not a non-negative integer");
    Ok(Entry { dtype, shape, start: off(0)?, end: off(1)?, strides: None })
}

/// A memory-mapped safetensors file.
pub struct MappedFile {
    pub header: Header,
    map: Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::map(Header::read(path)?)
    }

    /// Maps the file `header` was read from.
    pub fn map(header: Header) -> Result<Self> {
        let path = header.path.clone();
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the map is read-only and lives as long as `self`; a file changed by another
        // process while mapped gives wrong values (or SIGBUS if truncated), as with any reader
        // that maps model files (safetensors' own does the same).
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("memory-mapping {}", path.display()))?;
        ensure!(
            map.len() >= header.data_offset + header.tensors.values().map(|e| e.end).max().unwrap_or(0),
            "{} changed size while being opened",
            path.display()
        );
        Ok(Self { header, map })
    }

    /// The tensor `name`, read out of the map; floating tensors are converted to `kind` on
    /// `device` straight from the mapped bytes (no intermediate copy in the stored dtype).
    /// The pages read are dropped from this process afterwards. (`Weights` puts tensors in
    /// the modules' layout, `nn::conv_layout`.)
    pub fn tensor(&self, name: &str, device: Device, kind: Kind) -> Result<Tensor> {
        let e = self.header.get(name).with_context(|| format!("{}: no tensor `{name}`", self.header.path.display()))?;
        let (stored, width) = dtype_kind(&e.dtype).expect("dtype checked when parsing the header");
        let (start, end) = (self.header.data_offset + e.start, self.header.data_offset + e.end);
        let bytes = &self.map[start..end];
        let mut strides = vec![1i64; e.shape.len()];
        for i in (0..e.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * e.shape[i + 1];
        }
        let strides = e.strides.clone().unwrap_or(strides);
        // The bytes from the first element through the last one the strides reach.
        let span = if e.shape.contains(&0) {
            0
        } else {
            e.shape.iter().zip(&strides).map(|(&n, &s)| (n - 1) * s).sum::<i64>() + 1
        };
        anyhow::ensure!(
            bytes.len() as i64 == span * width as i64,
            "{}: tensor `{name}` has {} bytes for shape {:?} and strides {strides:?}",
            self.header.path.display(),
            bytes.len(),
            e.shape
        );
        // SAFETY: `bytes` holds exactly the elements the shape and strides reach (checked
        // above) and stays
        // mapped for this whole call; `view` borrows it and is dropped before returning,
        // after `t` owns a copy (the conversion's own, or `copy` below when it had none).
        let view = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &e.shape, &strides, stored, Device::Cpu) }
            .with_context(|| format!("{}: creating tensor `{name}`", self.header.path.display()))?;
        let t = if e.is_float() { view.to_device(device).to_kind(kind) } else { view.to_device(device) };
        let t = if e.strides.is_some() { t.contiguous() } else { t };
        let t = if t.device() == Device::Cpu && t.data_ptr() == view.data_ptr() { t.copy() } else { t };
        drop(view);
        self.release(start, end);
        Ok(t)
    }

    /// Drops the mapped pages of a byte range from this process's resident set; they are
    /// read from the file again if touched.
    fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        {
            let page = 4096;
            let from = start.div_ceil(page) * page;
            let to = end / page * page;
            if to > from {
                // SAFETY: the map is a private read-only file mapping; MADV_DONTNEED on it only
                // drops pages, which are re-read from the file on the next access, so no data
                // this process relies on changes.
                let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Header;
    use std::path::Path;

    fn parse(header: &str, data: usize) -> anyhow::Result<Header> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        Header::parse(Path::new("t.safetensors"), &mut bytes.as_slice(), bytes.len() as u64)
    }

    fn error(header: &str, data: usize) -> String {
        format!("{:#}", parse(header, data).expect_err("a bad header was accepted"))
    }

    #[test]
    fn headers_are_checked_against_the_data() {
        let ok = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}}"#;
        let h = parse(ok, 12).unwrap();
        assert_eq!(h.shape("a"), Some(&[2i64, 3][..]));
        assert_eq!(h.metadata["format"], "pt");
        assert!(error(ok, 11).contains("data section has 11 bytes"));
        let wrong_size = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}}"#;
        assert!(error(wrong_size, 12).contains("needs 24 bytes but its range has 12"));
        let dtype = r#"{"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(error(dtype, 1).contains("unsupported dtype F8_E4M3"));
        let reversed = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#;
        assert!(error(reversed, 1).contains("lies at bytes 1..0"));
        let negative = r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#;
        assert!(error(negative, 1).contains("malformed"));
        let huge = r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,1]}}"#;
        assert!(error(huge, 1).contains("impossibly large"));
        assert!(error("not json", 0).contains("not JSON"));
        assert!(error("[1]", 0).contains("not a JSON object"));
    }
}
