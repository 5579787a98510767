//! Reads the tensors of a `torch.save` file without running its pickle: the zip format
//! (PyTorch ≥ 1.6) and, for [`read`] only, the legacy one (the format of pytorch-fid's and
//! lpips' published weights). The pickle is interpreted by a small virtual machine that
//! knows only what a saved state dict uses — containers, numbers, strings,
//! `collections.OrderedDict`, torch's storage classes and tensor rebuild functions — and
//! refuses any other global, so a file cannot make it run code: nothing it names is ever
//! called, and a name outside [`ALLOWED_GLOBALS`] stops the reading.
//!
//! [`header`] indexes a zip checkpoint (`.ckpt`, `.pt`, `.pth`) as a safetensors header:
//! each tensor's dtype, shape, strides and byte range in the file, whose storages
//! `torch.save` writes uncompressed, so the file is memory-mapped and read one tensor at a
//! time like a `.safetensors` file.
use super::safetensors::{Entry, Header};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use tch::{Kind, Tensor};

/// The globals a state dict's pickle may name, as a message lists them.
pub const ALLOWED_GLOBALS: &str = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, \
     torch._utils._rebuild_tensor, torch._utils._rebuild_parameter and torch's storage types (torch.FloatStorage, \
     torch.HalfStorage, torch.BFloat16Storage, …)";

/// The largest `data.pkl` read (a full SDXL checkpoint's is under 1 MB; the storages are
/// separate entries).
const MAX_PICKLE: u64 = 256 << 20;

/// The tensors of a saved (nested) dict, keyed by their dotted path, in file order; the
/// whole file is read into memory (for small files such as metric networks' weights).
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let tensors = if bytes.starts_with(ZIP_MAGIC) { read_zip(&bytes) } else { read_legacy(&bytes) };
    tensors.with_context(|| format!("reading the tensors of {}", path.display()))
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// An object the pickle built. Containers live in an arena and are referred to by index,
/// so that the memo and the stack share them as Python does.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as pickled (little-endian two's complement).
    BigInt(Vec<u8>),
    /// A float (a state dict's tensors do not need its value).
    Float,
    Str(String),
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(String, String),
    /// A persistent id resolved to a storage: its key and element type.
    Storage {
        key: String,
        kind: Kind,
    },
    Tensor {
        storage: usize,
        offset: i64,
        size: Vec<i64>,
        stride: Vec<i64>,
    },
    Mark,
}

struct Machine {
    arena: Vec<Value>,
    stack: Vec<usize>,
    memo: HashMap<u32, usize>,
}

fn storage_kind(class: &str) -> Result<Kind> {
    Ok(match class {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("unsupported storage type torch.{other}"),
    })
}

/// The globals a state dict may name; anything else is refused.
fn allowed(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_tensor")
            | ("torch._utils", "_rebuild_parameter")
            | ("torch", _)
    ) && (module != "torch" || name.ends_with("Storage"))
}

impl Machine {
    fn new() -> Self {
        Self { arena: Vec::new(), stack: Vec::new(), memo: HashMap::new() }
    }

    fn push(&mut self, v: Value) {
        self.arena.push(v);
        self.stack.push(self.arena.len() - 1);
    }

    fn pop(&mut self) -> Result<usize> {
        self.stack.pop().ok_or_else(|| anyhow!("pickle stack underflow"))
    }

