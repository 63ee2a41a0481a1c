//! The CIFAR-10 and CIFAR-100 binary versions.
//!
//! CIFAR-10: `data_batch_{1..5}.bin` and `test_batch.bin`, records of 1 label byte + 3072 pixel
//! bytes (R, G, B planes of 32×32), class names in `batches.meta.txt`.
//! CIFAR-100: `train.bin` and `test.bin`, records of a coarse and a fine label byte + 3072 bytes,
//! names in `coarse_label_names.txt` / `fine_label_names.txt`.

use std::path::Path;

use crate::dataset::read_file;
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
        let planes = &rec[kind.label_bytes()..];
        let mut hwc = Vec::with_capacity(PIXELS);
        for p in 0..1024 {
            hwc.extend_from_slice(&[planes[p], planes[1024 + p], planes[2048 + p]]);
        }
        images.push(Image::new(32, 32, 3, hwc));
        labels.push(label);
    }
    Ok(())
}

fn class_names(dir: &Path, kind: CifarKind) -> Result<Vec<String>> {
    let file = match kind {
        CifarKind::Cifar10 => "batches.meta.txt",
        CifarKind::Cifar100Fine => "fine_label_names.txt",
        CifarKind::Cifar100Coarse => "coarse_label_names.txt",
    };
    let path = dir.join(file);
    if !path.is_file() {
        // The names file is a convenience: CIFAR-10's are fixed, CIFAR-100's fall back to numbers.
        return Ok(match kind {
            CifarKind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            _ => (0..kind.num_classes()).map(|i| i.to_string()).collect(),
        });
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
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in kind.files(train) {
        let path = dir.join(&f);
        parse_cifar_file(&path, &read_file(&path)?, kind, &mut images, &mut labels)?;
    }
    Ok(InMemoryDataset::new(
        images,
        labels,
        class_names(dir, kind)?,
        format!(
            "{kind:?} {} ({})",
            dir.display(),
            if train { "train" } else { "test" }
        ),
    ))
}
