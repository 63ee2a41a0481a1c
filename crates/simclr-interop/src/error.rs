//! The one error type of the crate's importers and exporters.

use std::path::{Path, PathBuf};

use simclr_models::{CheckpointError, ModelError};

use crate::tf_bundle::TfBundleError;

/// Why an import or an export failed: reading a converter `.pth` file or a TF1 checkpoint, or
/// writing a `.pth`, ONNX or Hugging Face copy of a model. Every variant names its file.
#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    /// The file could not be opened, read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a readable PyTorch file (truncated zip, bad pickle, short storage).
    #[error("{}: not a readable PyTorch file (truncated or corrupt): {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The file name does not follow `r{depth}_{w}x_sk{0|1}[_ema].pth`.
    #[error("file name `{name}` does not match r{{depth}}_{{w}}x_sk{{0|1}}[_ema].pth: {reason}")]
    FileName {
        /// The file name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A top-level key (`resnet` or `head`) is absent.
    #[error("{}: no `{key}` state dict in the file", .path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{}: tensor `{name}` is missing", .path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The converter's name (`resnet/...` or `head/...`).
        name: String,
    },
    /// A tensor's shape does not fit the architecture.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", .path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The converter's name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor that the architecture does not have.
    #[error("{}: unexpected tensor `{name}`", .path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The converter's name.
        name: String,
    },
    /// The file name and the tensor shapes disagree.
    #[error("{}: the file name says {from_name} but the tensors say {from_shapes} ({what})", .path.display())]
    Contradiction {
        /// The file.
        path: PathBuf,
        /// What disagrees (depth, SK, width, ...).
        what: String,
        /// What the name says.
        from_name: String,
        /// What the shapes say.
        from_shapes: String,
    },
    /// The tensors do not form a SimCLRv2 network this crate can build, or the model cannot
    /// be written in the format asked for.
    #[error("{}: {reason}", .path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The inferred configuration is invalid.
    #[error("{}: {source}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The validation error.
        source: ModelError,
    },
    /// A tensor operation failed.
    #[error("{}: {source}", .path.display())]
    Candle {
        /// The file.
        path: PathBuf,
        /// The candle error.
        source: candle_core::Error,
    },
    /// A TF tensor bundle could not be read (truncated or corrupt index or data shard, bad
    /// magic, checksum mismatch, unsupported dtype).
    #[error(transparent)]
    Bundle(#[from] TfBundleError),
    /// The `ema_model/` copy was asked for, but the TF1 checkpoint has none.
    #[error("{}: the checkpoint has no `ema_model/` copy of the weights; import the online weights instead (ema = false)", .path.display())]
    NoEmaCopy {
        /// The index file.
        path: PathBuf,
    },
    /// A checkpoint (the source of an export, or the weights-only copy it writes) could not be
    /// read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl InteropError {
    /// [`InteropError::Unsupported`] for `path`.
    pub(crate) fn unsupported(path: &Path, reason: impl Into<String>) -> Self {
        Self::Unsupported {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// [`InteropError::Corrupt`] for `path`.
    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
