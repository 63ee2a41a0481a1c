//! CIFAR-10 and CIFAR-100, in the binary version and in the python version.
//!
//! Binary, CIFAR-10: `data_batch_{1..5}.bin` and `test_batch.bin`, records of 1 label byte + 3072
//! pixel bytes (R, G, B planes of 32×32), class names in `batches.meta.txt`.
//! Binary, CIFAR-100: `train.bin` and `test.bin`, records of a coarse and a fine label byte + 3072
//! bytes, names in `coarse_label_names.txt` / `fine_label_names.txt`.
//!
//! Python (what torchvision downloads: `cifar-10-batches-py/`, `cifar-100-python/`): the same
//! splits as pickled dicts (`data_batch_{1..5}`, `test_batch`; `train`, `test`), each with `data`
//! (a numpy uint8 array `[N, 3072]` of the same planes) and `labels` (CIFAR-10) or `fine_labels`
//! and `coarse_labels` (CIFAR-100); class names in the pickled `batches.meta` (`label_names`) or
//! `meta` (`fine_label_names`, `coarse_label_names`). Read with [`crate::pickle`].

use std::path::Path;

use crate::dataset::read_file;
use crate::pickle::{ndarray_bytes, unpickle, Value};
use crate::{DataError, Image, InMemoryDataset, Result};

const PIXELS: usize = 32 * 32 * 3;

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    /// CIFAR-100 with its 100 fine labels.
    Cifar100Fine,
    /// CIFAR-100 with its 20 coarse labels.
    Cifar100Coarse,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            _ => 2,
        }
    }
    fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100Fine => 100,
            CifarKind::Cifar100Coarse => 20,
        }
    }
    fn files(self, train: bool) -> Vec<String> {
        match (self, train) {
            (CifarKind::Cifar10, true) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            (CifarKind::Cifar10, false) => vec!["test_batch.bin".into()],
            (_, true) => vec!["train.bin".into()],
            (_, false) => vec!["test.bin".into()],
        }
    }
}

/// Appends the records of one binary file to `images` / `labels`.
pub fn parse_cifar_file(
    path: &Path,
    bytes: &[u8],
    kind: CifarKind,
    images: &mut Vec<Image>,
    labels: &mut Vec<usize>,
) -> Result<()> {
    let record = kind.label_bytes() + PIXELS;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(DataError::format(
            path,
            format!(
                "size {} is not a whole number of {record}-byte CIFAR records (truncated or not a {kind:?} file)",
                bytes.len()
            ),
        ));
    }
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = match kind {
            CifarKind::Cifar10 => rec[0],
            CifarKind::Cifar100Coarse => rec[0],
            CifarKind::Cifar100Fine => rec[1],
        } as usize;
        if label >= kind.num_classes() {
            return Err(DataError::format(
                path,
                format!(
                    "record {i}: label {label} is out of range for {kind:?} ({} classes)",
                    kind.num_classes()
                ),
            ));
        }
        push_image(&rec[kind.label_bytes()..], label, images, labels);
    }
    Ok(())
}

/// One 32×32 image from its R, G, B planes.
fn push_image(planes: &[u8], label: usize, images: &mut Vec<Image>, labels: &mut Vec<usize>) {
    let mut hwc = Vec::with_capacity(PIXELS);
    for p in 0..1024 {
        hwc.extend_from_slice(&[planes[p], planes[1024 + p], planes[2048 + p]]);
    }
    images.push(Image::new(32, 32, 3, hwc));
    labels.push(label);
}

impl CifarKind {
    fn py_files(self, train: bool) -> Vec<String> {
        self.files(train)
            .into_iter()
            .map(|f| f.trim_end_matches(".bin").to_string())
            .collect()
    }
    fn py_label_key(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "labels",
            CifarKind::Cifar100Fine => "fine_labels",
            CifarKind::Cifar100Coarse => "coarse_labels",
        }
    }
    fn py_meta(self) -> (&'static str, &'static str) {
        match self {
            CifarKind::Cifar10 => ("batches.meta", "label_names"),
            CifarKind::Cifar100Fine => ("meta", "fine_label_names"),
            CifarKind::Cifar100Coarse => ("meta", "coarse_label_names"),
        }
    }
}

