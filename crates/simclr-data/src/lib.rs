//! # simclr-data
//!
//! Owns everything between files on disk and the network's input tensors: dataset readers (IDX,
//! CIFAR binary, ImageFolder/ImageNet, Hugging Face Hub parquet, the committed Fashion-MNIST
//! subset) behind one [`Dataset`] trait, label-fraction splits and the official split-file format,
//! the SimCLR augmentations, and the prefetching batch [`Loader`].
//!
//! It does not own models, losses, optimizers or training loops; those live in
//! `simclr-models` and the stage crates, which receive [`Batch`]es of candle tensors from here.

pub mod augment;
pub mod cifar;
mod dataset;
mod error;
pub mod folder;
pub mod hub;
pub mod idx;
mod image;
pub mod loader;
pub mod source;
pub mod split;

pub use dataset::{Dataset, InMemoryDataset, SubsetDataset};
pub use error::{DataError, Result};
pub use folder::ImageFolder;
pub use image::{FImage, Image};
pub use loader::{Batch, Loader, LoaderConfig, Preprocess};
pub use source::{load_dataset, DataOptions, DatasetName, Split};

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a half-written file and an earlier version survives a failed write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::io(path, e)
    })
}
