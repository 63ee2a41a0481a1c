//! The selective-kernel convolution of SimCLRv2 (the official tf2/resnet.py, `SK_Conv2D`).
//!
//! For `f` filters and stride `s`: one 3x3/s conv to `2f` channels + BN-ReLU; the result is split
//! into two `f`-channel streams (both 3x3, not SKNet's 3x3 + dilated 5x5 pair); a global
//! descriptor (sum of the streams, spatial mean) goes through a 1x1 conv to
//! `mid = max(int(f * sk_ratio), 32)` + BN-ReLU and a 1x1 conv to `2f` (no BN); the two halves
//! are softmaxed across the streams and weight them.
//!
//! Variables (creation order, which matches TF1's): `conv`, `bn`, `mix_reduce`, `mix_bn`,
//! `mix_expand`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::batch_norm::{BatchNorm, BatchNormOptions, BnMode};
use crate::layers::Conv2d;

/// Selective-kernel convolution (`SK_Conv2D`).
#[derive(Debug, Clone)]
pub struct SkConv {
    conv: Conv2d,
    bn: BatchNorm,
    mix_reduce: Conv2d,
    mix_bn: BatchNorm,
    mix_expand: Conv2d,
    filters: usize,
}

impl SkConv {
    pub(crate) fn for_each_conv(&mut self, f: &mut dyn FnMut(&mut Conv2d)) {
        f(&mut self.conv);
        f(&mut self.mix_reduce);
        f(&mut self.mix_expand);
    }

    /// Builds an SK conv from `in_ch` to `filters` channels with hidden width `mid`.
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        filters: usize,
        stride: usize,
        mid: usize,
        bn: BatchNormOptions,
    ) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), in_ch, 2 * filters, 3, stride)?;
        let bn_main = BatchNorm::new(vb.pp("bn"), 2 * filters, bn)?;
        let mix_reduce = Conv2d::new(vb.pp("mix_reduce"), filters, mid, 1, 1)?;
        let mix_bn = BatchNorm::new(vb.pp("mix_bn"), mid, bn)?;
        let mix_expand = Conv2d::new(vb.pp("mix_expand"), mid, 2 * filters, 1, 1)?;
        Ok(Self {
            conv,
            bn: bn_main,
            mix_reduce,
            mix_bn,
            mix_expand,
            filters,
        })
    }

    /// Applies the SK conv; `mode` selects batch (possibly global) or moving BN statistics.
    pub fn forward<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        let f = self.filters;
        let y = self.bn.forward_relu(&self.conv.forward(x)?, mode)?;
        let a = y.narrow(1, 0, f)?;
        let b = y.narrow(1, f, f)?;
        let g = (&a + &b)?.mean_keepdim((2, 3))?;
        let g = self
            .mix_bn
            .forward_relu(&self.mix_reduce.forward(&g)?, mode)?;
        let m = self.mix_expand.forward(&g)?;
        let logits = Tensor::stack(&[m.narrow(1, 0, f)?, m.narrow(1, f, f)?], 0)?;
        let w = candle_nn::ops::softmax(&logits, 0)?;
        a.broadcast_mul(&w.get(0)?)? + b.broadcast_mul(&w.get(1)?)?
    }
}