/// Appends the images of one pickled batch (python version) to `images` / `labels`.
pub fn parse_cifar_py_file(
    path: &Path,
    bytes: &[u8],
    kind: CifarKind,
    images: &mut Vec<Image>,
    labels: &mut Vec<usize>,
) -> Result<()> {
    let bad = |why: String| DataError::format(path, why);
    let batch = unpickle(path, bytes)?;
    let data = batch
        .get("data")
        .ok_or_else(|| bad("no `data` entry (not a CIFAR python batch)".into()))?;
    let (shape, dtype, pixels) =
        ndarray_bytes(data).ok_or_else(|| bad("`data` is not a numpy array in C order".into()))?;
    if dtype.trim_start_matches('|') != "u1" || shape.len() != 2 || shape[1] != PIXELS {
        return Err(bad(format!(
            "`data` is a {dtype} array of shape {shape:?}, expected uint8 [N, {PIXELS}]"
        )));
    }
    let n = shape[0];
    if n.checked_mul(PIXELS) != Some(pixels.len()) {
        return Err(bad(format!(
            "`data` holds {} bytes for {n} images of {PIXELS} (truncated)",
            pixels.len()
        )));
    }
    let key = kind.py_label_key();
    let Some(Value::List(found)) = batch.get(key) else {
        return Err(bad(format!("no `{key}` list (not a {kind:?} batch)")));
    };
    if found.len() != n {
        return Err(bad(format!("{} labels for {n} images", found.len())));
    }
    for (i, (label, planes)) in found.iter().zip(pixels.chunks_exact(PIXELS)).enumerate() {
        let label = match label {
            Value::Int(l) if (0..kind.num_classes() as i64).contains(l) => *l as usize,
            other => {
                return Err(bad(format!(
                    "image {i}: label {other:?} is not a class of {kind:?} ({} classes)",
                    kind.num_classes()
                )))
            }
        };
        push_image(planes, label, images, labels);
    }
    Ok(())
}

/// Class names from the python version's pickled meta file (numbers for CIFAR-100 and the
/// fixed names for CIFAR-10 when it is absent).
fn py_class_names(dir: &Path, kind: CifarKind) -> Result<Vec<String>> {
    let (file, key) = kind.py_meta();
    let path = dir.join(file);
    if !path.is_file() {
        return Ok(default_names(kind));
    }
    let meta = unpickle(&path, &read_file(&path)?)?;
    let names: Option<Vec<String>> = match meta.get(key) {
        Some(Value::List(items)) => items.iter().map(Value::text).collect(),
        _ => None,
    };
    match names {
        Some(n) if n.len() == kind.num_classes() => Ok(n),
        _ => Err(DataError::format(
            &path,
            format!("no list of {} names under `{key}`", kind.num_classes()),
        )),
    }
}

/// Reads the train or test split of a CIFAR python folder (`cifar-10-batches-py/` or
/// `cifar-100-python/`).
pub fn read_cifar_py_dir(dir: &Path, kind: CifarKind, train: bool) -> Result<InMemoryDataset> {
    let files = kind.py_files(train);
    let names = py_class_names(dir, kind)?;
    read_split(
        dir,
        kind,
        train,
        files,
        parse_cifar_py_file,
        names,
        ", python version",
    )
}

fn class_names(dir: &Path, kind: CifarKind) -> Result<Vec<String>> {
    let file = match kind {
        CifarKind::Cifar10 => "batches.meta.txt",
        CifarKind::Cifar100Fine => "fine_label_names.txt",
        CifarKind::Cifar100Coarse => "coarse_label_names.txt",
    };
    let path = dir.join(file);
    if !path.is_file() {
        // The names file is a convenience.
        return Ok(default_names(kind));
    }
    let text = String::from_utf8(read_file(&path)?)
        .map_err(|_| DataError::format(&path, "class-name file is not UTF-8"))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != kind.num_classes() {
        return Err(DataError::format(
            &path,
            format!(
                "{} class names, expected {}",
                names.len(),
                kind.num_classes()
            ),
        ));
    }
    Ok(names)
}

/// Reads the train or test split of a CIFAR binary folder (`cifar-10-batches-bin/` or
/// `cifar-100-binary/`).
pub fn read_cifar_dir(dir: &Path, kind: CifarKind, train: bool) -> Result<InMemoryDataset> {
    let names = class_names(dir, kind)?;
    read_split(
        dir,
        kind,
        train,
        kind.files(train),
        parse_cifar_file,
        names,
        "",
    )
}

type ParseFile = fn(&Path, &[u8], CifarKind, &mut Vec<Image>, &mut Vec<usize>) -> Result<()>;

/// The images of `files` in `dir`, each parsed by `parse`, as one dataset.
fn read_split(
    dir: &Path,
    kind: CifarKind,
    train: bool,
    files: Vec<String>,
    parse: ParseFile,
    names: Vec<String>,
    version: &str,
) -> Result<InMemoryDataset> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let path = dir.join(&f);
        parse(&path, &read_file(&path)?, kind, &mut images, &mut labels)?;
    }
    let split = if train { "train" } else { "test" };
    Ok(InMemoryDataset::new(
        images,
        labels,
        names,
        format!("{kind:?} {} ({split}{version})", dir.display()),
    ))
}

/// The names used when a folder has no names file: CIFAR-10's fixed ones, numbers for
/// CIFAR-100.
fn default_names(kind: CifarKind) -> Vec<String> {
    match kind {
        CifarKind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        _ => (0..kind.num_classes()).map(|i| i.to_string()).collect(),
    }
}
