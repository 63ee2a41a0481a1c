//! Reading tensors from PyTorch `.pth` files (the zip format of `torch.save`), strides included.
//!
//! The pickle is parsed with candle's reader (`candle_core::pickle`). Tensor data is read here
//! rather than with `PthTensors::get`, which refuses tensors that are neither C- nor
//! Fortran-contiguous: the converter of the official weights stores every conv kernel as a
//! permuted view of a TF HWIO buffer and every dense kernel as a transposed view, so the
//! strides must be honoured. A stride pattern that is a permutation of a contiguous layout is
//! rebuilt with reshape + permute; any other pattern is gathered element by element.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

use crate::import_pth::ImportError;

/// A state dict's tensors by name (metadata only; data is read on demand).
pub type StateDictInfo = BTreeMap<String, TensorInfo>;

/// An open `.pth` file.
pub struct PthReader {
    path: PathBuf,
    archive: zip::ZipArchive<BufReader<File>>,
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> ImportError {
    ImportError::Corrupt {
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
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImportError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| ImportError::Io {
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

    /// The state dicts of the file: for a top-level dict, every value that is a dict of tensors
    /// under its key; tensors stored directly at the top level under the key `""`.
    pub fn state_dicts(&mut self) -> Result<BTreeMap<String, StateDictInfo>, ImportError> {
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

    /// Reads one tensor on the CPU with its shape, honouring its strides and storage offset.
    pub fn tensor(&mut self, info: &TensorInfo) -> Result<Tensor, ImportError> {
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
) -> Result<BTreeMap<String, Tensor>, ImportError> {
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
