//! SimCLRv2 networks for candle.
//!
//! This crate owns the model side of simclr-rs:
//!
//! * the architecture, exactly as the official code defines it — ResNet-18/34/50/101/152/200 at
//!   any integer width, selective kernels with the ResNet-D stem and shortcut ("SK1"), the
//!   CIFAR stem, TF `SAME` pooling and fixed padding, BN with eps 1e-5 and decay 0.9,
//!   zero-initialised last gamma in every block ([`ResNet`], [`SkConv`], [`pool`], [`batch_norm`],
//!   [`layers`]); its convolutions and training-mode BN run on the kernels of `simclr-kernels`;
//! * the projection head, the supervised head, `ft_proj_selector` and
//!   `fine_tune_after_block` ([`ProjectionHead`], [`SupervisedHead`], [`SimclrModel`]);
//! * the official initialisers ([`init`]);
//! * the configuration with its official flag names ([`ModelConfig`]);
//! * the table of parameter groups an optimizer needs and the parameter counts ([`ParamGroup`],
//!   [`num_parameters`]);
//! * mixed precision ([`Precision`]);
//! * self-describing safetensors checkpoints ([`checkpoint`]) and the names of the stages that
//!   write them ([`Stage`]).
//!
//! Other formats (the official TF1 checkpoints, the converter's `.pth`, ONNX, Hugging Face
//! folders) are `simclr-interop`'s; the kernels are `simclr-kernels`'.
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

// The public surface is deliberate: the model, its configuration and errors are re-exported
// here; `checkpoint` stays a module because its functions are verbs on files
// (`checkpoint::load`, `checkpoint::save`); `batch_norm`, `init`, `layers` and `pool` stay
// modules as building blocks for other candle networks that want the official code's BN,
// initialisers and TF `SAME` pooling. The rest is private.
pub mod batch_norm;
pub mod checkpoint;
mod config;
mod error;
mod heads;
pub mod init;
pub mod layers;
mod model;
mod params;
pub mod pool;
mod precision;
mod resnet;
mod sk;
mod stage;

pub use batch_norm::BnMode;
pub use checkpoint::{Checkpoint, CheckpointError, CheckpointMeta};
pub use config::{
    BlockKind, ModelConfig, ProjHeadMode, StemKind, SK1_RATIO, SK_MIN_DIM, SUPPORTED_DEPTHS,
};
pub use error::ModelError;
pub use heads::{ProjectionHead, SupervisedHead};
pub use model::{ForwardOptions, ModelOutput, SimclrModel};
pub use params::{num_parameters, param_group, parameter_shapes, ParamGroup, ParameterCount};
pub use precision::Precision;
pub use resnet::{Block, BlockGroup, Projection, ResNet, ResNetEndpoints, Stem, StemOutput};
pub use sk::SkConv;
pub use stage::{Stage, UnknownStage};
