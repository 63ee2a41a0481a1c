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
pub mod pickle;
pub mod source;
pub mod split;

pub use dataset::{Dataset, InMemoryDataset, SubsetDataset};
pub use error::{DataError, Result};
pub use folder::ImageFolder;
pub use image::{FImage, Image};
pub use loader::{Batch, Loader, LoaderConfig, Preprocess};
pub use source::{load_dataset, DataOptions, DatasetName, Split};

use std::path::Path;

/// Writes `bytes` to `path` atomically and durably ([`simclr_fs::write_atomic`]), with the
/// error naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    simclr_fs::write_atomic(path, bytes).map_err(|e| DataError::io(path, e))
}
