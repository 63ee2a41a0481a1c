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
    refuse_special_target(path).map_err(|e| DataError::io(path, e))?;
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

/// An atomic write replaces what is at `path` by rename: fine for a regular file, wrong for a
/// symlink (the link would become a file and its target keep the old contents) or a device node
/// (`/dev/full` would become a file). Those are refused; a missing path or a regular file is
/// fine.
pub fn refuse_special_target(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a symbolic link; refusing to replace it (write to the file it points to)",
        )),
        Ok(m) if !m.is_file() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file; refusing to replace it",
        )),
        _ => Ok(()),
    }
}