    /// The items above the topmost mark (removed with it).
    fn pop_mark(&mut self) -> Result<Vec<usize>> {
        let at = self
            .stack
            .iter()
            .rposition(|&i| matches!(self.arena[i], Value::Mark))
            .ok_or_else(|| anyhow!("pickle MARK missing"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn int(&self, i: usize) -> Result<i64> {
        match &self.arena[i] {
            Value::Int(n) => Ok(*n),
            Value::Bool(b) => Ok(*b as i64),
            other => bail!("expected an integer, got {other:?}"),
        }
    }

    fn ints(&self, i: usize) -> Result<Vec<i64>> {
        match &self.arena[i] {
            Value::Tuple(items) | Value::List(items) => items.iter().map(|&j| self.int(j)).collect(),
            other => bail!("expected a tuple of integers, got {other:?}"),
        }
    }

    fn string(&self, i: usize) -> Result<String> {
        match &self.arena[i] {
            Value::Str(s) => Ok(s.clone()),
            Value::Int(n) => Ok(n.to_string()),
            other => bail!("expected a string, got {other:?}"),
        }
    }

    /// `callable(*args)` for the allowed callables.
    fn reduce(&mut self, callable: usize, args: usize) -> Result<Value> {
        let Value::Global(module, name) = self.arena[callable].clone() else {
            bail!("REDUCE of something that is not a global")
        };
        let Value::Tuple(args) = self.arena[args].clone() else { bail!("REDUCE arguments are not a tuple") };
        Ok(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => Value::Dict(Vec::new()),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                ensure!(args.len() >= 4, "{name} with {} arguments", args.len());
                ensure!(matches!(self.arena[args[0]], Value::Storage { .. }), "{name} without a storage");
                Value::Tensor {
                    storage: args[0],
                    offset: self.int(args[1])?,
                    size: self.ints(args[2])?,
                    stride: self.ints(args[3])?,
                }
            }
            // Parameter(tensor, requires_grad, hooks): the tensor.
            ("torch._utils", "_rebuild_parameter") => {
                let tensor = *args.first().ok_or_else(|| anyhow!("_rebuild_parameter without a tensor"))?;
                self.arena[tensor].clone()
            }
            _ => bail!("the pickle calls {module}.{name}, which a state dict does not need"),
        })
    }

    /// A persistent id: ('storage', storage class, key, location, numel[, view]).
    fn persistent(&self, pid: usize) -> Result<Value> {
        let Value::Tuple(items) = &self.arena[pid] else { bail!("persistent id is not a tuple") };
        ensure!(items.len() >= 5, "persistent id of {} items", items.len());
        ensure!(self.string(items[0])? == "storage", "persistent id that is not a storage");
        let Value::Global(module, class) = &self.arena[items[1]] else { bail!("storage type is not a global") };
        ensure!(module == "torch", "storage type {module}.{class}");
        if items.len() > 5 {
            ensure!(matches!(self.arena[items[5]], Value::None), "storage views (legacy) are not supported");
        }
        Ok(Value::Storage { key: self.string(items[2])?, kind: storage_kind(class)? })
    }

    /// Runs a pickle from `data`; returns the index of the result and the bytes read.
    fn run(&mut self, data: &[u8]) -> Result<(usize, usize)> {
        let mut pos = 0usize;
        let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
            let end = pos.checked_add(n).filter(|&e| e <= data.len()).ok_or_else(|| anyhow!("pickle cut short"))?;
            let s = &data[*pos..end];
            *pos = end;
            Ok(s)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        loop {
            let op = take(&mut pos, 1)?[0];
            match op {
                0x80 => {
                    take(&mut pos, 1)?; // PROTO
                }
                0x95 => {
                    take(&mut pos, 8)?; // FRAME
                }
                b'.' => return Ok((self.pop()?, pos)), // STOP
                b'(' => self.push(Value::Mark),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(take(&mut pos, 4)?.try_into()?);
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = take(&mut pos, 1)?[0];
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(take(&mut pos, 2)?.try_into()?);
                    self.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = take(&mut pos, 1)?[0] as usize;
                    let b = take(&mut pos, n)?;
                    if n > 8 {
                        self.push(Value::BigInt(b.to_vec()));
                        continue;
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v));
                }
                b'G' => {
                    take(&mut pos, 8)?;
                    self.push(Value::Float);
                }
                b'X' | 0x8c | 0x8d => {
                    // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8 (and BINBYTES alike below).
                    let n = match op {
                        b'X' => u32_at(take(&mut pos, 4)?) as usize,
                        0x8c => take(&mut pos, 1)?[0] as usize,
                        _ => u64::from_le_bytes(take(&mut pos, 8)?.try_into()?) as usize,
                    };
                    let s = std::str::from_utf8(take(&mut pos, n)?).context("a pickle string")?;
                    self.push(Value::Str(s.to_string()));
                }
                b'B' | b'C' => {
                    let n =
                        if op == b'B' { u32_at(take(&mut pos, 4)?) as usize } else { take(&mut pos, 1)?[0] as usize };
                    take(&mut pos, n)?;
                    self.push(Value::None);
                }
                b'c' => {
                    // GLOBAL "module\nname\n"
                    let mut line = || -> Result<String> {
                        let rest = &data[pos..];
                        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("GLOBAL cut short"))?;
                        let s = std::str::from_utf8(&rest[..end])?.to_string();
                        pos += end + 1;
                        Ok(s)
                    };
                    let (module, name) = (line()?, line()?);
                    ensure!(
                        allowed(&module, &name),
                        "the pickle names {module}.{name}, which a state dict does not need"
                    );
                    self.push(Value::Global(module, name));
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (module, name) = (self.string(module)?, self.string(name)?);
                    ensure!(
                        allowed(&module, &name),
                        "the pickle names {module}.{name}, which a state dict does not need"
                    );
                    self.push(Value::Global(module, name));
                }
                b')' => self.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    ensure!(self.stack.len() >= n, "pickle stack underflow");
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items));
                }
                b']' => self.push(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let list = *self.stack.last().ok_or_else(|| anyhow!("APPEND without a list"))?;
                    match &mut self.arena[list] {
                        Value::List(l) => l.extend(items),
                        other => bail!("APPEND to {other:?}"),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    ensure!(items.len().is_multiple_of(2), "SETITEMS with an odd number of items");
                    let dict = *self.stack.last().ok_or_else(|| anyhow!("SETITEM without a dict"))?;
                    match &mut self.arena[dict] {
                        Value::Dict(d) => d.extend(items.chunks(2).map(|kv| (kv[0], kv[1]))),
                        other => bail!("SETITEM on {other:?}"),
                    }
                }
                b'q' => {
                    let k = take(&mut pos, 1)?[0] as u32;
                    self.memo.insert(k, *self.stack.last().ok_or_else(|| anyhow!("BINPUT on an empty stack"))?);
                }
                b'r' => {
                    let k = u32_at(take(&mut pos, 4)?);
                    self.memo.insert(k, *self.stack.last().ok_or_else(|| anyhow!("LONG_BINPUT on an empty stack"))?);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo.insert(k, *self.stack.last().ok_or_else(|| anyhow!("MEMOIZE on an empty stack"))?);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { take(&mut pos, 1)?[0] as u32 } else { u32_at(take(&mut pos, 4)?) };
                    let i = *self.memo.get(&k).ok_or_else(|| anyhow!("memo {k} missing"))?;
                    self.stack.push(i);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent(pid)?;
                    self.push(storage);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.push(v);
                }
                b'b' => {
                    // BUILD: the state (a state dict's `_metadata`) is not needed.
                    self.pop()?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let top = *self.stack.last().ok_or_else(|| anyhow!("DUP on an empty stack"))?;
                    self.stack.push(top);
                }
                other => bail!("unsupported pickle opcode 0x{other:02x}"),
            }
        }
    }

    /// The tensors and integers under `root` (a dict; nested dicts' keys joined with
    /// dots), in file order; other values (strings, floats, lists) are passed over.
    fn walk(&self, root: usize) -> Result<(Vec<View>, Named<i64>)> {
        let (mut views, mut ints) = (Vec::new(), Vec::new());
        let mut walk = vec![(String::new(), root)];
        while let Some((prefix, i)) = walk.pop() {
            match &self.arena[i] {
                Value::Dict(items) => {
                    for &(k, v) in items.iter().rev() {
                        let key = self.string(k)?;
                        walk.push((if prefix.is_empty() { key } else { format!("{prefix}.{key}") }, v));
                    }
                }
                Value::Tensor { storage, offset, size, stride } => {
                    let Value::Storage { key, kind } = &self.arena[*storage] else { unreachable!("checked in reduce") };
                    views.push(View {
                        name: prefix,
                        key: key.clone(),
                        kind: *kind,
                        offset: *offset,
                        size: size.clone(),
                        stride: stride.clone(),
                    });
                }
                Value::Int(n) => ints.push((prefix, *n)),
                _ => {}
            }
        }
        Ok((views, ints))
    }

    /// The value under `key` of the dict `dict`, if it is one and has it.
    fn item(&self, dict: usize, key: &str) -> Option<usize> {
        let Value::Dict(items) = &self.arena[dict] else { return None };
        items.iter().find(|&&(k, _)| matches!(&self.arena[k], Value::Str(s) if s == key)).map(|&(_, v)| v)
    }

    /// The tensors under `root`, each a contiguous copy of its view of a storage.
    fn tensors(
        &self,
        root: usize,
        storages: &mut dyn FnMut(&str, Kind) -> Result<Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut cache: HashMap<String, Tensor> = HashMap::new();
        let (views, _) = self.walk(root)?;
        let mut out = Vec::with_capacity(views.len());
        for v in views {
            if !cache.contains_key(&v.key) {
                cache.insert(v.key.clone(), storages(&v.key, v.kind)?);
            }
            let flat = &cache[&v.key];
            v.span(flat.size()[0])?;
            let t = flat.as_strided(v.size.as_slice(), v.stride.as_slice(), v.offset).contiguous();
            out.push((v.name, t));
        }
        Ok(out)
    }
}

