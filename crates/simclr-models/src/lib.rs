//! SimCLRv2 networks for candle.
//!
//! This crate owns the model side of simclr-rs:
//!
//! * the architecture, exactly as the official code defines it — ResNet-18/34/50/101/152/200 at
//!   any integer width, selective kernels with the ResNet-D stem and shortcut ("SK1"), the
//!   CIFAR stem, TF `SAME` pooling and fixed padding, BN with eps 1e-5 and decay 0.9,
//!   zero-initialised last gamma in every block ([`resnet`], [`sk`], [`pool`], [`batch_norm`],
//!   [`layers`]), with a fast CPU convolution as im2col + GEMM custom ops ([`conv`]) and
//!   training-mode BN as fused kernels on the CPU and, with the `cuda` feature, the GPU
//!   ([`bn_ops`], `cuda`);
//! * the projection head, the supervised head, `ft_proj_selector` and
//!   `fine_tune_after_block` ([`heads`], [`model`]);
//! * the official initialisers ([`init`]);
//! * the configuration with its official flag names ([`config`]);
//! * the table of parameter groups an optimizer needs and the parameter counts ([`params`]);
//! * self-describing safetensors checkpoints ([`checkpoint`]);
//! * import of the official weights: the widely used converter's PyTorch files
//!   ([`import_pth`], on top of a strided `.pth` reader, [`pth`]) and the official TensorFlow 1
//!   checkpoints, online or `ema_model/` copy ([`import_tf`], on top of a reader of TF's
//!   tensor-bundle format that needs no TensorFlow, [`tf_bundle`]);
//! * export: the converter's `.pth` layout (read back by the importer, opened by `torch.load`)
//!   and a Hugging Face-style folder ([`export`]), and the eval-mode network as ONNX
//!   ([`onnx`]).
//!
//! It does not own optimizers, losses, learning-rate schedules, training or evaluation loops,
//! data loading or augmentation, nor the command line: those live in the crates that use it.
//!
//! Layout conventions: images are NCHW f32 in [0, 1] (no mean/std normalisation, as the
//! official models expect); conv kernels are OIHW; dense weights are `[out, in]`.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use candle_nn::VarMap;
//! use simclr_models::{ModelConfig, SimclrModel};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ModelConfig { resnet_depth: 18, ..ModelConfig::default() }.with_image_size(32);
//! let varmap = VarMap::new();
//! let model = SimclrModel::init(&config, &varmap, 0, &Device::Cpu)?;
//! let x = Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &Device::Cpu)?;
//! let out = model.forward(&x, false)?;
//! println!("{:?}", out.proj_head_output.shape());
//! # Ok(()) }
//! ```

pub mod allocator;
pub mod batch_norm;
pub mod bn_ops;
mod buffers;
pub mod checkpoint;
pub mod config;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod export;
pub mod heads;
pub mod import_pth;
pub mod import_tf;
pub mod init;
pub mod layers;
pub mod model;
pub mod onnx;
pub mod params;
pub mod pool;
pub mod precision;
pub mod pth;
pub mod resnet;
pub mod sk;
pub mod tf_bundle;

pub use allocator::tune_allocator;
pub use batch_norm::BnMode;
pub use checkpoint::{Checkpoint, CheckpointError, CheckpointMeta};
pub use config::{BlockKind, ModelConfig, ProjHeadMode, StemKind};
pub use error::ModelError;
pub use export::{export_hf, export_pth, pth_file_name, ExportError};
pub use import_pth::{import_pth, ImportError, ImportedModel, SourceFormat, SourceName};
pub use import_tf::{import_tf1, import_tf1_named};
pub use model::{ForwardOptions, ModelOutput, SimclrModel};
pub use onnx::export_onnx;
pub use params::{num_parameters, param_group, parameter_shapes, ParamGroup, ParameterCount};
pub use precision::Precision;
pub use tf_bundle::{TfBundle, TfBundleError};
