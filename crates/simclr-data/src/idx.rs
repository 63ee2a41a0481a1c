//! The IDX format of MNIST and Fashion-MNIST (raw or gzip-compressed).
//!
//! Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
//! dimension as a big-endian u32. Images are `n × rows × cols`, labels `n`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::read_file;
use crate::{DataError, Image, InMemoryDataset, Result};

pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Decompresses when the bytes start with the gzip magic, so `.gz` and raw files both work.
pub fn maybe_gunzip(path: &Path, bytes: Vec<u8>) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("corrupt or truncated gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses an IDX file held in memory; `path` only names it in errors.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(DataError::format(path, "file too short for an IDX header"));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::format(
            path,
            format!(
                "bad IDX magic number {:02x}{:02x}{:02x}{:02x}: the first two bytes must be zero",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::format(
            path,
            format!(
                "IDX element type 0x{:02x} is not supported (only 0x08, unsigned byte)",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err(DataError::format(path, "IDX file declares zero dimensions"));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::format(
            path,
            format!("truncated IDX header: {ndims} dimensions need {header} bytes"),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::format(path, format!("IDX dimensions {dims:?} overflow")))?;
    let found = bytes.len() - header;
    if found != expected {
        return Err(DataError::format(
            path,
            format!(
                "IDX dimensions {dims:?} need {expected} data bytes but the file has {found} ({})",
                if found < expected {
                    "truncated"
                } else {
                    "trailing data"
                }
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = maybe_gunzip(path, read_file(path)?)?;
    parse_idx(path, &bytes)
}

/// Serialises an unsigned-byte IDX array (used to write the embedded subset and test files).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    assert_eq!(dims.iter().product::<usize>(), data.len());
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Builds a dataset from an image file (`n × rows × cols`) and a label file (`n`).
pub fn idx_dataset_from_arrays(
    images_path: &Path,
    images: IdxArray,
    labels_path: &Path,
    labels: IdxArray,
    class_names: Vec<String>,
) -> Result<InMemoryDataset> {
    if images.dims.len() != 3 {
        return Err(DataError::format(
            images_path,
            format!(
                "an IDX image file has 3 dimensions (n, rows, cols), found {:?}",
                images.dims
            ),
        ));
    }
    if labels.dims.len() != 1 {
        return Err(DataError::format(
            labels_path,
            format!("an IDX label file has 1 dimension, found {:?}", labels.dims),
        ));
    }
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if h == 0 || w == 0 {
        return Err(DataError::format(
            images_path,
            format!("images of {h}×{w} pixels (dimensions {:?})", images.dims),
        ));
    }
    if labels.dims[0] != n {
        return Err(DataError::format(
            labels_path,
            format!(
                "{} labels for {n} images in {}",
                labels.dims[0],
                images_path.display()
            ),
        ));
    }
    if let Some((i, &l)) = labels
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= class_names.len())
    {
        return Err(DataError::format(
            labels_path,
            format!(
                "label {l} of image {i} is out of range ({} classes)",
                class_names.len()
            ),
        ));
    }
    let imgs = images
        .data
        .chunks_exact(h * w)
        .map(|c| Image::new(h, w, 1, c.to_vec()))
        .collect();
    Ok(InMemoryDataset::new(
        imgs,
        labels.data.iter().map(|&l| l as usize).collect(),
        class_names,
        format!("IDX {}", images_path.display()),
    ))
}

/// The two files of one MNIST-style split in `dir`, `.gz` or raw.
pub fn idx_split_paths(dir: &Path, train: bool) -> Option<(PathBuf, PathBuf)> {
    let stem = if train { "train" } else { "t10k" };
    for ext in ["", ".gz"] {
        let images = dir.join(format!("{stem}-images-idx3-ubyte{ext}"));
        let labels = dir.join(format!("{stem}-labels-idx1-ubyte{ext}"));
        if images.is_file() && labels.is_file() {
            return Some((images, labels));
        }
    }
    None
}

/// Reads an MNIST-layout folder; `class_names` are the dataset's ten names.
pub fn read_idx_dir(dir: &Path, train: bool, class_names: &[&str]) -> Result<InMemoryDataset> {
    let (ip, lp) = idx_split_paths(dir, train).ok_or_else(|| {
        DataError::format(
            dir,
            format!(
                "no {0}-images-idx3-ubyte[.gz] + {0}-labels-idx1-ubyte[.gz] pair here",
                if train { "train" } else { "t10k" }
            ),
        )
    })?;
    idx_dataset_from_arrays(
        &ip,
        read_idx(&ip)?,
        &lp,
        read_idx(&lp)?,
        class_names.iter().map(|s| s.to_string()).collect(),
    )
}