/// Values by their dotted names, in file order.
type Named<T> = Vec<(String, T)>;

/// A tensor of the pickle: a view (offset, size, stride in elements) of a storage.
struct View {
    name: String,
    key: String,
    kind: Kind,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl View {
    /// The elements from the view's offset through the last one it reaches (0 when it is
    /// empty), checked to lie within a storage of `numel` elements.
    fn span(&self, numel: i64) -> Result<i64> {
        let name = &self.name;
        ensure!(
            self.size.len() == self.stride.len(),
            "tensor `{name}` has {} sizes but {} strides",
            self.size.len(),
            self.stride.len()
        );
        ensure!(
            self.offset >= 0 && self.size.iter().chain(&self.stride).all(|&n| n >= 0),
            "tensor `{name}` has a negative size, stride or offset"
        );
        if self.size.contains(&0) {
            return Ok(0);
        }
        let last = self.size.iter().zip(&self.stride).map(|(&n, &s)| (n as i128 - 1) * s as i128).sum::<i128>();
        ensure!(
            self.offset as i128 + last < numel as i128,
            "tensor `{name}` (offset {}, size {:?}, stride {:?}) reaches past its storage of {numel} elements",
            self.offset,
            self.size,
            self.stride
        );
        Ok(last as i64 + 1)
    }

    /// Whether the view is row-major contiguous (dimensions of size 1 have any stride).
    fn is_contiguous(&self) -> bool {
        let mut expected = 1i64;
        for (&n, &s) in self.size.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(n);
        }
        true
    }
}

