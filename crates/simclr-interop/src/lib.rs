//! SimCLRv2 weights in and out of simclr-rs.
//!
//! This crate owns the formats other implementations use:
//!
//! * import of the official weights: the TF1 → PyTorch converter's `.pth` files
//!   ([`import_pth()`], on top of a reader of the zip `torch.save` writes, [`pth`]) and the
//!   official TensorFlow 1 checkpoints, online or `ema_model/` copy ([`import_tf1`], on top of a
//!   reader of TF's tensor-bundle format that needs no TensorFlow, [`tf_bundle`]); what both
//!   share — the converter's file-name convention, the inference of the architecture from the
//!   tensor shapes and its check against the name — lives once, in [`source`];
//! * export: the converter's `.pth` layout (read back by the importer, opened by `torch.load`)
//!   and a Hugging Face-style folder ([`export`]), and the eval-mode network as ONNX ([`onnx`]).
//!
//! Every failure is an [`InteropError`] naming its file. It does not own the network, its
//! configuration or the project's own checkpoint format (`simclr-models`): an import ends in
//! a [`simclr_models::SimclrModel`] on a `VarMap`, an export starts from one.
//!
//! Invariants: a bad file is an error naming it, never a panic (the readers are fuzzed with
//! mutated files, `cargo xtask fuzz`); writers go through `simclr-fs`'s atomic writer, so a
//! failed export leaves no partial file.

mod error;

pub mod export;
pub mod import_pth;
pub mod import_tf;
pub mod onnx;
pub mod pth;
pub mod source;
pub mod tf_bundle;

pub use error::InteropError;
pub use export::{export_hf, export_pth, pth_file_name};
pub use import_pth::import_pth;
pub use import_tf::{import_tf1, import_tf1_named};
pub use onnx::export_onnx;
pub use source::{ImportedModel, SourceFormat, SourceName};
pub use tf_bundle::{TfBundle, TfBundleError};
