//! Mixed precision: the dtype convolutions and matmuls compute in.
//!
//! With [`Precision::Bf16`] the input image is cast to bf16 and every convolution and dense
//! layer casts its f32 weight to the dtype of its input, so the products run in bf16 while the
//! variables (the master weights the optimizer updates) stay f32: the casts are differentiable,
//! and the gradients arrive in f32. Batch normalisation computes its statistics, moving averages
//! and affine parameters in f32 whatever the activation dtype ([`simclr_kernels::bn_ops::stats_dtype`]),
//! and the model's outputs (features, projections, logits) are cast back to f32, so losses are
//! f32. There is no loss scaling: bf16 has f32's exponent range.
//!
//! That is the GPU's bf16. On the CPU the activations stay f32: every convolution rounds its
//! operands to bf16 as it packs them and accumulates in f32 ([`simclr_kernels::gemm_bf16`]), on
//! Intel AMX tiles where the CPU has them and through the f32 GEMM on bf16-rounded copies elsewhere. bf16 activations on the CPU
//! would halve the memory traffic but send BN through candle's slow bf16 ops, and candle's CPU
//! back end has no bf16 matmul. The dense layers (heads, a few thousandths of the FLOPs) stay
//! f32 on the CPU. `SimclrModel::with_gpu_bf16_numerics` brings the GPU's numerics to the CPU
//! (bf16 activations, [`bf16_product`]: operands rounded to bf16, products in f32, result rounded
//! to bf16), slowly, for the CPU side of a CPU/GPU parity check.

use std::str::FromStr;

use candle_core::DType;
use serde::{Deserialize, Serialize};

/// The compute dtype of convolutions and matmuls (`--precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 products with f32 master weights, BN statistics and losses.
    Bf16,
}

impl Precision {
    /// Whether this is the default, f32 (configs leave it out of their JSON then, so that
    /// their hashes stay those of configs written before the setting existed).
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The dtype activations travel in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// `f(x, w)` for a bf16 activation `x` and a bf16 weight `w`: directly where the device has
/// bf16 kernels, through f32 on the CPU (see the module documentation). Other dtypes call `f`.
pub fn bf16_product(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    f: impl Fn(&candle_core::Tensor, &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
) -> candle_core::Result<candle_core::Tensor> {
    if x.dtype() == DType::BF16 && x.device().is_cpu() {
        let up = |t: &candle_core::Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        f(&up(x)?, &up(w)?)?.to_dtype(DType::BF16)
    } else {
        f(x, w)
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?}: expected f32 or bf16")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}