/// The safetensors name of a storage's element type.
fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::Double => "F64",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        other => bail!("storage of {other:?}"),
    })
}

/// The tensor index of a zip-format `torch.save` checkpoint, read from its pickle and zip
/// directory alone (no tensor data is read): the tensors of its top-level `state_dict`
/// dict (the original Stable Diffusion layout), or of the whole dict when it has none, and
/// its top-level integers (such as `global_step`). Strings, floats and other plain values
/// around them are passed over; any global outside [`ALLOWED_GLOBALS`], a legacy (non-zip)
/// pickle and a compressed storage are refused.
pub fn header(path: &Path) -> Result<Header> {
    let name = path.display();
    let mut file = File::open(path).with_context(|| format!("opening {name}"))?;
    let file_len = file.metadata().with_context(|| format!("reading {name}"))?.len();
    let mut magic = Vec::new();
    (&mut file).take(4).read_to_end(&mut magic).with_context(|| format!("reading {name}"))?;
    if magic != ZIP_MAGIC {
        bail!(
            "{name} is not a zip-format torch.save checkpoint (PyTorch ≥ 1.6 writes one); legacy and other pickles \
             are not read. {}",
            super::CONVERT_HINT
        );
    }
    let mut archive = zip::ZipArchive::new(BufReader::new(File::open(path)?))
        .with_context(|| format!("{name} is not a readable zip archive (truncated?)"))?;
    let pkl = archive
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{name} is a zip archive without a data.pkl, not a torch.save checkpoint"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut data = Vec::new();
    {
        let entry = archive.by_name(&pkl).with_context(|| format!("{name}: reading {pkl}"))?;
        ensure!(entry.size() <= MAX_PICKLE, "{name}: {pkl} has {} bytes, too many for a state dict", entry.size());
        entry.take(MAX_PICKLE).read_to_end(&mut data).with_context(|| format!("{name}: reading {pkl}"))?;
    }
    let mut machine = Machine::new();
    let (root, _) = machine.run(&data).map_err(|e| {
        anyhow!(
            "{name} was refused without running any of it: {e:#} (a state dict's pickle names only \
             {ALLOWED_GLOBALS}). {}",
            super::CONVERT_HINT
        )
    })?;
    let state = machine.item(root, "state_dict").filter(|&i| matches!(machine.arena[i], Value::Dict(_)));
    let (views, _) = machine.walk(state.unwrap_or(root)).with_context(|| format!("{name}: reading its pickle"))?;
    let ints = match state {
        Some(_) => machine.walk(root)?.1.into_iter().filter(|(k, _)| !k.starts_with("state_dict.")).collect(),
        None => machine.walk(root)?.1,
    };
    // Each storage's byte range in the file: (start, element count).
    let mut storages: HashMap<String, (u64, i64)> = HashMap::new();
    let mut tensors = BTreeMap::new();
    for v in views {
        let dtype = dtype_name(v.kind).with_context(|| format!("{name}: tensor `{}`", v.name))?;
        let width = element_size(v.kind) as u64;
        if !storages.contains_key(&v.key) {
            let entry_name = format!("{prefix}data/{}", v.key);
            let entry =
                archive.by_name(&entry_name).with_context(|| format!("{name}: storage {entry_name} missing"))?;
            ensure!(
                entry.compression() == zip::CompressionMethod::Stored,
                "{name}: storage {entry_name} is compressed ({:?}); torch.save stores storages uncompressed",
                entry.compression()
            );
            let (start, size) = (entry.data_start(), entry.size());
            ensure!(
                start.checked_add(size).is_some_and(|end| end <= file_len),
                "{name}: storage {entry_name} lies past the end of the file (truncated?)"
            );
            ensure!(size % width == 0, "{name}: storage {entry_name} of {size} bytes for {:?} elements", v.kind);
            storages.insert(v.key.clone(), (start, (size / width) as i64));
        }
        let (storage_start, numel) = storages[&v.key];
        let span = v.span(numel).with_context(|| format!("{name}: storage {}", v.key))?;
        let start = (storage_start + v.offset as u64 * width) as usize;
        let entry = Entry {
            dtype: dtype.to_string(),
            start,
            end: start + span as usize * width as usize,
            strides: (!v.is_contiguous()).then(|| v.stride.clone()),
            shape: v.size,
        };
        tensors.insert(v.name, entry);
    }
    Ok(Header::from_parts(path, tensors, ints.into_iter().collect()))
}

