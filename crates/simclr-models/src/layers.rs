//! Convolution and dense layers with the official conventions.
//!
//! * [`Conv2d`]: no bias, kernel stored OIHW (`[out, in, kh, kw]`). Stride 1 uses TF `SAME`
//!   padding and stride > 1 uses TF `FixedPadding` (`(k-1)//2` before, the rest after) then a
//!   `VALID` convolution; for the odd kernels of the network (1, 3, 7) both are a symmetric
//!   padding of `(k-1)/2` (the official tf2/resnet.py, `Conv2dFixedPadding`). Initialised with [`crate::init::conv_init`]. On the
//!   CPU in f32 it runs as im2col + GEMM (`simclr_kernels::conv`).
//! * [`Dense`]: weight stored `[out, in]` (the candle/PyTorch orientation, i.e. the transpose
//!   of a TF kernel), optional bias, initialised N(0, 0.01).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::init::{conv_init, dense_init};
use crate::precision::bf16_product;
use simclr_kernels::conv::{ConvGeometry, Products};

/// A bias-free 2-D convolution with TF fixed/SAME padding.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    kernel: usize,
    stride: usize,
    products: Products,
}

impl Conv2d {
    /// Creates `prefix.weight` of shape `[out, in, k, k]`. `kernel` must be odd.
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        if kernel.is_multiple_of(2) || stride == 0 {
            candle_core::bail!(
                "Conv2d needs an odd kernel and a stride >= 1, got k={kernel} s={stride}"
            )
        }
        let weight = vb.get_with_hints((out_ch, in_ch, kernel, kernel), "weight", conv_init())?;
        Ok(Self {
            weight,
            kernel,
            stride,
            products: Products::F32,
        })
    }

    /// The kernel, OIHW.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Stride of the convolution.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The arithmetic of the products when the input is f32 (bf16 activations always multiply
    /// in bf16): [`Products::Bf16`] is how `--precision bf16` runs on the CPU, with f32
    /// activations (see the `precision` module).
    pub fn set_products(&mut self, products: Products) {
        self.products = products;
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // SAME (stride 1) and FixedPadding (stride > 1) agree for odd kernels: (k-1)/2 each side.
        let pad = (self.kernel - 1) / 2;
        let geometry = ConvGeometry::symmetric(self.kernel, self.stride, pad);
        if self.products == Products::Bf16 && x.dtype() == candle_core::DType::F32 {
            return simclr_kernels::conv::conv2d_products(x, &self.weight, geometry, self.products);
        }
        bf16_product(x, &cast_like(&self.weight, x)?, |x, w| {
            simclr_kernels::conv::conv2d(x, w, geometry)
        })
    }
}

/// `w` in the dtype of the activation `x` (mixed precision: f32 master weights, bf16
/// products; see [`crate::precision`]). Differentiable; a no-op when the dtypes agree.
fn cast_like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        Ok(w.clone())
    } else {
        w.to_dtype(x.dtype())
    }
}

/// A dense layer `y = x W^T (+ b)`.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    /// Creates `prefix.weight` `[out, in]` (N(0, 0.01)) and, when `bias`, `prefix.bias` (zeros).
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", dense_init())?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = bf16_product(x, &cast_like(&self.weight, x)?, |x, w| x.matmul(&w.t()?))?;
        match &self.bias {
            Some(b) => y.broadcast_add(&cast_like(b, x)?),
            None => Ok(y),
        }
    }
}
