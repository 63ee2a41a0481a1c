//! PyTorch `.pth` files (the zip format of `torch.save`): reading tensors, strides included, and
//! writing a dict of state dicts and strings that `torch.load` opens ([`write_pth`]).
//!
//! The pickle is parsed with candle's reader (`candle_core::pickle`). Tensor data is read here
//! rather than with `PthTensors::get`, which refuses tensors that are neither C- nor
//! Fortran-contiguous: the converter of the official weights stores every conv kernel as a
//! permuted view of a TF HWIO buffer and every dense kernel as a transposed view, so the
//! strides must be honoured. A stride pattern that is a permutation of a contiguous layout is
//! rebuilt with reshape + permute; any other pattern is gathered element by element.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

use crate::error::InteropError;

/// A state dict's tensors by name (metadata only; data is read on demand).
pub type StateDictInfo = BTreeMap<String, TensorInfo>;

/// An open `.pth` file.
pub struct PthReader {
    path: PathBuf,
    archive: zip::ZipArchive<BufReader<File>>,
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> InteropError {
    InteropError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn dict_infos(entries: Vec<(Object, Object)>, dir: &Path) -> StateDictInfo {
    let mut out = BTreeMap::new();
    for (k, v) in entries {
        // Non-tensor entries (e.g. the `_metadata` attribute of a state dict) are skipped.
        if let Ok(Some(info)) = v.into_tensor_info(k, dir) {
            out.insert(info.name.clone(), info);
        }
    }
    out
}

fn as_dict(obj: Object) -> Option<Vec<(Object, Object)>> {
    match obj {
        Object::Dict(d) => Some(d),
        // An OrderedDict subclass with extra state, or a dict rebuilt with BUILD.
        Object::Build { callable, .. } => match *callable {
            Object::Dict(d) => Some(d),
            _ => None,
        },
        _ => None,
    }
}

impl PthReader {
    /// Opens a `.pth` zip archive.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, InteropError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| InteropError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut archive = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| corrupt(path, format!("not a PyTorch zip archive: {e}")))?;
        // `torch.save` records the writer's byte order; the storages are read as little-endian
        // (files without the record predate it and were little-endian on every usual machine).
        let record = archive
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .find(|n| n == "byteorder" || n.ends_with("/byteorder"));
        if let Some(name) = record {
            let mut order = String::new();
            archive
                .by_name(&name)
                .map_err(|e| corrupt(path, e))?
                .take(64)
                .read_to_string(&mut order)
                .map_err(|e| corrupt(path, format!("{name}: {e}")))?;
            if order.trim() != "little" {
                return Err(corrupt(
                    path,
                    format!(
                        "{name} says {:?}: only little-endian files can be read (save it again on a little-endian machine)",
                        order.trim()
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            archive,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pickle's top-level dict entries and the folder its storages live in.
    fn top_level(&mut self) -> Result<(Vec<(Object, Object)>, PathBuf), InteropError> {
        let pkl = self
            .archive
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .find(|n| n.ends_with("data.pkl"))
            .ok_or_else(|| corrupt(&self.path, "no data.pkl in the archive"))?;
        let dir = PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
        let mut bytes = Vec::new();
        self.archive
            .by_name(&pkl)
            .map_err(|e| corrupt(&self.path, e))?
            .read_to_end(&mut bytes)
            .map_err(|e| corrupt(&self.path, e))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut bytes.as_slice())
            .map_err(|e| corrupt(&self.path, format!("unreadable pickle: {e}")))?;
        let obj = stack
            .finalize()
            .map_err(|e| corrupt(&self.path, format!("unreadable pickle: {e}")))?;
        let top = as_dict(obj).ok_or_else(|| corrupt(&self.path, "the pickle is not a dict"))?;
        Ok((top, dir))
    }

    /// The state dicts of the file: for a top-level dict, every value that is a dict of tensors
    /// under its key; tensors stored directly at the top level under the key `""`.
    pub fn state_dicts(&mut self) -> Result<BTreeMap<String, StateDictInfo>, InteropError> {
        let (top, dir) = self.top_level()?;
        let mut out = BTreeMap::new();
        let mut loose = Vec::new();
        for (k, v) in top {
            let key = match &k {
                Object::Unicode(s) => s.clone(),
                _ => continue,
            };
            match as_dict(v.clone()) {
                Some(d) => {
                    out.insert(key, dict_infos(d, &dir));
                }
                None => loose.push((k, v)),
            }
        }
        let loose = dict_infos(loose, &dir);
        if !loose.is_empty() {
            out.insert(String::new(), loose);
        }
        Ok(out)
    }

    /// The top-level entries of the file whose key and value are both strings.
    pub fn texts(&mut self) -> Result<BTreeMap<String, String>, InteropError> {
        let (top, _) = self.top_level()?;
        Ok(top
            .into_iter()
            .filter_map(|(k, v)| match (k, v) {
                (Object::Unicode(k), Object::Unicode(v)) => Some((k, v)),
                _ => None,
            })
            .collect())
    }

    /// Reads one tensor on the CPU with its shape, honouring its strides and storage offset.
    pub fn tensor(&mut self, info: &TensorInfo) -> Result<Tensor, InteropError> {
        let path = self.path.clone();
        let name = &info.name;
        let mut bytes = Vec::new();
        self.archive
            .by_name(&info.path)
            .map_err(|e| corrupt(&path, format!("storage of `{name}`: {e}")))?
            .read_to_end(&mut bytes)
            .map_err(|e| corrupt(&path, format!("storage of `{name}`: {e}")))?;
        let elem = info.dtype.size_in_bytes();
        let n_storage = info.storage_size;
        let needed = n_storage.saturating_mul(elem);
        if bytes.len() < needed {
            return Err(corrupt(
                &path,
                format!(
                    "storage of `{name}` has {} bytes, expected {n_storage} elements of {elem} bytes",
                    bytes.len()
                ),
            ));
        }
        let storage =
            Tensor::from_raw_buffer(&bytes[..needed], info.dtype, &[n_storage], &Device::Cpu)
                .map_err(|e| corrupt(&path, format!("storage of `{name}`: {e}")))?;
        // candle's TensorInfo keeps the storage offset in bytes.
        let offset = info.layout.start_offset() / elem;
        let shape = info.layout.dims().to_vec();
        let strides = info.layout.stride().to_vec();
        strided_view(&storage, offset, &shape, &strides)
            .map_err(|e| corrupt(&path, format!("tensor `{name}`: {e}")))
    }
}

/// Builds the contiguous tensor of `shape` whose element `idx` is
/// `storage[offset + sum(idx[k] * strides[k])]`.
pub fn strided_view(
    storage: &Tensor,
    offset: usize,
    shape: &[usize],
    strides: &[usize],
) -> candle_core::Result<Tensor> {
    let Some(numel) = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
        candle_core::bail!("shape {shape:?} overflows")
    };
    let n_storage = storage.elem_count();
    if shape.len() != strides.len() {
        candle_core::bail!("shape {shape:?} and strides {strides:?} differ in rank")
    }
    if numel == 0 {
        return Tensor::zeros(shape, storage.dtype(), storage.device());
    }
    // Checked: the numbers come from the file; an overflow is a corrupt file, not a panic.
    let last = shape
        .iter()
        .zip(strides)
        .try_fold(offset, |acc, (d, s)| {
            (d - 1).checked_mul(*s)?.checked_add(acc)
        })
        .unwrap_or(usize::MAX);
    if last >= n_storage {
        candle_core::bail!("strides {strides:?} with offset {offset} reach element {last} of a storage of {n_storage}")
    }
    // A permutation of a dense C-contiguous block?
    let rank = shape.len();
    let mut perm: Vec<usize> = (0..rank).collect();
    perm.sort_by(|&a, &b| strides[b].cmp(&strides[a]).then(a.cmp(&b)));
    let mut expected = 1usize;
    let mut dense = true;
    for &k in perm.iter().rev() {
        if shape[k] != 1 && strides[k] != expected {
            dense = false;
            break;
        }
        expected *= shape[k];
    }
    if dense {
        let permuted_shape: Vec<usize> = perm.iter().map(|&k| shape[k]).collect();
        let mut inverse = vec![0usize; rank];
        for (j, &k) in perm.iter().enumerate() {
            inverse[k] = j;
        }
        let t = storage.narrow(0, offset, numel)?.reshape(permuted_shape)?;
        return t.permute(inverse)?.contiguous();
    }
    // General case: gather.
    let mut idx = Vec::with_capacity(numel);
    let mut counter = vec![0usize; rank];
    for _ in 0..numel {
        let pos = offset
            + counter
                .iter()
                .zip(strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        idx.push(pos as i64);
        for k in (0..rank).rev() {
            counter[k] += 1;
            if counter[k] < shape[k] {
                break;
            }
            counter[k] = 0;
        }
    }
    let idx = Tensor::from_vec(idx, numel, storage.device())?;
    storage.index_select(&idx, 0)?.reshape(shape)
}

/// Reads every tensor of a state dict, as f32 (integer tensors are skipped).
pub fn read_float_tensors(
    reader: &mut PthReader,
    dict: &StateDictInfo,
) -> Result<BTreeMap<String, Tensor>, InteropError> {
    let mut out = BTreeMap::new();
    for (name, info) in dict {
        if !info.dtype.is_float() {
            continue;
        }
        let t = reader.tensor(info)?;
        let t = t
            .to_dtype(DType::F32)
            .map_err(|e| corrupt(reader.path(), format!("tensor `{name}`: {e}")))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// A value of the top-level dict that [`write_pth`] writes.
#[derive(Clone)]
pub enum PthEntry {
    /// A state dict: an `OrderedDict` of tensors by name, each stored contiguous as f32.
    StateDict(Vec<(String, Tensor)>),
    /// A string.
    Text(String),
}

/// Protocol-2 pickle opcodes, as `pickletools` names them.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const GLOBAL: u8 = b'c';
    pub const REDUCE: u8 = b'R';
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const STOP: u8 = b'.';
}

/// A minimal pickler: just the opcodes a dict of state dicts needs (no memo).
struct Pickler(Vec<u8>);

impl Pickler {
    fn op(&mut self, code: u8) {
        self.0.push(code);
    }
    fn str(&mut self, s: &str) {
        self.op(op::BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        match i32::try_from(v) {
            Ok(v) => {
                self.op(op::BININT);
                self.0.extend_from_slice(&v.to_le_bytes());
            }
            Err(_) => {
                // LONG1: little-endian two's complement; a ninth byte keeps the sign positive.
                self.op(op::LONG1);
                self.0.push(9);
                self.0.extend_from_slice(&(v as u64).to_le_bytes());
                self.0.push(0);
            }
        }
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(op::GLOBAL);
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn int_tuple(&mut self, values: &[usize]) {
        self.op(op::MARK);
        for &v in values {
            self.int(v);
        }
        self.op(op::TUPLE);
    }
    /// `collections.OrderedDict()`, left on the stack for SETITEMS.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(op::EMPTY_TUPLE);
        self.op(op::REDUCE);
    }
    /// `torch._utils._rebuild_tensor_v2` of a contiguous float storage named `key`.
    fn tensor(&mut self, key: &str, shape: &[usize]) {
        let numel = shape.iter().product::<usize>();
        let mut strides = vec![1usize; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            strides[k] = strides[k + 1] * shape[k + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(op::MARK);
        self.op(op::MARK);
        self.str("storage");
        self.global("torch", "FloatStorage");
        self.str(key);
        self.str("cpu");
        self.int(numel);
        self.op(op::TUPLE);
        self.op(op::BINPERSID);
        self.int(0);
        self.int_tuple(shape);
        self.int_tuple(&strides);
        self.op(op::NEWFALSE);
        self.ordered_dict();
        self.op(op::TUPLE);
        self.op(op::REDUCE);
    }
}

/// Writes `entries` as the top-level dict of a `.pth` file, in the layout `torch.save` writes
/// (format version 3, little-endian storages, 64-byte aligned so `torch.load(mmap=True)` works),
/// atomically. The archive's folder is the file's stem.
pub fn write_pth(path: &Path, entries: &[(String, PthEntry)]) -> Result<(), InteropError> {
    let io = |source: std::io::Error| InteropError::Io {
        path: path.to_path_buf(),
        source,
    };
    let candle = |source: candle_core::Error| InteropError::Candle {
        path: path.to_path_buf(),
        source,
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty() && s.is_ascii() && !s.contains(['/', '\\']))
        .unwrap_or_else(|| "archive".into());
    let mut p = Pickler(vec![op::PROTO, 2]);
    let mut storages: Vec<Vec<u8>> = Vec::new();
    p.op(op::EMPTY_DICT);
    p.op(op::MARK);
    for (key, entry) in entries {
        p.str(key);
        match entry {
            PthEntry::Text(text) => p.str(text),
            PthEntry::StateDict(tensors) => {
                p.ordered_dict();
                p.op(op::MARK);
                for (name, t) in tensors {
                    let bytes = crate::export::f32_le_bytes(t).map_err(candle)?;
                    p.str(name);
                    p.tensor(&storages.len().to_string(), t.dims());
                    storages.push(bytes);
                }
                p.op(op::SETITEMS);
            }
        }
    }
    p.op(op::SETITEMS);
    p.op(op::STOP);

    let mut file = simclr_fs::AtomicFile::create(path).map_err(io)?;
    {
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file.file()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64);
        let zip_err = |e: zip::result::ZipError| io(std::io::Error::other(e));
        let record = |zip: &mut zip::ZipWriter<_>, name: String, bytes: &[u8]| {
            zip.start_file(name, stored).map_err(zip_err)?;
            zip.write_all(bytes).map_err(io)
        };
        record(&mut zip, format!("{stem}/data.pkl"), &p.0)?;
        record(&mut zip, format!("{stem}/byteorder"), b"little")?;
        for (i, bytes) in storages.iter().enumerate() {
            record(&mut zip, format!("{stem}/data/{i}"), bytes)?;
        }
        record(&mut zip, format!("{stem}/version"), b"3\n")?;
        zip.finish().map_err(zip_err)?.flush().map_err(io)?;
    }
    file.commit().map_err(io)
}