fn element_size(kind: Kind) -> usize {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        _ => 1,
    }
}

fn flat_tensor(bytes: &[u8], kind: Kind) -> Result<Tensor> {
    let size = element_size(kind);
    ensure!(bytes.len().is_multiple_of(size), "storage of {} bytes for {kind:?}", bytes.len());
    Ok(Tensor::from_data_size(bytes, &[(bytes.len() / size) as i64], kind))
}

fn read_zip(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("not a zip archive")?;
    let names: Vec<String> = archive.file_names().map(String::from).collect();
    let pkl =
        names.iter().find(|n| n.ends_with("/data.pkl") || *n == "data.pkl").ok_or_else(|| anyhow!("no data.pkl"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut data = Vec::new();
    archive.by_name(pkl)?.read_to_end(&mut data)?;
    let mut machine = Machine::new();
    let (root, _) = machine.run(&data)?;
    let mut storages = |key: &str, kind: Kind| -> Result<Tensor> {
        let mut raw = Vec::new();
        archive.by_name(&format!("{prefix}data/{key}"))?.read_to_end(&mut raw)?;
        flat_tensor(&raw, kind)
    };
    machine.tensors(root, &mut storages)
}

/// The legacy format: pickles of the magic number, the protocol version and the system
/// info, then the object's pickle, then the sorted storage keys' pickle, then each
/// storage as a little-endian u64 element count and its bytes.
fn read_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut pos = 0;
    let mut header = Machine::new();
    for what in ["magic number", "protocol version", "system info"] {
        let (value, used) = header.run(&bytes[pos..]).with_context(|| format!("the {what} pickle"))?;
        if what == "magic number" {
            let magic = 0x1950a86a20f9469cfc6c_u128.to_le_bytes();
            let is_magic = matches!(&header.arena[value], Value::BigInt(b) if b[..] == magic[..10]);
            ensure!(is_magic, "not a torch.save file (neither a zip archive nor the legacy format)");
        }
        pos += used;
    }
    let mut machine = Machine::new();
    let (root, used) = machine.run(&bytes[pos..]).context("the object pickle")?;
    pos += used;
    let mut keys_machine = Machine::new();
    let (keys, used) = keys_machine.run(&bytes[pos..]).context("the storage keys pickle")?;
    pos += used;
    let Value::List(key_items) = keys_machine.arena[keys].clone() else { bail!("storage keys are not a list") };
    let kinds: HashMap<String, Kind> = machine
        .arena
        .iter()
        .filter_map(|v| if let Value::Storage { key, kind } = v { Some((key.clone(), *kind)) } else { None })
        .collect();
    let mut raw: HashMap<String, Tensor> = HashMap::new();
    for item in key_items {
        let key = keys_machine.string(item)?;
        let kind = *kinds.get(&key).ok_or_else(|| anyhow!("storage {key} is not used by any tensor"))?;
        let count = bytes.get(pos..pos + 8).ok_or_else(|| anyhow!("storage {key} cut short"))?;
        let count = u64::from_le_bytes(count.try_into()?) as usize;
        pos += 8;
        let n = count.checked_mul(element_size(kind)).ok_or_else(|| anyhow!("storage {key} too large"))?;
        let data = bytes.get(pos..pos + n).ok_or_else(|| anyhow!("storage {key} cut short"))?;
        pos += n;
        raw.insert(key, flat_tensor(data, kind)?);
    }
    let mut storages =
        |key: &str, _kind: Kind| raw.remove(key).ok_or_else(|| anyhow!("storage {key} missing from the file"));
    machine.tensors(root, &mut storages)
}

#[cfg(test)]
mod tests {
    use super::View;
    use tch::Kind;

    fn view(offset: i64, size: &[i64], stride: &[i64]) -> View {
        View {
            name: "w".into(),
            key: "0".into(),
            kind: Kind::Float,
            offset,
            size: size.to_vec(),
            stride: stride.to_vec(),
        }
    }

    /// A view's reach is checked against its storage before any byte of it is read.
    #[test]
    fn views_stay_inside_their_storage() {
        assert_eq!(view(4, &[2, 3], &[3, 1]).span(10).unwrap(), 6);
        assert!(view(4, &[2, 3], &[3, 1]).is_contiguous());
        // Column-major (a transposed weight): strided, reaching the same elements.
        let t = view(0, &[2, 3], &[1, 2]);
        assert!(!t.is_contiguous());
        assert_eq!(t.span(6).unwrap(), 6);
        assert_eq!(view(0, &[0, 3], &[3, 1]).span(0).unwrap(), 0);
        let past = format!("{:#}", view(5, &[2, 3], &[3, 1]).span(10).unwrap_err());
        assert!(past.contains("reaches past its storage of 10 elements"), "{past}");
        let negative = format!("{:#}", view(0, &[2], &[-1]).span(10).unwrap_err());
        assert!(negative.contains("negative"), "{negative}");
        let ranks = format!("{:#}", view(0, &[2, 3], &[1]).span(10).unwrap_err());
        assert!(ranks.contains("2 sizes but 1 strides"), "{ranks}");
        let huge = format!("{:#}", view(0, &[i64::MAX, 2], &[i64::MAX, 1]).span(10).unwrap_err());
        assert!(huge.contains("reaches past"), "{huge}");
    }
}
