//! Batch normalisation with the official semantics (reference §1.3).
//!
//! Variables: `gamma` (always), `beta` (only when `center`; the last projection-head layer has
//! none), `moving_mean` and `moving_variance` (non-trainable statistics, kept in the same
//! variable store so checkpoints carry them).
//!
//! * Training mode normalises with the batch mean and the **biased** batch variance over every
//!   axis but the channel axis (axis 1), and updates the moving statistics in place:
//!   `moving = decay * moving + (1 - decay) * batch`, with the **biased** batch variance for the
//!   variance too. That is what the official code does with `global_bn=True` (its default):
//!   Keras' unfused BN and TF1's cross-replica BN feed the moving variance with the biased
//!   variance. (PyTorch's BN would use the unbiased one; TF's *fused* kernel too, but the
//!   official global-BN path is never fused.) Gradients flow through the batch statistics.
//! * Inference mode uses the moving statistics; they receive no gradient (they are detached).

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// Shape-independent options of one BN layer.
#[derive(Debug, Clone, Copy)]
pub struct BatchNormOptions {
    /// Create and add `beta`.
    pub center: bool,
    /// Initialise `gamma` to 0 instead of 1 (the last BN of each residual block).
    pub zero_init_gamma: bool,
    /// Epsilon added to the variance.
    pub eps: f64,
    /// Moving-average decay (Keras `momentum`).
    pub decay: f64,
}

impl BatchNormOptions {
    /// `center = true`, gamma initialised to 1, the given eps/decay.
    pub fn new(eps: f64, decay: f64) -> Self {
        Self {
            center: true,
            zero_init_gamma: false,
            eps,
            decay,
        }
    }

    /// The same options with `center` set.
    pub fn center(mut self, center: bool) -> Self {
        self.center = center;
        self
    }

    /// The same options with `zero_init_gamma` set.
    pub fn zero_init_gamma(mut self, zero: bool) -> Self {
        self.zero_init_gamma = zero;
        self
    }
}

/// Batch normalisation over axis 1 of a `[N, C]` or `[N, C, ...]` tensor.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    gamma: Tensor,
    beta: Option<Tensor>,
    moving_mean: Var,
    moving_variance: Var,
    channels: usize,
    opts: BatchNormOptions,
}

impl BatchNorm {
    /// Creates `prefix.{gamma, beta?, moving_mean, moving_variance}` for `channels` channels.
    pub fn new(vb: VarBuilder, channels: usize, opts: BatchNormOptions) -> Result<Self> {
        let g0 = if opts.zero_init_gamma { 0.0 } else { 1.0 };
        let gamma = vb.get_with_hints(channels, "gamma", Init::Const(g0))?;
        let beta = if opts.center {
            Some(vb.get_with_hints(channels, "beta", Init::Const(0.0))?)
        } else {
            None
        };
        // Variables from a VarMap are updated in place; anything else is copied into a fresh
        // variable owned by this layer.
        let moving_mean =
            Var::from_tensor(&vb.get_with_hints(channels, "moving_mean", Init::Const(0.0))?)?;
        let moving_variance =
            Var::from_tensor(&vb.get_with_hints(channels, "moving_variance", Init::Const(1.0))?)?;
        Ok(Self {
            gamma,
            beta,
            moving_mean,
            moving_variance,
            channels,
            opts,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The options this layer was built with.
    pub fn options(&self) -> BatchNormOptions {
        self.opts
    }

    /// The moving mean (a snapshot sharing storage with the variable).
    pub fn moving_mean(&self) -> Tensor {
        self.moving_mean.as_tensor().detach()
    }

    /// The moving variance (a snapshot sharing storage with the variable).
    pub fn moving_variance(&self) -> Tensor {
        self.moving_variance.as_tensor().detach()
    }

    fn bshape(&self, rank: usize) -> Vec<usize> {
        let mut s = vec![1; rank];
        s[1] = self.channels;
        s
    }

    /// Normalises `x`; in training mode with batch statistics (and updates the moving ones),
    /// otherwise with the moving statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let rank = x.rank();
        if rank < 2 || x.dim(1)? != self.channels {
            candle_core::bail!(
                "BatchNorm over {} channels got a tensor of shape {:?}",
                self.channels,
                x.shape()
            )
        }
        let bshape = self.bshape(rank);
        let gamma = self.gamma.reshape(bshape.as_slice())?;
        let y = if train {
            let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
            let mean = x.mean_keepdim(dims.as_slice())?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(dims.as_slice())?;
            let inv = (var.clone() + self.opts.eps)?.sqrt()?.recip()?;
            self.update_moving(&mean, &var)?;
            centered.broadcast_mul(&inv.broadcast_mul(&gamma)?)?
        } else {
            let mm = self
                .moving_mean
                .as_tensor()
                .detach()
                .reshape(bshape.as_slice())?;
            let mv = self
                .moving_variance
                .as_tensor()
                .detach()
                .reshape(bshape.as_slice())?;
            let inv = (mv + self.opts.eps)?.sqrt()?.recip()?;
            x.broadcast_sub(&mm.to_dtype(x.dtype())?)?
                .broadcast_mul(&inv.to_dtype(x.dtype())?.broadcast_mul(&gamma)?)?
        };
        match &self.beta {
            Some(b) => y.broadcast_add(&b.reshape(bshape.as_slice())?),
            None => Ok(y),
        }
    }

    fn update_moving(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        let d = self.opts.decay;
        let c = self.channels;
        let dtype = self.moving_mean.dtype();
        let batch_mean = mean.detach().flatten_all()?.to_dtype(DType::F64)?;
        let batch_var = var.detach().flatten_all()?.to_dtype(DType::F64)?;
        let mm = self.moving_mean.as_tensor().detach().to_dtype(DType::F64)?;
        let mv = self
            .moving_variance
            .as_tensor()
            .detach()
            .to_dtype(DType::F64)?;
        let new_mm = ((mm * d)? + (batch_mean * (1.0 - d))?)?.to_dtype(dtype)?;
        let new_mv = ((mv * d)? + (batch_var * (1.0 - d))?)?.to_dtype(dtype)?;
        debug_assert_eq!(new_mm.dims(), &[c]);
        self.moving_mean.set(&new_mm)?;
        self.moving_variance.set(&new_mv)?;
        Ok(())
    }
}
