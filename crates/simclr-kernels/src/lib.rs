//! The compute kernels of simclr-rs, as candle custom ops.
//!
//! This crate owns the passes where training spends its time, each with a reference
//! composition of candle ops that the tests use as the independent computation:
//!
//! * [`conv`]: 2-D convolution on the CPU as im2col + GEMM (forward, input and weight
//!   gradients), and the layout helpers the other kernels share; [`winograd`]: the wide 3×3
//!   stride-1 layers by Winograd's F(4×4, 3×3) (forward) and F(2×2, 3×3) (kernel gradient)
//!   instead;
//! * [`gemm_bf16`]: products with bf16 operands and f32 accumulation (`--precision bf16` on the
//!   CPU), on AMX tiles where the CPU has them, and [`matrix`]: the strided matrices and the
//!   f32 product the two share;
//! * [`bn_ops`]: training-mode batch normalisation split around the cross-replica sum (moments,
//!   then apply, optionally with ReLU and a residual add), with precision-aware variants;
//! * [`ntxent`]: NT-Xent's row normalisation and masked softmax cross-entropy, forward and
//!   backward in one pass each;
//! * with the `cuda` feature, the GPU twins of the BN and NT-Xent kernels (`src/cuda/kernels.cu`,
//!   compiled to PTX by `build.rs`; on the GPU, convolution is candle's own) and the launch
//!   helpers they share (`cuda`).
//!
//! It does not own layers, networks or losses: `simclr-models` builds its convolution and BN
//! layers on these ops, and `simclr-pretrain` its NT-Xent objective. Nothing here reads files,
//! holds parameters or knows about replicas.
//!
//! Invariants: every op accepts any dtype and device and falls back to its reference
//! composition where no kernel applies (non-f32, non-contiguous, another device); every kernel's
//! result does not depend on the number of threads' work stealing (reductions run over fixed
//! ranges in a fixed order).

mod buffers;
mod switch;

pub mod bn_ops;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm_bf16;
pub mod matrix;
pub mod ntxent;
pub mod winograd;
